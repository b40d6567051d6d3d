"""Every attention implementation that runs on CPU against the einsum path, with left padding:
the function itself, and the model's training forward, prefill and decode through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxzero.errors import ConfigError
from jaxzero.model.attention import AttentionMask, attend, resolve_attention
from jaxzero.model.config import Qwen2Config
from jaxzero.model.qwen2 import ModelOptions, init_model
from jaxzero.model.sampler import Sampler, pad_prompts
from jaxzero.parallel.sharding import FSDP_TP

B, T, N, K, H = 3, 128, 4, 2, 16
PADS = np.array([0, 37, 100])  # left padding of each row

def _inputs():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H)])
    valid_BT = jnp.asarray(np.arange(T)[None] >= PADS[:, None])
    return q, k, v, AttentionMask(jnp.broadcast_to(jnp.arange(T), (B, T)), valid_BT)

@pytest.mark.parametrize("implementation", ["xla", "splash_interpret"])
def test_fused_attention_equals_the_einsum_on_valid_rows(implementation):
    q, k, v, mask = _inputs()
    run = lambda impl: np.asarray(jax.jit(lambda *a: attend(
        *a, compute_dtype=jnp.float32, sharding=FSDP_TP, implementation=impl))(q, k, v, mask))
    want, got = run("einsum"), run(implementation)
    valid = np.asarray(mask.key_valid_BS)
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-6)
    assert np.isfinite(got).all()  # padding queries too: their NaNs would reach real rows

@pytest.mark.parametrize("implementation", ["xla", "splash_interpret"])
def test_fused_attention_keeps_packed_segments_apart(implementation):
    """Right-padded packed rows (sequence ids 0, 1, 2, ... then padding): every real query
    sees only its own sequence's keys, as the einsum's block-diagonal causal mask has it."""
    q, k, v, _ = _inputs()
    ends = np.array([[40, 90, 120], [128, 128, 128], [10, 11, 70]])  # cumulative segment ends
    slot = np.arange(T)
    segment_BT = (slot[None, :, None] >= ends[:, None, :]).sum(-1)
    valid_BT = slot[None] < ends[:, -1:]
    mask = AttentionMask(jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.asarray(valid_BT),
                         jnp.asarray(segment_BT, jnp.int32))
    run = lambda impl: np.asarray(jax.jit(lambda *a: attend(
        *a, compute_dtype=jnp.float32, sharding=FSDP_TP, implementation=impl))(q, k, v, mask))
    want, got = run("einsum"), run(implementation)
    np.testing.assert_allclose(got[valid_BT], want[valid_BT], atol=2e-6)
    # The second segment's first query sees only itself: its output is its own value.
    np.testing.assert_allclose(want[0, 40], np.repeat(np.asarray(v)[0, 40], N // K, axis=0),
                               atol=1e-6)

CONFIG = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                     tie_word_embeddings=False)

def _model(implementation):
    model = init_model(CONFIG, ModelOptions(attention=implementation), seed=1)
    return nnx.split(model)

def _batch(t):
    rng = np.random.default_rng(2)
    valid = np.arange(t)[None] >= np.array([0, t // 3, t - 5])[:, None]
    return np.where(valid, rng.integers(1, CONFIG.vocab_size, (3, t)), 0), valid

@pytest.mark.parametrize("implementation", [
    "xla", pytest.param("splash_interpret", marks=pytest.mark.slow)])
def test_training_forward_prefill_and_decode_match_the_einsum_model(implementation):
    t = 128 if implementation.startswith("splash") else 24
    tokens, valid = _batch(t)
    out = {}
    for impl in ("einsum", implementation):
        graphdef, state = _model(impl)
        logits = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m)[0])(state, tokens, valid)
        sampler = Sampler(graphdef, CONFIG, max_new_tokens=5, stop_ids=(), pad_id=0,
                          buckets=(t,), chunk=2)
        prompts = [list(row[m]) for row, m in zip(tokens, valid)]
        sample = sampler.generate(state, prompts, key=jax.random.key(0), temperature=0.0)
        cache, first = sampler.loop(1).prefill(state, *pad_prompts(prompts, t, 0))
        # Padding slots hold whatever a padding query computed (implementations differ
        # there; nothing reads them).
        real = np.asarray(cache.valid_BS)[None, :, :, None, None]
        out[impl] = (np.where(valid[..., None], logits, 0.0), np.asarray(first),
                     np.where(real, cache.k_LBSKH, 0.0), sample)
    (logits_a, first_a, k_a, s_a), (logits_b, first_b, k_b, s_b) = out.values()
    np.testing.assert_allclose(logits_b, logits_a, atol=1e-5)  # training forward
    np.testing.assert_allclose(first_b, first_a, atol=1e-5)    # prefill logits
    np.testing.assert_allclose(k_b, k_a, atol=1e-5)            # the real slots it caches
    np.testing.assert_array_equal(s_b.tokens, s_a.tokens)      # decode on that cache
    np.testing.assert_allclose(s_b.logprobs, s_a.logprobs, atol=1e-5)

def test_resolve_picks_per_backend_and_refuses_what_cannot_run():
    assert resolve_attention("auto", "cpu", jnp.float32) == "einsum"
    assert resolve_attention("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert resolve_attention("auto", "gpu", jnp.float32) == "xla"
    assert resolve_attention("auto", "tpu", jnp.bfloat16) == "splash"
    assert resolve_attention("xla", "cpu", jnp.float32) == "xla"
    with pytest.raises(ConfigError, match="cudnn runs on GPU only.*backend is cpu"):
        resolve_attention("cudnn", "cpu", jnp.bfloat16)
    with pytest.raises(ConfigError, match="splash runs on TPU only"):
        resolve_attention("splash", "gpu", jnp.bfloat16)
    with pytest.raises(ConfigError, match="cudnn needs 16-bit compute"):
        resolve_attention("cudnn", "gpu", jnp.float32)
