"""Grouped-query attention behind one function, `attend`, with one mask input for every caller.

Shapes as in `jaxzero.model.qwen2`. The model computes queries, keys and values (and writes
the cache); which key slots a query may see is an `AttentionMask`, built once per forward
pass; `attend` turns both into the attention output, in one of these implementations:

  einsum  scores materialised as [B, K, Q, T, S] float32 (every backend; the CPU default);
          causal self-attention (T == S) in query blocks, each against the keys up to its
          end only, so the masked upper triangle is mostly never computed
  xla     jax.nn.dot_product_attention, implementation='xla'
  cudnn   jax.nn.dot_product_attention, implementation='cudnn' (GPU; 16-bit compute)
  splash  the Pallas TPU splash-attention kernel, left padding as segment ids (TPU)

The fused ones serve causal self-attention over a whole call (training forward passes and
prefills, T == S); decode steps (one query against a cache prefix) take the einsum on every
backend, reading only the cache blocks written so far.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxzero.errors import ConfigError
from jaxzero.parallel.sharding import ShardingConfig, constrain, fit_spec

_MASKED = -1e30  # finite, so a fully masked (padding) query row stays NaN-free

IMPLEMENTATIONS = ("einsum", "xla", "cudnn", "splash")
_BACKEND_OF = {"cudnn": "gpu", "splash": "tpu"}
_AUTO = {"gpu": "cudnn", "tpu": "splash"}


def resolve_attention(choice: str, backend: str, compute_dtype) -> str:
    """model.attention for a backend: `auto` is cudnn on GPU, splash on TPU and einsum
    elsewhere (cudnn only with 16-bit compute); an explicit choice the backend cannot run
    is refused."""
    dtype = jnp.dtype(compute_dtype)
    if choice == "auto":
        choice = _AUTO.get(backend, "einsum")
        if choice == "cudnn" and dtype.itemsize != 2:
            choice = "xla"
        return choice
    if choice not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention={choice!r}: use auto or one of {IMPLEMENTATIONS}")
    need = _BACKEND_OF.get(choice)
    if need is not None and backend != need:
        raise ConfigError(f"model.attention={choice} runs on {need.upper()} only, and this run's "
                          f"backend is {backend}; use auto, einsum or xla")
    if choice == "cudnn" and dtype.itemsize != 2:
        raise ConfigError(f"model.attention=cudnn needs 16-bit compute (model.compute_dtype is "
                          f"{dtype.name}); use bfloat16 or model.attention: xla")
    return choice


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which key slots each query sees: slot s is visible to the query at slot
    `query_slot_BT[b, t]` iff s <= that slot and `key_valid_BS[b, s]`.

    A pytree (it passes through remat and scans); its arrays are the data.
    """

    query_slot_BT: jax.Array  # int32: the slot (position in this call, or cache slot) of a query
    key_valid_BS: jax.Array   # bool: the slot holds a real token
    # int32 ids of the sequences packed in a row (cache-free passes only, so S == T): a query
    # sees only keys of its own segment. None: one sequence a row.
    segment_BT: jax.Array | None = None

    def allowed_BTS(self, queries: slice = slice(None), keys: int | None = None) -> jax.Array:
        """[B, T, S] bool; or the block of `queries` against the first `keys` slots."""
        key_valid_BS = self.key_valid_BS[:, :keys]
        query_slot_BT = self.query_slot_BT[:, queries]
        s = key_valid_BS.shape[1]
        allowed_BTS = (jnp.arange(s)[None, None, :] <= query_slot_BT[:, :, None]) & \
            key_valid_BS[:, None, :]
        if self.segment_BT is not None:
            allowed_BTS &= self.segment_BT[:, queries, None] == self.segment_BT[:, None, :s]
        return allowed_BTS

    def segment_ids_BS(self) -> jax.Array:
        """One int32 id a slot, 0 for padding: keys and queries of equal ids see each other
        (with the causal mask, exactly what `allowed_BTS` allows when T == S)."""
        real_BS = self.key_valid_BS.astype(jnp.int32)
        return real_BS if self.segment_BT is None else real_BS * (self.segment_BT + 1)


def attend(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask: AttentionMask, *,
           compute_dtype, sharding: ShardingConfig, implementation: str = "einsum"
           ) -> jax.Array:
    """softmax(q·k / sqrt(H), masked) · v over the K key/value heads, each shared by Q query
    heads; [B, T, N, H] in the compute dtype. Scores and softmax are float32.

    Keys and values come heads first, [B, K, S, H], as the cache stores them (on TPU the
    (S, H) minor dimensions tile without padding or relayout). Only the first S slots are
    read, S the mask's key width (a cache holds more slots than a decode step has filled).
    `implementation` is one of IMPLEMENTATIONS, or splash_interpret (the splash kernel
    interpreted, for tests on CPU); the fused ones take causal self-attention (T == S) and
    leave the rest to the einsum."""
    s = mask.key_valid_BS.shape[1]
    k_BKSH, v_BKSH = k_BKSH[:, :, :s], v_BKSH[:, :, :s]
    if implementation == "einsum" or q_BTNH.shape[1] != s:
        return _einsum(q_BTNH, k_BKSH, v_BKSH, mask, compute_dtype, sharding)
    if implementation in ("xla", "cudnn"):
        # Causal over slots plus the valid keys: with T == S the query slots are 0..T-1.
        ids_BS = mask.segment_ids_BS()
        allowed_B1TS = ((ids_BS[:, :, None] == ids_BS[:, None, :]) &
                        mask.key_valid_BS[:, None, :])[:, None]
        k_BSKH, v_BSKH = k_BKSH.transpose(0, 2, 1, 3), v_BKSH.transpose(0, 2, 1, 3)
        out_BTNH = jax.nn.dot_product_attention(
            q_BTNH.astype(compute_dtype), k_BSKH.astype(compute_dtype),
            v_BSKH.astype(compute_dtype), mask=allowed_B1TS, is_causal=True,
            implementation=implementation)
        return out_BTNH.astype(compute_dtype)
    if implementation in ("splash", "splash_interpret"):
        return _splash(q_BTNH, k_BKSH, v_BKSH, mask, compute_dtype, sharding,
                       interpret=implementation == "splash_interpret")
    raise ValueError(f"attention implementation {implementation!r}: use one of "
                     f"{IMPLEMENTATIONS}")


# Causal self-attention in at most this many query blocks of at least MIN_QUERY_BLOCK
# queries: block i attends to the keys before its end only, so of the T x T scores only
# (1 + 1/blocks) / 2 are formed (56 % with 8 blocks). More blocks save little more and add
# ops to every layer's program.
QUERY_BLOCKS = 8
MIN_QUERY_BLOCK = 128


def query_blocks(t: int) -> list[tuple[int, int]]:
    """The (start, end) query slots of each block of causal self-attention over T slots; the
    block sees keys [0, end). One block (every key) when T is at most MIN_QUERY_BLOCK."""
    size = max(MIN_QUERY_BLOCK, -(-t // QUERY_BLOCKS))
    return [(start, min(start + size, t)) for start in range(0, t, size)]


def _einsum(q_BTNH, k_BKSH, v_BKSH, mask: AttentionMask, compute_dtype, sharding):
    """Exact for every real query: the keys a block skips are after all its queries' slots
    (with T == S a query's slot is its index), so the full mask gives them weight 0."""
    t, s = q_BTNH.shape[1], k_BKSH.shape[2]
    if t != s:
        return _einsum_block(q_BTNH, k_BKSH, v_BKSH, mask.allowed_BTS(), compute_dtype,
                             sharding)
    out = [_einsum_block(q_BTNH[:, start:end], k_BKSH[:, :, :end], v_BKSH[:, :, :end],
                         mask.allowed_BTS(slice(start, end), end), compute_dtype, sharding)
           for start, end in query_blocks(t)]
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)


def _einsum_block(q_BTNH, k_BKSH, v_BKSH, allowed_BTS, compute_dtype, sharding):
    b, t, n, h = q_BTNH.shape
    k = k_BKSH.shape[1]
    q_BTKQH = q_BTNH.reshape(b, t, k, n // k, h)
    logits_BKQTS = jnp.einsum("BTKQH,BKSH->BKQTS", q_BTKQH, k_BKSH.astype(compute_dtype),
                              preferred_element_type=jnp.float32)
    logits_BKQTS = constrain(logits_BKQTS * (h ** -0.5), sharding.scores_BKQTS)
    logits_BKQTS = jnp.where(allowed_BTS[:, None, None], logits_BKQTS, _MASKED)
    probs_BKQTS = jax.nn.softmax(logits_BKQTS, axis=-1).astype(compute_dtype)
    out_BTKQH = jnp.einsum("BKQTS,BKSH->BTKQH", probs_BKQTS, v_BKSH.astype(compute_dtype))
    return out_BTKQH.reshape(b, t, n, h)


SPLASH_BLOCK = 128  # the kernel's query and key block: T must be a multiple of it


def _splash(q_BTNH, k_BKSH, v_BKSH, mask: AttentionMask, compute_dtype, sharding, *,
            interpret: bool):
    """The splash kernel per (row, KV head) as multi-query attention over its Q heads. Padding
    is segment 0 and real tokens their sequence's id + 1 (`segment_ids_BS`), so with the
    causal mask a real query sees exactly its sequence's real keys up to its own slot (a
    padding query, only padding)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as masks)
    b, t, n, h = q_BTNH.shape
    k = k_BKSH.shape[1]
    if t % SPLASH_BLOCK:
        raise ConfigError(f"model.attention=splash needs sequence lengths that are multiples "
                          f"of {SPLASH_BLOCK} (got {t}); use prompt buckets and "
                          "max_new_tokens that are, or model.attention: einsum")
    sizes = splash.BlockSizes(
        block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK,
        block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK, block_kv_dkv_compute=SPLASH_BLOCK,
        block_q_dq=SPLASH_BLOCK, block_kv_dq=SPLASH_BLOCK)
    kernel = splash.make_splash_mqa_single_device(
        masks.MultiHeadMask([masks.CausalMask((t, t))] * (n // k)), block_sizes=sizes,
        interpret=interpret)

    def rows(q_BTNH, k_BKSH, v_BKSH, ids_BS):
        cd = compute_dtype
        q_BKQTH = (q_BTNH * (h ** -0.5)).astype(cd).reshape(
            q_BTNH.shape[0], t, k, n // k, h).transpose(0, 2, 3, 1, 4)
        k_BKSH, v_BKSH = k_BKSH.astype(cd), v_BKSH.astype(cd)
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
        out_BKQTH = jax.vmap(lambda q, kk, vv, seg: per_head(
            q, kk, vv, splash.SegmentIds(q=seg, kv=seg)))(q_BKQTH, k_BKSH, v_BKSH, ids_BS)
        return out_BKQTH.transpose(0, 3, 1, 2, 4).reshape(q_BTNH.shape).astype(cd)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return rows(q_BTNH, k_BKSH, v_BKSH, mask.segment_ids_BS())
    # A Pallas kernel is not partitioned by XLA: each device runs it on its own rows.
    rows_axes = tuple(fit_spec(sharding.rows_B, (b,), mesh)[0]) or (None,)
    spec = lambda ndim: jax.sharding.PartitionSpec(*rows_axes, *[None] * (ndim - 1))
    return jax.shard_map(rows, mesh=mesh, in_specs=(spec(4), spec(4), spec(4), spec(2)),
                         out_specs=spec(4), check_vma=False)(
        q_BTNH, k_BKSH, v_BKSH, mask.segment_ids_BS())
