"""Logits of jaxzero's Qwen2 (loaded through hf_io) against transformers' Qwen2ForCausalLM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxzero.io import hf as hf_io
from jaxzero.model.qwen2 import (KVCache, ModelOptions, abstract_model, init_model,
                                positions_from_mask)
from helpers import TINY, make_hf_model, save_hf

PADS = (0, 3, 6)  # left padding of each row
T = 10


def padded_batch(vocab: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    tokens_BT = rng.integers(0, vocab, size=(len(PADS), T))
    valid_BT = np.arange(T)[None, :] >= np.array(PADS)[:, None]
    tokens_BT = np.where(valid_BT, tokens_BT, 0)  # pad id: anything, it is masked
    return tokens_BT, valid_BT


def hf_logits(model, tokens_BT, valid_BT) -> np.ndarray:
    positions_BT = np.maximum(np.cumsum(valid_BT, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens_BT), attention_mask=torch.tensor(valid_BT),
                    position_ids=torch.tensor(positions_BT))
    return out.logits.float().numpy()


class Ours:
    """jaxzero's model loaded from an HF dir, its forward jitted (eager dispatch is slow)."""

    def __init__(self, path, dtype="float32"):
        self.config, self.state = hf_io.load_hf_checkpoint(path, param_dtype=dtype)
        self.graphdef, _ = abstract_model(self.config, ModelOptions(
            param_dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype)))

    def __call__(self, tokens_BT, valid_BT, positions_BT=None, cache=None):
        return _forward(self.graphdef, self.state, jnp.asarray(tokens_BT),
                        jnp.asarray(valid_BT), positions_BT, cache)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_BT, valid_BT, positions_BT, cache):
    return nnx.merge(graphdef, state)(tokens_BT, valid_BT, positions_BT, cache)


CASES = {  # name: (tie, heads, kv_heads, hidden, head_dim)
    "tied-mqa-h16": (True, 4, 1, 64, None),
    "untied-gqa-h16": (False, 4, 2, 64, None),
    "tied-mha-h16": (True, 4, 4, 64, None),
    "untied-mha-h32": (False, 2, 2, 64, None),
    "untied-gqa-explicit-h24": (False, 4, 2, 32, 24),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_on_a_left_padded_batch(tmp_path, case):
    tie, heads, kv_heads, hidden, head_dim = CASES[case]
    hf_model = make_hf_model(tie=tie, heads=heads, kv_heads=kv_heads, hidden=hidden,
                             head_dim=head_dim)
    ours = Ours(save_hf(hf_model, tmp_path / "hf"))
    assert ours.config.head_dim == (head_dim or hidden // heads)
    tokens_BT, valid_BT = padded_batch(ours.config.vocab_size)
    logits_BTV, _ = ours(jnp.asarray(tokens_BT), jnp.asarray(valid_BT))
    want_BTV = hf_logits(hf_model, tokens_BT, valid_BT)
    diff = np.abs(np.asarray(logits_BTV) - want_BTV)[valid_BT]
    assert np.abs(want_BTV).max() > 1.0  # logits large enough for the tolerance to mean much
    assert diff.max() <= 1e-4, diff.max()


def test_kv_cache_prefill_then_decode_equals_the_full_forward(tmp_path):
    ours = Ours(save_hf(make_hf_model(kv_heads=2), tmp_path / "hf"))
    tokens_BT, valid_BT = padded_batch(ours.config.vocab_size)
    full_BTV, _ = ours(jnp.asarray(tokens_BT), jnp.asarray(valid_BT))
    positions_BT = np.asarray(positions_from_mask(jnp.asarray(valid_BT)))
    prefill = 6  # the last row is all padding until here
    cache = KVCache.empty(ours.config, len(PADS), T, jnp.float32)
    first_BTV, cache = ours(jnp.asarray(tokens_BT[:, :prefill]),
                            jnp.asarray(valid_BT[:, :prefill]), cache=cache)
    steps = [np.asarray(first_BTV)]
    for t in range(prefill, T):
        step_B1V, cache = ours(jnp.asarray(tokens_BT[:, t:t + 1]),
                               jnp.asarray(valid_BT[:, t:t + 1]),
                               jnp.asarray(positions_BT[:, t:t + 1]), cache)
        steps.append(np.asarray(step_B1V))
    assert int(cache.end) == T
    cached_BTV = np.concatenate(steps, axis=1)
    diff = np.abs(cached_BTV - np.asarray(full_BTV))[valid_BT]
    assert diff.max() <= 1e-5, diff.max()


def test_bfloat16_params_and_compute_stay_close_to_float32(tmp_path):
    path = save_hf(make_hf_model(kv_heads=2), tmp_path / "hf")
    tokens_BT, valid_BT = padded_batch(96)
    f32_BTV, _ = Ours(path, "float32")(jnp.asarray(tokens_BT), jnp.asarray(valid_BT))
    bf16_model = Ours(path, "bfloat16")
    assert nnx.to_pure_dict(bf16_model.state)["embed_VD"].dtype == jnp.bfloat16
    bf16_BTV, _ = bf16_model(jnp.asarray(tokens_BT), jnp.asarray(valid_BT))
    assert bf16_BTV.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    f32, bf16 = np.asarray(f32_BTV)[valid_BT], np.asarray(bf16_BTV)[valid_BT]
    assert np.isfinite(bf16).all()
    # bf16 keeps 8 mantissa bits; two layers of it stay within a few percent of the scale.
    assert np.abs(bf16 - f32).max() <= 0.05 * np.abs(f32).max()
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() >= 0.9


def test_causality_by_gradient_with_left_padding():
    """The gradient of the logits at position t w.r.t. the input embeddings is exactly zero at
    every later position and at every padded one, and not zero at the valid ones up to t."""
    model = init_model(TINY, seed=2)
    tokens_BT, valid_BT = padded_batch(TINY.vocab_size)
    x_BTD = model.embed(jnp.asarray(tokens_BT))

    def logits_per_position(x_BTD):  # [T]: each position's logits, summed over rows and V
        h_BTD, _ = model.hidden_states_from_embeddings(x_BTD, jnp.asarray(valid_BT))
        return model.logits(h_BTD).sum((0, 2))

    grad_TBTD = jax.jit(jax.jacrev(logits_per_position))(x_BTD)
    reaches_TBT = np.abs(np.asarray(grad_TBTD)).max(-1) > 0  # [output t, row, input position]
    for t in range(T):
        for row, pads in enumerate(PADS):
            if t < pads:
                continue  # a padded query: its output is never read
            expect = np.zeros(T, bool)
            expect[pads: t + 1] = True  # the valid keys up to t, itself included
            np.testing.assert_array_equal(reaches_TBT[t, row], expect, err_msg=f"row {row}, t {t}")
