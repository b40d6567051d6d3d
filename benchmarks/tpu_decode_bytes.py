"""Where XLA:TPU's cost model puts the bytes of one decode step, instruction by instruction.

Compiles, deviceless (libtpu, no TPU attached: `pip install -e '.[tpu]'`), the rollout's
standalone decode step (`SamplerLoop.step`, the program `jaxzero plan` measures one token
with, built by the plan's own `decode_setup`) for a Qwen2.5 shape cut to `--layers` layers,
on the replicated bfloat16 decode copy, at the last cache prefix of the seed's shape (1,024 +
1,024 tokens, 128 rows over the topology's chips). It prints XLA's total FLOPs and bytes
against what the step must read (the copy and the cache prefix), then the top-level
instructions of the optimized program by the bytes of their operands and result (read from
the HLO's shapes: a reading aid, not XLA's own per-instruction count).

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


def loop_against_steps(setup, mesh, vocab: int) -> str:
    """The whole decode loop's cost per token beside its standalone steps'. Each of the
    loop's prefix loops stops on data, so `loop_cost` charges it one chunk: the loop's count
    over (prefix loops x chunk steps) is its cost per token at those prefixes."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxzero.parallel.loop_cost import loop_cost
    from jaxzero.rl.plan import Cost

    rows = NamedSharding(mesh, P(setup.sampler.sharding.rows_B[0]))
    compiled = setup.loop.decode.lower(
        setup.loop, setup.copy, setup.cache,
        jax.ShapeDtypeStruct((setup.rows, vocab), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct((setup.rows,), jnp.int32, sharding=rows), jax.random.key(0),
        setup.sampling).compile()
    loop = loop_cost(compiled)
    prefixes = setup.sampler.config.read_prefixes(setup.slots)
    steps = [Cost.of(setup.step_program(read)).bytes_accessed for read in prefixes]
    tokens = len(loop.uncounted) * setup.sampler.config.chunk_steps
    return (f"decode loop: {loop.bytes_accessed / tokens / 1e9:.3f} GB per token over "
            f"{len(loop.uncounted)} prefix loops; its steps at those prefixes: "
            f"{np.mean(steps) / 1e9:.3f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="tpu:v5p:2x2x1")
    ap.add_argument("--model", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=128, help="rollout rows in one sampler call")
    ap.add_argument("--prefix", choices=("first", "last"), default="last",
                    help="the cache prefix the step reads: the first chunk's or the whole cache")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--loop", action="store_true",
                    help="also compile the whole decode loop and compare its cost per token "
                         "with the standalone steps'")
    args = ap.parse_args()
    spec = tgt.parse_target(args.target)
    tgt.prepare_environment(spec)  # before jax is imported
    import jax
    import jax.numpy as jnp

    from jaxzero.model.config import Qwen2Config
    from jaxzero.model.qwen2 import ModelOptions
    from jaxzero.parallel.sharding import make_mesh
    from jaxzero.rl.plan import Cost, PlanInputs, decode_setup

    d, f, heads, kv, tied = SHAPES[args.model]
    config = Qwen2Config(vocab_size=151936, hidden_size=d, intermediate_size=f,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=kv, tie_word_embeddings=tied)
    devices = tgt.target_devices(spec)
    mesh = make_mesh(1, len(devices), 1, devices=devices)
    options = ModelOptions(param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                           attention="splash", platform=devices[0].platform)
    # The seed's shape: 128 rows of 1,024 + 1,024 tokens in one sampler call.
    inputs = PlanInputs(prompts_per_step=args.rows // 16, n=16, prompt_len=1024,
                        response_len=1024, micro_batches=1, param_dtype="float32",
                        compute_dtype="bfloat16", ref_dtype="bfloat16", remat=True,
                        use_kl=False, decode_layout="replicated", attention="splash")
    setup = decode_setup(config, inputs, options, mesh, None, len(devices))
    read = setup.sampler.config.read_prefixes(setup.slots)[0 if args.prefix == "first" else -1]
    started = time.perf_counter()
    compiled = setup.step_program(read)
    cost = Cost.of(compiled)
    copy, cache_read = setup.copy_bytes, setup.cache_bytes * read / setup.slots
    chip = tgt.device_peaks(spec, devices)
    print(f"{args.model} shape, {args.layers} layers, {setup.rows} rows, {setup.slots} cache "
          f"slots (reading {read}), {spec.name}: compiled in {time.perf_counter() - started:.1f} s")
    print(f"XLA cost model: {cost.flops / 1e9:.2f} GFLOP, {cost.bytes_accessed / 1e9:.3f} GB "
          f"accessed per device; the step must read the decode copy ({copy / 1e9:.3f} GB) and "
          f"the cache it reads ({cache_read / 1e9:.3f} GB): "
          f"{cost.bytes_accessed / (copy + cache_read):.2f}x that "
          f"({chip.name}, {chip.hbm_bandwidth / 1e9:g} GB/s: bound "
          f"{cost.bound_s(chip) * 1e3:.3f} ms)")
    if args.loop:
        print(loop_against_steps(setup, mesh, config.vocab_size))
    print(f"{'operand+result MB':>18}  {'opcode':<22} {'instruction':<28} result")
    for total, op, name, shape in entry_instructions(compiled.as_text())[:args.top]:
        print(f"{total / 1e6:18.1f}  {op:<22} {name[:28]:<28} {shape[:90]}")


if __name__ == "__main__":
    main()
