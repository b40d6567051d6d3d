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
               for s in [(B, T, N, H), (B, K, T, H), (B, K, T, H)])
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
    np.testing.assert_allclose(want[0, 40], np.repeat(np.asarray(v)[0, :, 40], N // K, axis=0),
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
        real = np.asarray(cache.valid_BS)[None, :, None, :, None]
        out[impl] = (np.where(valid[..., None], logits, 0.0), np.asarray(first),
                     np.where(real, cache.k_LBKSH, 0.0), sample)
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


def _reference(q, k, v, allowed_BTS):
    """Unblocked masked softmax attention in numpy float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    scores = np.einsum("btnh,bnsh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(allowed_BTS)[:, None], scores, -1e300)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bnts,bnsh->btnh", probs / probs.sum(-1, keepdims=True), v)


def test_query_blocks_cover_every_slot_in_few_blocks():
    from jaxzero.model.attention import MIN_QUERY_BLOCK, QUERY_BLOCKS, query_blocks
    assert query_blocks(MIN_QUERY_BLOCK) == [(0, MIN_QUERY_BLOCK)]
    for t in (129, 333, 2048, 5000):
        blocks = query_blocks(t)
        assert blocks[0][0] == 0 and blocks[-1][1] == t and len(blocks) <= QUERY_BLOCKS
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    # 2,048 slots: the blocks form 36/64 of the T x T scores.
    assert sum((e - s) * e for s, e in query_blocks(2048)) == 2048 * 2048 * 36 // 64


@pytest.mark.parametrize("packed", [False, True])
def test_blocked_causal_einsum_equals_unblocked_attention(packed):
    """T = 333 runs in three query blocks: left-padded rows, and packed rows (segments whose
    boundaries cross the blocks'), against unblocked attention, values and gradients."""
    t = 333
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in [(B, t, N, H), (B, K, t, H), (B, K, t, H)])
    slot = np.arange(t)
    if packed:
        ends = np.array([[100, 200, 333], [129, 300, 320], [5, 256, 257]])
        segment_BT = jnp.asarray((slot[None, :, None] >= ends[:, None, :]).sum(-1), jnp.int32)
        valid_BT = slot[None] < ends[:, -1:]
    else:
        segment_BT, valid_BT = None, slot[None] >= np.array([0, 37, 200])[:, None]
    mask = AttentionMask(jnp.broadcast_to(jnp.arange(t), (B, t)), jnp.asarray(valid_BT),
                         segment_BT)
    run = jax.jit(lambda q, k, v: attend(q, k, v, mask, compute_dtype=jnp.float32,
                                         sharding=FSDP_TP))
    np.testing.assert_allclose(np.asarray(run(q, k, v))[valid_BT],
                               _reference(q, k, v, mask.allowed_BTS())[valid_BT], atol=2e-6)
    # Gradients of a loss over the real queries, against the same loss on the full mask.
    w = jnp.asarray(rng.normal(size=(B, t, N, H)) * valid_BT[:, :, None, None], jnp.float32)
    full = lambda q, k, v: jnp.sum(w * _full_einsum(q, k, v, mask.allowed_BTS()))
    blocked = lambda q, k, v: jnp.sum(w * run(q, k, v))
    for got, want in zip(jax.grad(blocked, (0, 1, 2))(q, k, v),
                         jax.grad(full, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def _full_einsum(q, k, v, allowed_BTS):
    """The einsum attention on the whole [T, S] mask in JAX (for gradients)."""
    g = q.shape[2] // k.shape[1]
    k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
    scores = jnp.einsum("btnh,bnsh->bnts", q, k) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(allowed_BTS[:, None], scores, -1e30), axis=-1)
    return jnp.einsum("bnts,bnsh->btnh", probs, v)
