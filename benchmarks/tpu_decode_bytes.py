"""Where XLA:TPU's cost model puts the bytes of one decode step, instruction by instruction.

Compiles, deviceless (libtpu, no TPU attached: `pip install -e '.[tpu]'`), the rollout's
standalone decode step (`SamplerLoop.step`, the program `jaxzero plan` measures one token
with) for a Qwen2.5 shape cut to `--layers` layers, on the replicated bfloat16 decode copy,
at the last cache prefix of the seed's shape (1,024 + 1,024 tokens, 128 rows over the
topology's chips). It prints XLA's total FLOPs and bytes, then the top-level instructions of
the optimized program by the bytes of their operands and result (read from the HLO's
shapes: a reading aid, not XLA's own per-instruction count).

    python benchmarks/tpu_decode_bytes.py --target tpu:v5p:2x2x1 --layers 2
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np

from jaxzero.parallel import target as tgt

SHAPES = {  # hidden, intermediate, heads, kv heads, tied embeddings
    "1.5b": (1536, 8960, 12, 2, True),
    "7b": (3584, 18944, 28, 4, False),
}
ITEMSIZE = {"bf16": 2, "f16": 2, "u16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4,
            "pred": 1, "s8": 1, "u8": 1, "s64": 8, "u64": 8, "f64": 8}


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (a shape or a tuple of them)."""
    return sum(ITEMSIZE[dt] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
               for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text) if dt in ITEMSIZE)


def entry_instructions(hlo: str) -> list[tuple[int, str, str, str]]:
    """(operand + result bytes, opcode, name, result shape) of the entry computation's
    instructions, largest first."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}\n")]
    shapes, rows = {}, []
    for line in entry.split("\n")[2:]:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z\-]*)\((.*)", line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        shapes[name] = shape
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        total = shape_bytes(shape) + sum(shape_bytes(shapes.get(o, "")) for o in operands)
        rows.append((total, op, name, shape))
    return sorted(rows, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="tpu:v5p:2x2x1")
    ap.add_argument("--model", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=128, help="rollout rows in one sampler call")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    spec = tgt.parse_target(args.target)
    tgt.prepare_environment(spec)  # before jax is imported
    import jax
    import jax.numpy as jnp

    from jaxzero.model.config import Qwen2Config
    from jaxzero.model.qwen2 import KVCache, ModelOptions, abstract_model
    from jaxzero.model.sampler import Sampler, decode_model
    from jaxzero.model.sampling import Sampled, SamplingParams
    from jaxzero.parallel.sharding import (abstract_on, batch_sharding, decode_table,
                                           make_mesh, param_shardings)

    d, f, heads, kv, tied = SHAPES[args.model]
    config = Qwen2Config(vocab_size=151936, hidden_size=d, intermediate_size=f,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=kv, tie_word_embeddings=tied)
    devices = tgt.target_devices(spec)
    mesh = make_mesh(1, len(devices), 1, devices=devices)
    options = ModelOptions(param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                           attention="splash", platform=devices[0].platform)
    table = decode_table("replicated")
    sampler = Sampler(decode_model(config, options, table), config, mesh=mesh,
                      max_new_tokens=1024, stop_ids=(), pad_id=0, buckets=(1024,),
                      cache_dtype=None, sharding=table, param_dtype="bfloat16", chunk=16,
                      cache_block=128)
    _, abstract = abstract_model(config, options)
    copy = abstract_on(jax.eval_shape(lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t),
                                      abstract), param_shardings(abstract, mesh, table))
    slots = sampler.config.cache_slots(1024)
    cache = abstract_on(jax.eval_shape(lambda: KVCache.empty(config, args.rows, slots,
                                                             jnp.bfloat16)),
                        KVCache.shardings(config, mesh, table))
    positions = jax.ShapeDtypeStruct((args.rows,), jnp.int32,
                                     sharding=batch_sharding(mesh, 1, table))
    loop = sampler.loop(16, Sampled())
    read = sampler.config.read_prefixes(slots)[-1]
    started = time.perf_counter()
    compiled = loop.step.lower(loop, copy, cache, positions, positions, jax.random.key(0),
                               SamplingParams.make(1.0, 1.0, 0), read).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"{args.model} shape, {args.layers} layers, {args.rows} rows, {slots} cache slots "
          f"(reading {read}), {spec.name}: compiled in {time.perf_counter() - started:.1f} s")
    print(f"XLA cost model: {cost['flops'] / 1e9:.2f} GFLOP, "
          f"{cost['bytes accessed'] / 1e9:.3f} GB accessed per device")
    print(f"{'operand+result MB':>18}  {'opcode':<22} {'instruction':<28} result")
    for total, op, name, shape in entry_instructions(compiled.as_text())[:args.top]:
        print(f"{total / 1e6:18.1f}  {op:<22} {name[:28]:<28} {shape[:90]}")


if __name__ == "__main__":
    main()
