"""Grouped-query attention behind one function, `attend`, with one mask input for every caller.

Shapes as in `jaxzero.model.qwen2`. The model computes queries, keys and values (and writes
the cache); which key slots a query may see is an `AttentionMask`, built once per forward
pass; `attend` turns both into the attention output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxzero.parallel.sharding import ShardingConfig, constrain

_MASKED = -1e30  # finite, so a fully masked (padding) query row stays NaN-free


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which key slots each query sees: slot s is visible to the query at slot
    `query_slot_BT[b, t]` iff s <= that slot and `key_valid_BS[b, s]`.

    A pytree (it passes through remat and scans); its arrays are the data.
    """

    query_slot_BT: jax.Array  # int32: the slot (position in this call, or cache slot) of a query
    key_valid_BS: jax.Array   # bool: the slot holds a real token

    def allowed_BTS(self) -> jax.Array:
        s = self.key_valid_BS.shape[1]
        return (jnp.arange(s)[None, None, :] <= self.query_slot_BT[:, :, None]) & \
            self.key_valid_BS[:, None, :]


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask: AttentionMask, *,
           compute_dtype, sharding: ShardingConfig) -> jax.Array:
    """softmax(q·k / sqrt(H), masked) · v over the K key/value heads, each shared by Q query
    heads; [B, T, N, H] in the compute dtype. Scores and softmax are float32.

    Only the first S slots of the keys and values are read, S the mask's key width (a cache
    holds more slots than a decode step has filled)."""
    s = mask.key_valid_BS.shape[1]
    k_BSKH, v_BSKH = k_BSKH[:, :s], v_BSKH[:, :s]
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKQH = q_BTNH.reshape(b, t, k, n // k, h)
    logits_BKQTS = jnp.einsum("BTKQH,BSKH->BKQTS", q_BTKQH, k_BSKH.astype(compute_dtype),
                              preferred_element_type=jnp.float32)
    logits_BKQTS = constrain(logits_BKQTS * (h ** -0.5), sharding.scores_BKQTS)
    logits_BKQTS = jnp.where(mask.allowed_BTS()[:, None, None], logits_BKQTS, _MASKED)
    probs_BKQTS = jax.nn.softmax(logits_BKQTS, axis=-1).astype(compute_dtype)
    out_BTKQH = jnp.einsum("BKQTS,BSKH->BTKQH", probs_BKQTS, v_BSKH.astype(compute_dtype),
                           preferred_element_type=jnp.float32).astype(compute_dtype)
    return out_BTKQH.reshape(b, t, n, h)
