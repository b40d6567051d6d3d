"""benchmarks/tpu_decode_bytes.py's HLO reading: instruction bytes from the shapes of their
operands and results, on a program XLA:CPU compiles here."""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
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
