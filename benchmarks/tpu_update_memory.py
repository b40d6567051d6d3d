"""The update's per-device memory four ways: jaxzero's computed figure, XLA:TPU's own heap
(the buffer assignment it dumps), the figure the plan reads from XLA:TPU's
`memory_analysis()` (peak of live buffers + program code), and that analysis's arguments +
`temp_size_in_bytes`.

Compiles, deviceless (libtpu, no TPU attached: `pip install -e '.[tpu]'`), only the update of
a shipped config at the seed's shape (the config's batch and lengths, as `jaxzero plan` does)
with `--xla_dump_to`, then reads the preallocated temp buffer from the dumped buffer
assignment. Phase figures add what stays resident outside the program (the reference), as
the plan does. `--cap-check` compiles the update again, telling XLA:TPU the chip has 3 % more
memory than the plan's figure (`xla_tpu_max_hbm_size_mib`), and says whether it fits there.

    python benchmarks/tpu_update_memory.py configs/qwen2.5-1.5b.yaml mesh.fsdp=-1 \
        --target tpu:v5p:2x2x1 --cap-check
"""

from __future__ import annotations

import argparse
import dataclasses
import math
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
    p.add_argument("--cap-check", action="store_true",
                   help="compile again with the chip's memory capped 3 %% above the plan's figure")
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
    from jaxzero.rl.plan import (program_bytes, train_activations, train_programs,
                                  train_setup)

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
    computed = p_bytes + train.opt_bytes + ref + train_activations(config, inputs, mesh,
                                                                    p_bytes)
    m = update.memory_analysis()
    outside = ref + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    heap = outside + heap_bytes(dump)
    program = program_bytes(update)
    temp_sum = outside + m.temp_size_in_bytes
    print(f"update of {cfg.model.path} ({config.num_hidden_layers} layers) on {args.target}, "
          f"mesh {dict(mesh.shape)}, per device:")
    print(f"  computed (jaxzero plan)              {computed / GiB:7.2f} GiB")
    for label, value in (("XLA:TPU heap (buffer assignment)", heap),
                         ("XLA:TPU peak + code (jaxzero plan)", ref + program),
                         ("XLA:TPU arguments + temp_size", temp_sum)):
        print(f"  {label:<36} {value / GiB:7.2f} GiB   {value / computed:.2f}x computed")
    print(f"  dump: {dump}")
    if args.cap_check:
        cap_mib = math.ceil(1.03 * program / 2 ** 20)
        try:
            capped, _ = train_programs(train.fns, train.params, train.opt, inputs, mesh,
                                       compiler_options={"xla_tpu_max_hbm_size_mib": cap_mib})
        except Exception as e:  # XLA:TPU's CompileTimeHbmOom
            print(f"  capped at {cap_mib} MiB (peak + code + 3 %): refused: "
                  f"{str(e).splitlines()[0]}")
        else:
            c = capped.memory_analysis()
            over = (c.argument_size_in_bytes + c.output_size_in_bytes - c.alias_size_in_bytes
                    + c.temp_size_in_bytes) / 2 ** 20
            print(f"  capped at {cap_mib} MiB (peak + code + 3 %): compiled; its peak + code "
                  f"{program_bytes(capped) / 2 ** 20:.0f} MiB, its arguments + temp_size "
                  f"{over:.0f} MiB")


if __name__ == "__main__":
    main()
