"""benchmarks/tpu_decode_bytes.py: its HLO reading (instruction bytes from the shapes of their
operands and results, on a program XLA:CPU compiles here), and, slow, its loop-against-steps
comparison compiled for a TPU topology."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks import tpu_decode_bytes  # noqa: E402


def test_shape_bytes_reads_arrays_and_tuples():
    assert tpu_decode_bytes.shape_bytes("bf16[32,1536]{1,0:T(8,128)(2,1)}") == 32 * 1536 * 2
    assert tpu_decode_bytes.shape_bytes("(f32[32]{0}, s32[4,2]{1,0}, pred[])") == 128 + 32 + 1


def test_entry_instructions_rank_the_biggest_instruction_first():
    def f(x, w):
        return jnp.tanh(x @ w)

    x, w = jnp.ones((8, 64), jnp.float32), jnp.ones((64, 512), jnp.float32)
    hlo = jax.jit(f).lower(x, w).compile().as_text()
    rows = tpu_decode_bytes.entry_instructions(hlo)
    names = [op for _, op, _, _ in rows]
    assert "parameter" in names
    total, _, _, _ = rows[0]
    # The matmul (fused or not) reads x and w and writes [8, 512]: no instruction reads more.
    assert total == (8 * 64 + 64 * 512 + 8 * 512) * 4
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), reverse=True)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu: pip install -e '.[test,tpu]'")
def test_the_whole_decode_loop_costs_per_token_what_its_steps_do():
    """The plan takes the decode token from standalone steps; the real loop, at the 1.5B's
    width (2 layers, too big for on-chip memory), must cost the same per token. It cost 2.5x
    more when the chunks switched between loops (a whole-cache copy in and out per token)."""
    out = subprocess.run(
        [sys.executable, "benchmarks/tpu_decode_bytes.py", "--target", "tpu:v5p:2x2x1",
         "--layers", "2", "--loop", "--top", "0"], cwd=ROOT, capture_output=True, text=True,
        timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    loop, steps = map(float, re.search(r"decode loop: ([\d.]+) GB per token .*?: ([\d.]+) GB",
                                       out.stdout).groups())
    assert loop == pytest.approx(steps, rel=0.1)
