"""The chunked slot scores and their hand-written backward pass against autodiff of the plain
whole-vocabulary formula (log-softmax of all the logits at once)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxzero.rl.token_scores import slot_scores

B, N, D, V = 3, 10, 16, 37


def _inputs(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (B, N, D), dtype)
    w = jax.random.normal(k[1], (V, D), jnp.float32) * 0.5
    t = jax.random.randint(k[2], (B, N), 0, V)
    # Loss weights on both outputs, so both cotangents reach the backward pass.
    g = jax.random.normal(k[3], (2, B, N))
    return h, w, t, g


def _reference(h, w, t, temperature, live):
    logits = jnp.einsum("BND,VD->BNV", h, w.astype(h.dtype),
                        preferred_element_type=jnp.float32) / temperature
    logp_V = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_V, t[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_V) * logp_V, axis=-1)
    keep = jnp.arange(N) < live
    return jnp.where(keep, logp, 0.0), jnp.where(keep, ent, 0.0)


def _objective(score, g):
    def f(h, w):
        logp, ent = score(h, w)
        return jnp.sum(g[0] * logp) + jnp.sum(g[1] * ent)
    return f


@pytest.mark.parametrize("chunk, temperature, live", [
    (4, 1.0, N),       # 10 slots in chunks of 4: the last chunk is padded
    (3, 0.7, N),       # a temperature divides the logits and their gradient
    (4, 1.0, 5),       # chunks wholly past `live` score 0 and pass no gradient
    (16, 1.3, 7),      # one chunk wider than the slots
])
def test_scores_and_gradients_match_the_whole_vocabulary_formula(chunk, temperature, live):
    h, w, t, g = _inputs()
    chunked = lambda h, w: slot_scores(h, t, w, live=jnp.int32(live), with_entropy=True,
                                       chunk=chunk, temperature=temperature)
    reference = lambda h, w: _reference(h, w, t, temperature, -(-live // chunk) * chunk)
    for got, want in zip(jax.jit(chunked)(h, w), reference(h, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got = jax.jit(jax.grad(_objective(chunked, g), argnums=(0, 1)))(h, w)
    want = jax.grad(_objective(reference, g), argnums=(0, 1))(h, w)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_without_entropy_the_entropies_are_zeros_and_the_gradient_is_the_log_probs():
    h, w, t, g = _inputs(1)
    chunked = lambda h, w: slot_scores(h, t, w, live=None, with_entropy=False, chunk=4,
                                       temperature=1.0)
    logp, ent = chunked(h, w)
    assert not np.any(np.asarray(ent))
    got = jax.grad(lambda h, w: jnp.sum(g[0] * chunked(h, w)[0]), argnums=(0, 1))(h, w)
    want = jax.grad(lambda h, w: jnp.sum(g[0] * _reference(h, w, t, 1.0, N)[0]),
                    argnums=(0, 1))(h, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_activations_take_a_float32_weight_and_give_it_a_float32_gradient():
    h, w, t, g = _inputs(2, jnp.bfloat16)
    chunked = lambda h, w: slot_scores(h, t, w, live=None, with_entropy=True, chunk=4,
                                       temperature=1.0)
    dh, dw = jax.grad(_objective(chunked, g), argnums=(0, 1))(h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    ref_dh, ref_dw = jax.grad(_objective(lambda h, w: _reference(h, w, t, 1.0, N), g),
                              argnums=(0, 1))(h.astype(jnp.float32), w.astype(jnp.bfloat16)
                                              .astype(jnp.float32))
    # The backward's matmuls take bfloat16 operands, as the forward's do.
    np.testing.assert_allclose(dh.astype(jnp.float32), ref_dh, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(dw, ref_dw, rtol=0.05, atol=0.05)


def test_a_non_positive_temperature_is_refused():
    h, w, t, _ = _inputs()
    with pytest.raises(ValueError, match="temperature must be positive"):
        slot_scores(h, t, w, live=None, with_entropy=False, chunk=4, temperature=0.0)
