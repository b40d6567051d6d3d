"""Qwen2 causal LM in Flax NNX, with a KV-cache path for decoding.

The shape vocabulary of the whole package (array-name suffixes, einsum strings and the
fields of `jaxzero.parallel.sharding.ShardingConfig`):
  B rows of a batch (sequences); P prompts; G rollouts per prompt (B = P·G, a prompt's
    rollouts contiguous)
  T tokens of a sequence in this call (prompt + response in the train step, the prompt
    bucket in a prefill); R response tokens; S key/value slots (T without a cache, the
    cache length with one)
  L layers (the decoder blocks' parameters are stacked along a leading L axis and run by one
    `lax.scan`); D model width; F MLP width; N query heads; K KV heads; Q query heads per KV
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

from jax.experimental.layout import Layout, with_layout_constraint
from jax.sharding import Mesh, NamedSharding

from jaxzero.model.attention import AttentionMask, attend
from jaxzero.model.config import Qwen2Config
from jaxzero.model.rope import apply_rope
from jaxzero.parallel.sharding import FSDP_TP, ShardingConfig, constrain, fit_spec


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model computes, as opposed to what it is (Qwen2Config)."""

    param_dtype: jnp.dtype = jnp.float32
    compute_dtype: jnp.dtype = jnp.float32
    remat: bool = False  # rematerialise each block in the backward pass
    sharding: ShardingConfig = FSDP_TP  # activation constraints (they bind under a mesh)
    attention: str = "einsum"  # an implementation of `attention.attend` (model.attention)
    forward_only: bool = False  # never differentiated (the rollout's decode copy)
    platform: str = "cpu"  # the backend compiled for (jax.Device.platform): "cpu", "gpu", "tpu"


class KVCache(NamedTuple):
    """Keys and values of every layer, preallocated for S slots, heads before slots: a
    layer's [B, K, S, H] is what attention reads, and on TPU the (S, H) minor dimensions tile
    as (8, 128) with S a whole number of tiles (`sampler.SLOT_MULTIPLE`). Slots before heads
    ([L, B, S, K, H]) got (K, H) tiles of (2, 128) for two KV heads, and every decode program
    copied the whole cache into the update's layout and back.

    `valid_BS` marks slots that hold a real (non-padding) token; `end` is the next slot
    to write, shared by the batch because prompts are left-padded to one length.
    """

    k_LBKSH: jax.Array
    v_LBKSH: jax.Array
    valid_BS: jax.Array
    end: jax.Array  # int32 scalar

    @classmethod
    def empty(cls, config: Qwen2Config, batch: int, slots: int, dtype) -> "KVCache":
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, slots,
                 config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, slots), jnp.bool_), jnp.zeros((), jnp.int32))

    def in_layout(self, platform: str) -> "KVCache":
        """On TPU, the cache with keys and values held to their row-major layout ((S, H)
        minor), as a loop carries it: left free, XLA:TPU gives a loop's cache carry (B, H)
        tiles (what the one-slot update prefers) and attention relayouts every layer's slots
        each step. Elsewhere the cache as it is: XLA:CPU's partitioner gathers a
        layout-constrained sharded array whole (`tests/rl/test_decode_copy.py`)."""
        if platform != "tpu":
            return self
        major_to_minor = Layout(major_to_minor=tuple(range(self.k_LBKSH.ndim)))
        return self._replace(k_LBKSH=with_layout_constraint(self.k_LBKSH, major_to_minor),
                             v_LBKSH=with_layout_constraint(self.v_LBKSH, major_to_minor))

    @classmethod
    def shardings(cls, config: Qwen2Config, mesh: Mesh, table: ShardingConfig) -> "KVCache":
        """The cache's shardings from the table: K heads fitted to the mesh (rows and slots
        depend on the call; the sampler checks that rows divide)."""
        lbksh = (config.num_hidden_layers, None, config.num_key_value_heads, None,
                 config.head_dim)
        kv = NamedSharding(mesh, fit_spec(table.cache_LBKSH, lbksh, mesh)[0])
        return cls(kv, kv, NamedSharding(mesh, table.cache_BS),
                   NamedSharding(mesh, jax.sharding.PartitionSpec()))


def positions_from_mask(valid_BT: jax.Array) -> jax.Array:
    """Position ids of a left-padded batch: 0 at each sequence's first real token."""
    return jnp.maximum(jnp.cumsum(valid_BT.astype(jnp.int32), axis=-1) - 1, 0)


def rms_norm(x_BTD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    x32 = x_BTD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight_D.astype(x_BTD.dtype) * normed.astype(x_BTD.dtype)


def project(equation: str, x: jax.Array, w: jax.Array, options: "ModelOptions") -> jax.Array:
    """A weight matmul in the compute dtype. A forward-only model accumulates in float32
    and rounds once (what GPU and TPU matmuls do anyway): XLA:CPU would otherwise upcast the
    bfloat16 weights itself and, in a decode loop, hoist float32 copies of every weight into
    the loop's carry. Training keeps the plain product, whose gradient stays in the compute
    dtype (a float32 result would make the backward matmuls float32)."""
    cd = options.compute_dtype
    if not options.forward_only:
        return jnp.einsum(equation, x, w.astype(cd))
    return jnp.einsum(equation, x, w.astype(cd),
                      preferred_element_type=jnp.float32).astype(cd)


def take_rows(table_VD: jax.Array, tokens_BT: jax.Array, options: "ModelOptions") -> jax.Array:
    """Rows of an embedding table [B, T, D]. A forward-only model on CPU gathers a 16-bit
    table as 16-bit integers: XLA:CPU gathers bfloat16 in float32 and, in a decode loop,
    hoists that float32 copy of the whole table out of the loop (the bitcast has no
    gradient). Elsewhere the table is gathered as it is: XLA:TPU materialises the bitcast, a
    copy of the whole table per decode step (`tests/parallel/test_tpu_target.py`)."""
    if not options.forward_only or table_VD.dtype.itemsize != 2 or options.platform != "cpu":
        return jnp.take(table_VD, tokens_BT, axis=0)
    bits_VD = jax.lax.bitcast_convert_type(table_VD, jnp.uint16)
    return jax.lax.bitcast_convert_type(jnp.take(bits_VD, tokens_BT, axis=0), table_VD.dtype)


def layer_slices(stacked, options: "ModelOptions"):
    """The stacked layer parameters as the layer scan slices them, and the function that
    turns one slice back into parameters. A forward-only model on CPU slices 16-bit floats
    as 16-bit integers: XLA:CPU dynamic-slices bfloat16 in float32 and, in a decode loop,
    hoists a float32 copy of every stacked weight out of the loop."""
    if not options.forward_only or options.platform != "cpu":
        return stacked, lambda params: params
    halves = lambda x: x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)
    dtypes = jax.tree.map(lambda x: x.dtype, stacked)
    as_bits = jax.tree.map(
        lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16) if halves(x) else x, stacked)
    back = lambda params: jax.tree.map(
        lambda x, dtype: jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x,
        params, dtypes)
    return as_bits, back


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

    def __call__(self, x_BTD, positions_BT, mask: AttentionMask, layer, cache):
        """`layer` (an int32 scalar, traced in the layer scan) is this block's index in the
        stacked cache."""
        cfg, cd, shd = self.config, self.options.compute_dtype, self.options.sharding
        q_BTNH = project("BTD,DNH->BTNH", x_BTD, self.q_DNH[...], self.options)
        q_BTNH = constrain(q_BTNH + self.q_bias_NH[...].astype(cd), shd.act_BTNH)
        k_BTKH = project("BTD,DKH->BTKH", x_BTD, self.k_DKH[...], self.options)
        k_BTKH = constrain(k_BTKH + self.k_bias_KH[...].astype(cd), shd.act_BTKH)
        v_BTKH = project("BTD,DKH->BTKH", x_BTD, self.v_DKH[...], self.options)
        v_BTKH = constrain(v_BTKH + self.v_bias_KH[...].astype(cd), shd.act_BTKH)
        q_BTNH = apply_rope(q_BTNH, positions_BT, cfg)
        k_BTKH = apply_rope(k_BTKH, positions_BT, cfg)

        k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
        if cache is not None:
            start = (layer, 0, 0, cache.end, 0)
            write = lambda c, x: jax.lax.dynamic_update_slice(c, x[None].astype(c.dtype), start)
            cache = cache._replace(k_LBKSH=write(cache.k_LBKSH, k_BKTH),
                                   v_LBKSH=write(cache.v_LBKSH, v_BKTH))
            # The slots attention reads, sliced from the stacked cache in one step (the layer
            # taken whole first is a copy of it on TPU whenever fewer slots are read).
            b, k, _, h = k_BKTH.shape
            read = lambda c: jax.lax.dynamic_slice(
                c, (layer, 0, 0, 0, 0), (1, b, k, mask.key_valid_BS.shape[1], h))[0]
            k_BKSH, v_BKSH = read(cache.k_LBKSH), read(cache.v_LBKSH)
        else:
            k_BKSH, v_BKSH = k_BKTH, v_BKTH

        out_BTNH = attend(q_BTNH, k_BKSH, v_BKSH, mask, compute_dtype=cd, sharding=shd,
                          implementation=self.options.attention)
        out_BTNH = constrain(out_BTNH, shd.act_BTNH)
        return project("BTNH,NHD->BTD", out_BTNH, self.o_NHD[...], self.options), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen2Config, options: ModelOptions, rngs: nnx.Rngs):
        d, f, pd = config.hidden_size, config.intermediate_size, options.param_dtype
        self.gate_DF = _normal(rngs, (d, f), pd)
        self.up_DF = _normal(rngs, (d, f), pd)
        self.down_FD = _normal(rngs, (f, d), pd)
        self.options = options

    def __call__(self, x_BTD):
        shd = self.options.sharding
        gate_BTF = project("BTD,DF->BTF", x_BTD, self.gate_DF[...], self.options)
        up_BTF = project("BTD,DF->BTF", x_BTD, self.up_DF[...], self.options)
        hidden_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, shd.act_BTF)
        return project("BTF,FD->BTD", hidden_BTF, self.down_FD[...], self.options)


class Block(nnx.Module):
    def __init__(self, config: Qwen2Config, options: ModelOptions, rngs: nnx.Rngs):
        pd = options.param_dtype
        self.attn_norm_D = nnx.Param(jnp.ones((config.hidden_size,), pd))
        self.attn = Attention(config, options, rngs)
        self.mlp_norm_D = nnx.Param(jnp.ones((config.hidden_size,), pd))
        self.mlp = MLP(config, options, rngs)
        self.eps = config.rms_norm_eps

    def __call__(self, x_BTD, positions_BT, mask: AttentionMask, layer, cache):
        attn_BTD, cache = self.attn(rms_norm(x_BTD, self.attn_norm_D[...], self.eps),
                                    positions_BT, mask, layer, cache)
        x_BTD = x_BTD + attn_BTD
        x_BTD = x_BTD + self.mlp(rms_norm(x_BTD, self.mlp_norm_D[...], self.eps))
        return x_BTD, cache


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose parameters are those of `blocks` stacked along a new leading L axis
    (each keeps the values it was initialised with)."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 decoder with a tied or untied lm_head (`tie_word_embeddings`)."""

    def __init__(self, config: Qwen2Config, options: ModelOptions = ModelOptions(), *,
                 rngs: nnx.Rngs):
        pd = options.param_dtype
        self.config = config
        self.options = options
        self.embed_VD = _normal(rngs, (config.vocab_size, config.hidden_size), pd)
        # Every decoder block in one: parameters [L, ...], run by `lax.scan`, so a program
        # holds one block's code however deep the model is.
        self.layers = stack_blocks([Block(config, options, rngs)
                                    for _ in range(config.num_hidden_layers)])
        self.norm_D = nnx.Param(jnp.ones((config.hidden_size,), pd))
        if not config.tie_word_embeddings:
            self.lm_head_VD = _normal(rngs, (config.vocab_size, config.hidden_size), pd)

    def embed(self, tokens_BT) -> jax.Array:
        """Input embeddings [B, T, D] in the compute dtype."""
        x_BTD = take_rows(self.embed_VD[...], tokens_BT, self.options)
        x_BTD = x_BTD.astype(self.options.compute_dtype)
        return constrain(x_BTD, self.options.sharding.act_BTD)

    def hidden_states(self, tokens_BT, valid_BT, positions_BT=None, cache: KVCache | None = None,
                      read_slots: int | None = None, segments_BT=None):
        """Final-norm hidden states [B, T, D] (compute dtype) and the updated cache.

        Without a cache, tokens attend causally to the valid tokens of this call; with
        `segments_BT` (int32 ids of the sequences packed in a row), only to those of their
        own segment, and `positions_BT` should restart at each segment. With a cache, the T
        new tokens are written at slots [cache.end, cache.end + T) and attend to every valid
        slot up to their own; `read_slots` (static) reads only the cache's first slots,
        which must hold every slot written so far.
        """
        return self.hidden_states_from_embeddings(self.embed(tokens_BT), valid_BT, positions_BT,
                                                  cache, read_slots, segments_BT)

    def hidden_states_from_embeddings(self, x_BTD, valid_BT, positions_BT=None,
                                      cache: KVCache | None = None,
                                      read_slots: int | None = None, segments_BT=None):
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
            key_valid_BS = key_valid_BS[:, :read_slots]  # attend reads as many slots
        mask = AttentionMask(query_slot_BT, key_valid_BS, segments_BT)
        graphdef, stacked = nnx.split(self.layers)
        sliced, params_of = layer_slices(stacked, self.options)

        def block(carry, layer_and_params):
            x_BTD, cache = carry
            layer, params = layer_and_params
            x_BTD, cache = nnx.merge(graphdef, params_of(params))(x_BTD, positions_BT, mask,
                                                                   layer, cache)
            if cache is not None:  # the layer loop carries the cache: keep its layout
                cache = cache.in_layout(self.options.platform)
            return (constrain(x_BTD, shd.act_BTD), cache), None

        if self.options.remat:  # the backward pass keeps each block's input, recomputes the rest
            block = jax.checkpoint(block, prevent_cse=False)
        layers = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
        (x_BTD, cache), _ = jax.lax.scan(block, (x_BTD, cache), (layers, sliced))
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

    def __call__(self, tokens_BT, valid_BT=None, positions_BT=None, cache: KVCache | None = None,
                 read_slots: int | None = None):
        """Float32 logits [B, T, V] and the updated cache (None without one)."""
        if valid_BT is None:
            valid_BT = jnp.ones(tokens_BT.shape, jnp.bool_)
        h_BTD, cache = self.hidden_states(tokens_BT, valid_BT, positions_BT, cache, read_slots)
        return self.logits(h_BTD), cache


def init_model(config: Qwen2Config, options: ModelOptions = ModelOptions(), seed: int = 0):
    """A randomly initialised model (normal(0.02) weights, unit norms, zero biases)."""
    return Qwen2ForCausalLM(config, options, rngs=nnx.Rngs(params=seed))


def abstract_model(config: Qwen2Config, options: ModelOptions = ModelOptions()):
    """The model's graphdef and a state of ShapeDtypeStructs; allocates no weights."""
    return nnx.split(nnx.eval_shape(lambda: init_model(config, options)))
