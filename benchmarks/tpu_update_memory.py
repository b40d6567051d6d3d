"""The update's per-device memory three ways: jaxzero's computed figure, XLA:TPU's own heap
(the buffer assignment it dumps) and XLA:TPU's `memory_analysis()`.

Compiles, deviceless (libtpu, no TPU attached: `pip install -e '.[tpu]'`), only the update of
a shipped config at the seed's shape (the config's batch and lengths, as `jaxzero plan` does)
with `--xla_dump_to`, then reads the preallocated temp buffer from the dumped buffer
assignment. Phase figures add what stays resident outside the program (the reference), as
the plan does.

    python benchmarks/tpu_update_memory.py configs/qwen2.5-1.5b.yaml mesh.fsdp=-1 \
        --target tpu:v5p:2x2x1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tempfile
from pathlib import Path

from jaxzero.parallel import target as tgt

GiB = 2 ** 30


def heap_bytes(dump: Path) -> int:
    """Bytes of the preallocated temp buffers (every memory space) in the update's dumped
    buffer assignment."""
    (path,) = dump.glob("*jit_update*after_optimizations-buffer-assignment.txt")
    return sum(int(m.group(1)) for m in re.finditer(
        r"^allocation \d+: size (\d+),(?: color \d+,)? preallocated-temp", path.read_text(),
        flags=re.M))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--target", default="tpu:v5p:2x2x1")
    p.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    args = p.parse_args(argv)
    spec = tgt.parse_target(args.target)
    dump = Path(tempfile.mkdtemp(prefix="jaxzero-update-dump-"))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump} --xla_dump_hlo_module_re=jit_update")
    tgt.prepare_environment(spec)
    from jaxzero.config.files import load_config
    from jaxzero.io.identity import run_architecture
    from jaxzero.cli.plan import plan_inputs
    from jaxzero.parallel.sharding import make_mesh
    from jaxzero.rl.plan import train_activations, train_programs, train_setup

    cfg = load_config(args.config, args.overrides)
    config = run_architecture(cfg.model)
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                     devices=tgt.target_devices(spec))
    inputs = plan_inputs(cfg, "tpu")
    train = train_setup(config, inputs, mesh)
    update, _ = train_programs(train.fns, train.params, train.opt, inputs, mesh)
    p_bytes, ref = train.param_bytes, train.ref_bytes
    m = update.memory_analysis()
    outside = ref + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    computed = p_bytes + train.opt_bytes + ref + train_activations(config, inputs, mesh,
                                                                    p_bytes)
    heap = outside + heap_bytes(dump)
    reported = outside + m.temp_size_in_bytes
    print(f"update of {cfg.model.path} ({config.num_hidden_layers} layers) on {args.target}, "
          f"mesh {dict(mesh.shape)}, per device:")
    print(f"  computed (jaxzero plan)             {computed / GiB:7.2f} GiB")
    print(f"  XLA:TPU heap (buffer assignment)    {heap / GiB:7.2f} GiB   "
          f"{heap / computed:.2f}x computed")
    print(f"  XLA:TPU memory_analysis()           {reported / GiB:7.2f} GiB   "
          f"{reported / computed:.2f}x computed; {(reported - heap) / GiB:.2f} GiB of temp "
          f"beyond the heap")
    print(f"  dump: {dump}")


if __name__ == "__main__":
    main()
