"""Qwen2 causal LM in Flax NNX, with a KV-cache path for decoding.

The shape vocabulary of the whole package (array-name suffixes, einsum strings and the
fields of `jaxzero.parallel.sharding.ShardingConfig`):
  B rows of a batch (sequences); P prompts; G rollouts per prompt (B = P·G, a prompt's
    rollouts contiguous)
  T tokens of a sequence in this call (prompt + response in the train step, the prompt
    bucket in a prefill); R response tokens; S key/value slots (T without a cache, the
    cache length with one)
  L layers; D model width; F MLP width; N query heads; K KV heads; Q query heads per KV
    head (N = K·Q); H head dim; V vocab
  C chunks (of response positions, of vocab blocks); W the width of one chunk

Parameters are stored in `param_dtype` and cast to `compute_dtype` on use. RMSNorm, rotary
embeddings, attention softmax and the logits are computed in float32.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxzero.model.config import Qwen2Config
from jax.sharding import Mesh, NamedSharding

from jaxzero.parallel.sharding import FSDP_TP, ShardingConfig, constrain, fit_spec

_MASKED = -1e30  # finite, so a fully masked (padding) query row stays NaN-free


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model computes, as opposed to what it is (Qwen2Config)."""

    param_dtype: jnp.dtype = jnp.float32
    compute_dtype: jnp.dtype = jnp.float32
    remat: bool = False  # rematerialise each block in the backward pass
    sharding: ShardingConfig = FSDP_TP  # activation constraints (they bind under a mesh)


class KVCache(NamedTuple):
    """Keys and values of every layer, preallocated for S slots.

    `valid_BS` marks slots that hold a real (non-padding) token; `end` is the next slot
    to write, shared by the batch because prompts are left-padded to one length.
    """

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    valid_BS: jax.Array
    end: jax.Array  # int32 scalar

    @classmethod
    def empty(cls, config: Qwen2Config, batch: int, slots: int, dtype) -> "KVCache":
        shape = (config.num_hidden_layers, batch, slots, config.num_key_value_heads,
                 config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, slots), jnp.bool_), jnp.zeros((), jnp.int32))

    @classmethod
    def shardings(cls, config: Qwen2Config, mesh: Mesh, table: ShardingConfig) -> "KVCache":
        """The cache's shardings from the table: K heads fitted to the mesh (rows and slots
        depend on the call; the sampler checks that rows divide)."""
        lbskh = (config.num_hidden_layers, None, None, config.num_key_value_heads,
                 config.head_dim)
        kv = NamedSharding(mesh, fit_spec(table.cache_LBSKH, lbskh, mesh)[0])
        return cls(kv, kv, NamedSharding(mesh, table.cache_BS),
                   NamedSharding(mesh, jax.sharding.PartitionSpec()))


def positions_from_mask(valid_BT: jax.Array) -> jax.Array:
    """Position ids of a left-padded batch: 0 at each sequence's first real token."""
    return jnp.maximum(jnp.cumsum(valid_BT.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask(query_slot_BT: jax.Array, key_valid_BS: jax.Array,
                   segments_BT: jax.Array | None = None) -> jax.Array:
    """Which key slots each query may attend to, bool [B, T, S]: causal over slots and only
    valid keys; with segment ids (packed rows, no cache, so S = T), only keys of the query's
    own segment, a block-diagonal causal mask."""
    s = key_valid_BS.shape[1]
    allowed_BTS = (jnp.arange(s)[None, None, :] <= query_slot_BT[:, :, None]) & \
        key_valid_BS[:, None, :]
    if segments_BT is not None:
        allowed_BTS = allowed_BTS & (segments_BT[:, :, None] == segments_BT[:, None, :])
    return allowed_BTS


def rms_norm(x_BTD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    x32 = x_BTD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight_D.astype(x_BTD.dtype) * normed.astype(x_BTD.dtype)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in Qwen2's rotate-half layout, computed in float32."""
    h = x_BTNH.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BTh)[:, :, None, :]
    sin = jnp.sin(angles_BTh)[:, :, None, :]
    x32 = x_BTNH.astype(jnp.float32)
    x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype))


class Attention(nnx.Module):
    """Grouped-query attention with q/k/v biases and no output bias."""

    def __init__(self, config: Qwen2Config, options: ModelOptions, rngs: nnx.Rngs):
        d, n, k, h = (config.hidden_size, config.num_attention_heads,
                      config.num_key_value_heads, config.head_dim)
        pd = options.param_dtype
        self.q_DNH = _normal(rngs, (d, n, h), pd)
        self.q_bias_NH = nnx.Param(jnp.zeros((n, h), pd))
        self.k_DKH = _normal(rngs, (d, k, h), pd)
        self.k_bias_KH = nnx.Param(jnp.zeros((k, h), pd))
        self.v_DKH = _normal(rngs, (d, k, h), pd)
        self.v_bias_KH = nnx.Param(jnp.zeros((k, h), pd))
        self.o_NHD = _normal(rngs, (n, h, d), pd)
        self.config = config
        self.options = options

    def __call__(self, x_BTD, positions_BT, query_slot_BT, key_valid_BS, layer, cache,
                 segments_BT=None):
        cfg, cd, shd = self.config, self.options.compute_dtype, self.options.sharding
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q_DNH[...].astype(cd))
        q_BTNH = constrain(q_BTNH + self.q_bias_NH[...].astype(cd), shd.act_BTNH)
        k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.k_DKH[...].astype(cd))
        k_BTKH = constrain(k_BTKH + self.k_bias_KH[...].astype(cd), shd.act_BTKH)
        v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.v_DKH[...].astype(cd))
        v_BTKH = constrain(v_BTKH + self.v_bias_KH[...].astype(cd), shd.act_BTKH)
        q_BTNH = apply_rope(q_BTNH, positions_BT, cfg.rope_theta)
        k_BTKH = apply_rope(k_BTKH, positions_BT, cfg.rope_theta)

        if cache is not None:
            start = (layer, 0, cache.end, 0, 0)
            cache = cache._replace(
                k_LBSKH=jax.lax.dynamic_update_slice(cache.k_LBSKH, k_BTKH[None].astype(
                    cache.k_LBSKH.dtype), start),
                v_LBSKH=jax.lax.dynamic_update_slice(cache.v_LBSKH, v_BTKH[None].astype(
                    cache.v_LBSKH.dtype), start))
            k_BSKH, v_BSKH = cache.k_LBSKH[layer], cache.v_LBSKH[layer]
        else:
            k_BSKH, v_BSKH = k_BTKH, v_BTKH

        b, t = x_BTD.shape[:2]
        q_BTKQH = q_BTNH.reshape(b, t, cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim)
        logits_BKQTS = jnp.einsum("BTKQH,BSKH->BKQTS", q_BTKQH, k_BSKH.astype(cd),
                                  preferred_element_type=jnp.float32)
        logits_BKQTS = constrain(logits_BKQTS * (cfg.head_dim ** -0.5), shd.scores_BKQTS)
        allowed_BTS = attention_mask(query_slot_BT, key_valid_BS, segments_BT)
        logits_BKQTS = jnp.where(allowed_BTS[:, None, None], logits_BKQTS, _MASKED)
        probs_BKQTS = jax.nn.softmax(logits_BKQTS, axis=-1).astype(cd)
        out_BTKQH = jnp.einsum("BKQTS,BSKH->BTKQH", probs_BKQTS, v_BSKH.astype(cd))
        out_BTNH = constrain(out_BTKQH.reshape(b, t, cfg.num_attention_heads, cfg.head_dim),
                             shd.act_BTNH)
        return jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o_NHD[...].astype(cd)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen2Config, options: ModelOptions, rngs: nnx.Rngs):
        d, f, pd = config.hidden_size, config.intermediate_size, options.param_dtype
        self.gate_DF = _normal(rngs, (d, f), pd)
        self.up_DF = _normal(rngs, (d, f), pd)
        self.down_FD = _normal(rngs, (f, d), pd)
        self.options = options

    def __call__(self, x_BTD):
        cd, shd = self.options.compute_dtype, self.options.sharding
        gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.gate_DF[...].astype(cd))
        up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.up_DF[...].astype(cd))
        hidden_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, shd.act_BTF)
        return jnp.einsum("BTF,FD->BTD", hidden_BTF, self.down_FD[...].astype(cd))


class Block(nnx.Module):
    def __init__(self, config: Qwen2Config, options: ModelOptions, rngs: nnx.Rngs):
        pd = options.param_dtype
        self.attn_norm_D = nnx.Param(jnp.ones((config.hidden_size,), pd))
        self.attn = Attention(config, options, rngs)
        self.mlp_norm_D = nnx.Param(jnp.ones((config.hidden_size,), pd))
        self.mlp = MLP(config, options, rngs)
        self.eps = config.rms_norm_eps

    def __call__(self, x_BTD, positions_BT, query_slot_BT, key_valid_BS, layer, cache,
                 segments_BT=None):
        attn_BTD, cache = self.attn(rms_norm(x_BTD, self.attn_norm_D[...], self.eps),
                                    positions_BT, query_slot_BT, key_valid_BS, layer, cache,
                                    segments_BT)
        x_BTD = x_BTD + attn_BTD
        x_BTD = x_BTD + self.mlp(rms_norm(x_BTD, self.mlp_norm_D[...], self.eps))
        return x_BTD, cache


def _run_block(block, x_BTD, positions_BT, query_slot_BT, key_valid_BS, layer, cache,
               segments_BT):
    return block(x_BTD, positions_BT, query_slot_BT, key_valid_BS, layer, cache, segments_BT)


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 decoder with a tied or untied lm_head (`tie_word_embeddings`)."""

    def __init__(self, config: Qwen2Config, options: ModelOptions = ModelOptions(), *,
                 rngs: nnx.Rngs):
        pd = options.param_dtype
        self.config = config
        self.options = options
        self.embed_VD = _normal(rngs, (config.vocab_size, config.hidden_size), pd)
        self.layers = nnx.List([Block(config, options, rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm_D = nnx.Param(jnp.ones((config.hidden_size,), pd))
        if not config.tie_word_embeddings:
            self.lm_head_VD = _normal(rngs, (config.vocab_size, config.hidden_size), pd)

    def embed(self, tokens_BT) -> jax.Array:
        """Input embeddings [B, T, D] in the compute dtype."""
        x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(self.options.compute_dtype)
        return constrain(x_BTD, self.options.sharding.act_BTD)

    def hidden_states(self, tokens_BT, valid_BT, positions_BT=None, cache: KVCache | None = None,
                      segments_BT=None):
        """Final-norm hidden states [B, T, D] (compute dtype) and the updated cache.

        Without a cache, tokens attend causally to the valid tokens of this call; with
        `segments_BT` (int32 ids of the sequences packed in a row), only to those of their
        own segment, and `positions_BT` should restart at each segment. With a cache, the T
        new tokens are written at slots [cache.end, cache.end + T) and attend to every valid
        slot up to their own.
        """
        return self.hidden_states_from_embeddings(self.embed(tokens_BT), valid_BT, positions_BT,
                                                  cache, segments_BT)

    def hidden_states_from_embeddings(self, x_BTD, valid_BT, positions_BT=None,
                                      cache: KVCache | None = None, segments_BT=None):
        """`hidden_states` from input embeddings [B, T, D] instead of token ids."""
        if segments_BT is not None and cache is not None:
            raise ValueError("packed segments are for the cache-free (training) pass only")
        if positions_BT is None:
            positions_BT = positions_from_mask(valid_BT)
        shape_BT, shd = valid_BT.shape, self.options.sharding
        t = shape_BT[1]
        if cache is None:
            query_slot_BT = jnp.broadcast_to(jnp.arange(t), shape_BT)
            key_valid_BS = valid_BT.astype(jnp.bool_)
        else:
            query_slot_BT = jnp.broadcast_to(cache.end + jnp.arange(t), shape_BT)
            key_valid_BS = jax.lax.dynamic_update_slice(
                cache.valid_BS, valid_BT.astype(jnp.bool_), (0, cache.end))
            cache = cache._replace(valid_BS=key_valid_BS)
        run = nnx.remat(_run_block, static_argnums=(5,)) if self.options.remat else _run_block
        for layer, block in enumerate(self.layers):
            x_BTD, cache = run(block, x_BTD, positions_BT, query_slot_BT, key_valid_BS, layer,
                               cache, segments_BT)
            x_BTD = constrain(x_BTD, shd.act_BTD)
        if cache is not None:
            cache = cache._replace(end=cache.end + t)
        return rms_norm(x_BTD, self.norm_D[...], self.config.rms_norm_eps), cache

    def lm_head_weight(self) -> jax.Array:
        return self.embed_VD[...] if self.config.tie_word_embeddings else self.lm_head_VD[...]

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """Float32 logits [B, T, V] from hidden states."""
        w_VD = self.lm_head_weight().astype(self.options.compute_dtype)
        logits_BTV = jnp.einsum("BTD,VD->BTV", h_BTD, w_VD, preferred_element_type=jnp.float32)
        return constrain(logits_BTV, self.options.sharding.logits_BTV)

    def __call__(self, tokens_BT, valid_BT=None, positions_BT=None, cache: KVCache | None = None):
        """Float32 logits [B, T, V] and the updated cache (None without one)."""
        if valid_BT is None:
            valid_BT = jnp.ones(tokens_BT.shape, jnp.bool_)
        h_BTD, cache = self.hidden_states(tokens_BT, valid_BT, positions_BT, cache)
        return self.logits(h_BTD), cache


def init_model(config: Qwen2Config, options: ModelOptions = ModelOptions(), seed: int = 0):
    """A randomly initialised model (normal(0.02) weights, unit norms, zero biases)."""
    return Qwen2ForCausalLM(config, options, rngs=nnx.Rngs(params=seed))


def abstract_model(config: Qwen2Config, options: ModelOptions = ModelOptions()):
    """The model's graphdef and a state of ShapeDtypeStructs; allocates no weights."""
    return nnx.split(nnx.eval_shape(lambda: init_model(config, options)))
