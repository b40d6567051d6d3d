"""Log-probs and entropies of scored tokens from hidden states and the lm_head, a chunk of
slots at a time, with a hand-written backward pass that rebuilds one chunk's logits at a time.

Shapes: B rows, N scored slots, C chunks of W slots, D model width, V vocab.

Why not autodiff: differentiating the chunk loop keeps, per chunk, the residuals of the
branch that skips dead chunks (XLA:TPU held three float32 [B, W, V] logits-sized buffers for
them, 1.8 GB for Qwen2.5-1.5B at the seed's shape), turns the token pick into a scatter into a
zeroed [B, W, V] buffer, and runs the lm_head's backward matmuls in float32. Here the backward
recomputes the chunk's logits, forms d logits = g·(onehot − p) − g_H·p·(log p + H) in one
fused expression, casts it to the compute dtype like the forward's operands, and accumulates
the weight's gradient in float32 across chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxzero.rl import grpo


def slot_scores(h_BND: jax.Array, targets_BN: jax.Array, w_VD: jax.Array, *,
                live: jax.Array | None, with_entropy: bool, chunk: int,
                temperature: float) -> tuple[jax.Array, jax.Array]:
    """Float32 log-probs and entropies [B, N] of `targets_BN` under softmax(h · wᵀ /
    temperature), `chunk` slots at a time, so the [B, N, V] float32 logits never exist at
    once, in the forward or the backward pass. `w_VD` is the lm_head weight as stored; it is
    cast to h's (compute) dtype for the matmuls and gets its gradient in its own dtype.
    Chunks at or past `live` (a traced slot count; None: all live) are skipped and score 0.
    Entropies are zeros when not `with_entropy`."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    b, slots = targets_BN.shape
    chunk = min(chunk, slots)
    pad = -slots % chunk
    if pad:
        h_BND = jnp.pad(h_BND, ((0, 0), (0, pad), (0, 0)))
        targets_BN = jnp.pad(targets_BN, ((0, 0), (0, pad)))
    n_chunks = h_BND.shape[1] // chunk
    h_CBWD = h_BND.reshape(b, n_chunks, chunk, -1).swapaxes(0, 1)
    t_CBW = targets_BN.reshape(b, n_chunks, chunk).swapaxes(0, 1)
    live = jnp.asarray(n_chunks * chunk if live is None else live, jnp.int32)
    logp_CBW, ent_CBW = _chunk_scores(h_CBWD, t_CBW, w_VD, live, with_entropy, temperature)
    logp_BN = logp_CBW.swapaxes(0, 1).reshape(b, -1)[:, :slots]
    ent_BN = ent_CBW.swapaxes(0, 1).reshape(b, -1)[:, :slots]
    return logp_BN, ent_BN


def _logits(h_BWD, w_VD, temperature):
    logits_BWV = jnp.einsum("BWD,VD->BWV", h_BWD, w_VD, preferred_element_type=jnp.float32)
    return logits_BWV / temperature if temperature != 1.0 else logits_BWV


def _is_live(c, h_CBWD, live):
    return c * h_CBWD.shape[2] < live


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunk_scores(h_CBWD, t_CBW, w_VD, live, with_entropy, temperature):
    w_VD = w_VD.astype(h_CBWD.dtype)

    def one_chunk(args):
        c, h_BWD, t_BW = args

        def score(h_BWD, t_BW):
            logits_BWV = _logits(h_BWD, w_VD, temperature)
            logp_BW = grpo.token_logprobs(logits_BWV, t_BW)
            ent_BW = grpo.token_entropy(logits_BWV) if with_entropy \
                else jnp.zeros_like(logp_BW)
            return logp_BW, ent_BW

        zeros_BW = jnp.zeros(t_BW.shape, jnp.float32)
        return jax.lax.cond(_is_live(c, h_CBWD, live), score, lambda *_: (zeros_BW, zeros_BW),
                            h_BWD, t_BW)

    return jax.lax.map(one_chunk, (jnp.arange(h_CBWD.shape[0]), h_CBWD, t_CBW))


def _chunk_scores_fwd(h_CBWD, t_CBW, w_VD, live, with_entropy, temperature):
    # The inputs are the only residuals: the backward rebuilds each chunk's logits.
    return (_chunk_scores(h_CBWD, t_CBW, w_VD, live, with_entropy, temperature),
            (h_CBWD, t_CBW, w_VD, live))


def _chunk_scores_bwd(with_entropy, temperature, residuals, cotangents):
    h_CBWD, t_CBW, w_VD, live = residuals
    g_logp_CBW, g_ent_CBW = cotangents
    w_c_VD = w_VD.astype(h_CBWD.dtype)

    def one_chunk(dw_VD, args):
        c, h_BWD, t_BW, g_logp_BW, g_ent_BW = args

        def grads(dw_VD):
            logits_BWV = _logits(h_BWD, w_c_VD, temperature)
            logp_BWV = jax.nn.log_softmax(logits_BWV, axis=-1)
            p_BWV = jnp.exp(logp_BWV)
            picked_BWV = t_BW[..., None] == jax.lax.broadcasted_iota(jnp.int32,
                                                                     logits_BWV.shape, 2)
            # d log p[t] / d logits = onehot(t) − p;  d H / d logits = −p·(log p + H).
            dlogits_BWV = g_logp_BW[..., None] * (picked_BWV.astype(jnp.float32) - p_BWV)
            if with_entropy:
                ent_BW1 = -jnp.sum(p_BWV * logp_BWV, axis=-1, keepdims=True)
                dlogits_BWV = dlogits_BWV - g_ent_BW[..., None] * p_BWV * (logp_BWV + ent_BW1)
            if temperature != 1.0:
                dlogits_BWV = dlogits_BWV / temperature
            dlogits_BWV = dlogits_BWV.astype(h_BWD.dtype)
            dh_BWD = jnp.einsum("BWV,VD->BWD", dlogits_BWV, w_c_VD,
                                preferred_element_type=jnp.float32).astype(h_BWD.dtype)
            return dw_VD + jnp.einsum("BWV,BWD->VD", dlogits_BWV, h_BWD,
                                      preferred_element_type=jnp.float32), dh_BWD

        return jax.lax.cond(_is_live(c, h_CBWD, live), grads,
                            lambda dw_VD: (dw_VD, jnp.zeros_like(h_BWD)), dw_VD)

    dw_VD, dh_CBWD = jax.lax.scan(
        one_chunk, jnp.zeros(w_VD.shape, jnp.float32),
        (jnp.arange(h_CBWD.shape[0]), h_CBWD, t_CBW, g_logp_CBW, g_ent_CBW))
    return dh_CBWD, None, dw_VD.astype(w_VD.dtype), None


_chunk_scores.defvjp(_chunk_scores_fwd, _chunk_scores_bwd)
