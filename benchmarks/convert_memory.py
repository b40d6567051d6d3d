"""Peak host memory of `jaxzero convert` on a Qwen2.5-0.5B-shaped bfloat16 checkpoint.

Writes a random checkpoint with the `qwen2.5-0.5b` preset's shapes (about 0.99 GB of
safetensors), then runs each conversion as its own process and reads that process's peak
resident set from `os.wait4`. The goal is a hf-to-jax peak of at most 1.3x the checkpoint's
size on disk. Ends with one JSON line.

Linux charges a child's peak with the peak of the address space it was forked (or vforked)
from, so this parent stays small: it imports no jax, and the checkpoint is written by a
child of its own (`--write-checkpoint DIR`).

    /work/venv/bin/python benchmarks/convert_memory.py [--work-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL = 1.3


def write_checkpoint(path: Path, seed: int = 0) -> int:
    """A random bf16 HF checkpoint of the preset's shapes; returns its bytes on disk."""
    import jax.numpy as jnp

    from jaxzero.io import hf as hf_io
    from jaxzero.model.config import preset

    config = preset("qwen2.5-0.5b")
    rng = np.random.default_rng(seed)
    params: dict = {}
    for t in hf_io.tensor_table(config):
        x = rng.standard_normal(t.shape, dtype=np.float32) * 0.02
        node = params
        for key in t.path[:-1]:
            node = node.setdefault(key, {})
        node[t.path[-1]] = x.astype(jnp.bfloat16)
        del x
    hf_io.export_hf(params, config, path, dtype="bfloat16")
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def save_uncompressed(hf_dir: Path, out: Path) -> None:
    """hf-to-jax as `jaxzero convert` does it, but with orbax's zstd compression off.

    CheckpointStore compresses (orbax's default), and compressing makes orbax hold a second
    copy of every array while it writes; this probe measures the peak without it.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    from jaxzero.io import hf as hf_io

    _, state = hf_io.load_hf_checkpoint(hf_dir, param_dtype="bfloat16")
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
    checkpointer.save(out.absolute(), args=ocp.args.PyTreeSave(nnx.to_pure_dict(state)))


def peak_rss(cmd: list[str], log: Path) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of `cmd` run as a child process."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    parser.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-uncompressed", type=Path, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--probe-load", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint)
        return
    if args.probe_load:
        import jax

        from jaxzero.io import hf as hf_io
        jax.block_until_ready(hf_io.load_hf_checkpoint(args.probe_load, param_dtype="bfloat16"))
        return
    if args.probe_uncompressed:
        save_uncompressed(*args.probe_uncompressed)
        return
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="convert_memory-"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, jz_dir, out_dir = work / "hf", work / "jz", work / "hf_out"
    probe_dir = work / "uncompressed"
    for d in (jz_dir, out_dir, probe_dir):
        shutil.rmtree(d, ignore_errors=True)
    env_python = sys.executable
    try:
        if not (hf_dir / "model.safetensors").is_file():
            peak_rss([env_python, __file__, "--write-checkpoint", str(hf_dir)], work / "write.log")
        ckpt_bytes = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
        imports, _ = peak_rss([env_python, "-c", "import jaxzero.io.model_dir, jax; "
                               "jax.numpy.zeros(1).block_until_ready()"], work / "imports.log")
        to_jax, to_jax_s = peak_rss([env_python, "-m", "jaxzero.cli", "convert", "hf-to-jax",
                                     str(hf_dir), str(jz_dir), "--dtype", "bfloat16"],
                                    work / "hf_to_jax.log")
        to_hf, to_hf_s = peak_rss([env_python, "-m", "jaxzero.cli", "convert", "jax-to-hf",
                                   str(jz_dir), str(out_dir), "--dtype", "bfloat16"],
                                  work / "jax_to_hf.log")
        load, load_s = peak_rss([env_python, __file__, "--probe-load", str(hf_dir)],
                                work / "load.log")
        probe, probe_s = peak_rss([env_python, __file__, "--probe-uncompressed", str(hf_dir),
                                   str(probe_dir)], work / "probe.log")
        jz_bytes, probe_bytes = _du(jz_dir / "checkpoints"), _du(probe_dir)
        same = _same_tensors(hf_dir, out_dir)
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    gb = 1e9
    print(f"checkpoint on disk      {ckpt_bytes / gb:.3f} GB (bfloat16, qwen2.5-0.5b shapes)")
    print(f"imports alone           {imports / gb:.3f} GB peak RSS")
    print(f"load_hf_checkpoint only {load / gb:.3f} GB peak RSS = {load / ckpt_bytes:.2f}x "
          f"checkpoint, {load_s:.1f} s")
    print(f"hf-to-jax               {to_jax / gb:.3f} GB peak RSS = {to_jax / ckpt_bytes:.2f}x "
          f"checkpoint, {to_jax_s:.1f} s")
    print(f"jax-to-hf               {to_hf / gb:.3f} GB peak RSS = {to_hf / ckpt_bytes:.2f}x "
          f"checkpoint, {to_hf_s:.1f} s")
    print(f"round trip bit-exact    {same}")
    print(f"orbax store on disk     {jz_bytes / gb:.3f} GB zstd (CheckpointStore), "
          f"{probe_bytes / gb:.3f} GB uncompressed")
    print(f"hf-to-jax, uncompressed {probe / gb:.3f} GB peak RSS = {probe / ckpt_bytes:.2f}x "
          f"checkpoint, {probe_s:.1f} s (orbax use_compression=False; probe)")
    print(json.dumps({
        "benchmark": "convert_memory", "checkpoint_bytes": ckpt_bytes,
        "imports_peak_rss_bytes": imports,
        "load_only_peak_rss_bytes": load, "load_only_ratio": round(load / ckpt_bytes, 3),
        "hf_to_jax_peak_rss_bytes": to_jax, "hf_to_jax_ratio": round(to_jax / ckpt_bytes, 3),
        "hf_to_jax_seconds": round(to_jax_s, 1),
        "jax_to_hf_peak_rss_bytes": to_hf, "jax_to_hf_ratio": round(to_hf / ckpt_bytes, 3),
        "jax_to_hf_seconds": round(to_hf_s, 1),
        "uncompressed_probe_peak_rss_bytes": probe,
        "uncompressed_probe_ratio": round(probe / ckpt_bytes, 3),
        "store_bytes_zstd": jz_bytes, "store_bytes_uncompressed": probe_bytes,
        "goal_ratio": GOAL, "goal_met": to_jax <= GOAL * ckpt_bytes, "round_trip_exact": same}))


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of two single-file checkpoints byte-equal, one tensor at a time."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
    from safetensors import safe_open
    with safe_open(a / "model.safetensors", "numpy") as fa, \
            safe_open(b / "model.safetensors", "numpy") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(fa.get_tensor(k).tobytes() == fb.get_tensor(k).tobytes() for k in fa.keys())


if __name__ == "__main__":
    main()
