"""This machine's matmul rate (f32/bf16) and memory bandwidth, in numpy/torch and in XLA.

Other benchmarks import `measure()` (or the single probes) to turn their timings into a
fraction of a roofline. Run as a script it prints a table and ends with one JSON line:

    /work/venv/bin/python benchmarks/hardware.py [--quick]

Every figure is the best of `repeats` timed runs after a warm-up, so a busy machine lowers
it less than a mean would.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def best_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of `fn()` over `repeats` runs; fn must block until its work is done."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------- numpy / torch


def numpy_copy_gbps(mbytes: int = 512, repeats: int = 5) -> float:
    """Bandwidth of a big array copy: bytes read + bytes written per second."""
    src = np.ones(mbytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    t = best_seconds(lambda: np.copyto(dst, src), repeats)
    return 2 * src.nbytes / t / 1e9


def numpy_read_gbps(mbytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth of numpy's (single-threaded) sum."""
    src = np.ones(mbytes * 2**20 // 4, np.float32)
    t = best_seconds(src.sum, repeats)
    return src.nbytes / t / 1e9


def torch_matmul_tflops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    import torch
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    t = best_seconds(lambda: torch.mm(a, b), repeats)
    return 2 * n**3 / t / 1e12


def torch_matvec_gbps(dtype: str, rows: int = 151936 // 2, cols: int = 896, batch: int = 32,
                      repeats: int = 5) -> float:
    """Weight bytes streamed per second by a skinny matmul [batch, cols] x [cols, rows]."""
    import torch
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    w = torch.randn(rows, cols).to(dt)
    x = torch.randn(batch, cols).to(dt)
    t = best_seconds(lambda: torch.nn.functional.linear(x, w), repeats)
    return w.numel() * w.element_size() / t / 1e9


# ---------------------------------------------------------------- XLA


def _jax():
    import jax
    import jax.numpy as jnp
    return jax, jnp


def xla_copy_gbps(mbytes: int = 512, repeats: int = 5) -> float:
    """A big read-and-write pass in XLA, bytes read + written per second.

    The input is donated so the output reuses its pages: a fresh output buffer would be
    first-touched (page faults) on every call and measure the kernel's allocator instead.
    """
    jax, jnp = _jax()
    f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    box = [f(jnp.ones(mbytes * 2**20 // 4, jnp.float32))]

    def step():
        box[0] = f(box[0])
        box[0].block_until_ready()
    t = best_seconds(step, repeats)
    return 2 * box[0].nbytes / t / 1e9


def xla_read_gbps(mbytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth: a full reduction over a big array (what decode does to its weights)."""
    jax, jnp = _jax()
    x = jnp.ones(mbytes * 2**20 // 4, jnp.float32)
    f = jax.jit(jnp.sum)
    t = best_seconds(lambda: f(x).block_until_ready(), repeats)
    return x.nbytes / t / 1e9


def xla_matmul_tflops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    jax, jnp = _jax()
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dt))
    t = best_seconds(lambda: f(a, b).block_until_ready(), repeats)
    return 2 * n**3 / t / 1e12


def xla_matvec_gbps(dtype: str, rows: int = 151936 // 2, cols: int = 896, batch: int = 32,
                    transposed: bool = False, repeats: int = 5) -> float:
    """Weight bytes streamed per second by `x[batch, cols] @ w` with w [rows, cols] (the lm_head
    layout, contracting w's minor dim) or, with `transposed`, w [cols, rows]."""
    jax, jnp = _jax()
    dt = jnp.dtype(dtype)
    shape = (cols, rows) if transposed else (rows, cols)
    w = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dt)
    x = jax.random.normal(jax.random.key(1), (batch, cols), jnp.float32).astype(dt)
    spec = "BD,DV->BV" if transposed else "BD,VD->BV"
    f = jax.jit(lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=jnp.float32))
    t = best_seconds(lambda: f(x, w).block_until_ready(), repeats)
    return w.size * w.dtype.itemsize / t / 1e9


def measure(quick: bool = False, torch_too: bool = True) -> dict:
    """All probes; `quick` uses smaller problems (noisier, a few seconds in all)."""
    n = 1024 if quick else 2048
    mb = 128 if quick else 512
    r = 3 if quick else 5
    out = {
        "cpu_count": os.cpu_count(),
        "numpy_copy_gbps": numpy_copy_gbps(mb, r),
        "numpy_read_gbps": numpy_read_gbps(mb, r),
        "xla_copy_gbps": xla_copy_gbps(mb, r),
        "xla_read_gbps": xla_read_gbps(mb, r),
        "xla_matmul_tflops_f32": xla_matmul_tflops("float32", n, r),
        "xla_matmul_tflops_bf16": xla_matmul_tflops("bfloat16", n, r),
        "xla_matvec_gbps_f32": xla_matvec_gbps("float32", repeats=r),
        "xla_matvec_gbps_bf16": xla_matvec_gbps("bfloat16", repeats=r),
        "xla_matvec_gbps_f32_transposed": xla_matvec_gbps("float32", transposed=True, repeats=r),
        "xla_matvec_gbps_bf16_transposed": xla_matvec_gbps("bfloat16", transposed=True,
                                                           repeats=r),
    }
    if torch_too:
        out.update({
            "torch_matmul_tflops_f32": torch_matmul_tflops("float32", n, r),
            "torch_matmul_tflops_bf16": torch_matmul_tflops("bfloat16", n, r),
            "torch_matvec_gbps_f32": torch_matvec_gbps("float32", repeats=r),
            "torch_matvec_gbps_bf16": torch_matvec_gbps("bfloat16", repeats=r),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems, a few seconds")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch probes")
    args = parser.parse_args()
    result = measure(quick=args.quick, torch_too=not args.no_torch)
    for k, v in result.items():
        print(f"{k:36s} {v:10.3f}" if isinstance(v, float) else f"{k:36s} {v}")
    print(json.dumps({"bench": "hardware", **{k: round(v, 4) if isinstance(v, float) else v
                                              for k, v in result.items()}}))


if __name__ == "__main__":
    main()
