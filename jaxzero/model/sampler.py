"""Batched sampling from the Qwen2 model: a bucketed jitted prefill, then a chunked decode.

Shapes as in `jaxzero.model.qwen2`: P prompts, n samples each (G; B = P·n rows, a prompt's
samples contiguous), T the prompt bucket, R = max_new_tokens, S = T + R (rounded up to whole
chunks) cache slots; W = `SamplerConfig.chunk` steps per chunk.

The decode is a while loop over chunks, each a fixed-trip loop of W token steps reading only
the cache blocks written so far, so nothing but the all-stopped check (between chunks) and
the choice of cache prefix (one per chunk) is decided on the device per token. The sampling
strategy (greedy, top-k, top-p) is static, its values traced.

Everything that changes between calls of a run is an array (prompts, the PRNG key, the
sampling parameters), so the prefill compiles once per (bucket, P, n) and the decode once per
(bucket, P·n, strategy). What is static is the frozen `SamplerLoop`: the model's graphdef, the
frozen `SamplerConfig` (token budget, stop ids, pad id, chunk, cache block), n, the strategy,
the mesh and the sharding table. The rollouts decode a copy of the policy in the compute dtype
on its own decode layout (`Sampler.decode_params`, `parallel.sharding.decode_table`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxzero.errors import ConfigError
from jaxzero.model.qwen2 import KVCache, ModelOptions, abstract_model
from jaxzero.model.config import Qwen2Config
from jaxzero.model.sampling import (Sampled, SamplingParams, Strategy, sample_token,
                                    strategy_for)
from jaxzero.parallel.sharding import (FSDP_TP, ShardingConfig, batch_sharding, constrain,
                                       param_shardings, put_global)


# Cache slots come in whole multiples of this: XLA:TPU lays a [B, K, S, H] cache out in
# (8, 128) tiles of 32-bit words (16 slots of bfloat16, 32 of an 8-bit type). On a ragged S
# its default argument layout puts K second-minor instead, and every decode program then
# converts the whole cache on the way in and out (four whole-cache copies per step,
# `benchmarks/tpu_decode_bytes.py`).
SLOT_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """What a compiled sampler is specialised to (hashable: a static jit argument)."""

    max_new_tokens: int
    stop_ids: tuple[int, ...]
    pad_id: int
    buckets: tuple[int, ...] = (128, 256, 512, 1024)
    cache_dtype: str | None = None  # None: the model's compute dtype
    max_prompts_per_call: int | None = None  # None: every prompt of a generate() in one call
    # Decode steps per fixed-trip chunk (at most): the all-stopped check runs only between
    # chunks.
    chunk: int = 16
    # A chunk reads the cache in whole blocks this wide, only those written by its end
    # (None: every chunk reads the whole cache).
    cache_block: int | None = 128

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}; it must be at least 1")
        if not self.buckets or self.buckets[0] < 1:
            raise ConfigError(f"prompt buckets {self.buckets}: give at least one positive length")
        if self.max_prompts_per_call is not None and self.max_prompts_per_call < 1:
            raise ConfigError(f"max_prompts_per_call={self.max_prompts_per_call}; use None or >= 1")
        if self.cache_dtype is not None:
            jnp.dtype(self.cache_dtype)  # raises on an unknown dtype name
        if self.chunk < 1:
            raise ConfigError(f"decode chunk={self.chunk}; it must be at least 1")
        if self.cache_block is not None and self.cache_block < 1:
            raise ConfigError(f"cache_block={self.cache_block}; use None or >= 1")

    @property
    def chunk_steps(self) -> int:
        """Steps per chunk: at most `chunk`, evened out over the R - 1 steps after the first
        token so the last chunk runs as few steps past R as it can."""
        rest = self.max_new_tokens - 1
        if rest == 0:
            return 1
        return -(-rest // -(-rest // self.chunk))

    @property
    def steps(self) -> int:
        """Token columns the decode writes: the first token, then whole chunks (at least
        max_new_tokens; the columns past it are dropped)."""
        w = self.chunk_steps
        return 1 + -(-(self.max_new_tokens - 1) // w) * w

    def cache_slots(self, prompt_len: int) -> int:
        """Cache slots for a prompt bucket: the prompt and every decode step, rounded up to
        whole SLOT_MULTIPLEs (the slots past the last step stay empty and invalid)."""
        return -(-(prompt_len + self.steps) // SLOT_MULTIPLE) * SLOT_MULTIPLE

    def read_prefixes(self, slots: int) -> tuple[int, ...]:
        """The cache prefixes a chunk may read: whole blocks from the first chunk's on, each
        at least a block short of the whole cache (of `slots`, taking the prompt as
        `slots - steps`: at most SLOT_MULTIPLE - 1 slots more than it is, so the first chunk
        may read a block more than it needs), then the whole cache."""
        block = self.block(slots)
        first = slots - self.steps + self.chunk_steps
        return tuple(range(-(-first // block) * block, slots - block + 1, block)) + (slots,)

    def read_index(self, end, slots: int):
        """Which of `read_prefixes(slots)` a chunk reads that starts with `end` slots filled
        (traced in the loop, an int when counting): the blocks its last step reads."""
        prefixes, block = self.read_prefixes(slots), self.block(slots)
        need = -(-(end + self.chunk_steps) // block)
        return jnp.clip(need - prefixes[0] // block, 0, len(prefixes) - 1)

    def block(self, slots: int) -> int:
        """The block width of a cache of `slots` (one block when it is no wider)."""
        return slots if self.cache_block is None else min(self.cache_block, slots)


class SampleOutput(NamedTuple):
    """One row per sample; rows g*n .. g*n+n-1 are the n samples of prompt g."""

    tokens: jax.Array         # [B, R] int32, pad_id after a stop
    mask: jax.Array           # [B, R] bool, the completion (its stop token included)
    logprobs: jax.Array       # [B, R] float32, log-softmax(logits / temperature) of each token
    lengths: jax.Array        # [B] int32
    stopped: jax.Array        # [B] bool: True ended on a stop id, False ran out of tokens
    prompt_tokens: jax.Array  # [B, T] int32, left-padded with pad_id
    prompt_mask: jax.Array    # [B, T] bool


def finish_reasons(stopped) -> list[str]:
    """'stop' or 'length' per sequence, from `SampleOutput.stopped`."""
    return ["stop" if s else "length" for s in np.asarray(stopped)]


# ----------------------------------------------------------------------------- the loop


class DecodeState(NamedTuple):
    """The decode loop's carry."""

    step: jax.Array        # int32: tokens [0, step) of every row are written
    tokens_BR: jax.Array   # R = SamplerConfig.steps columns here
    logprobs_BR: jax.Array
    lengths_B: jax.Array
    done_B: jax.Array      # emitted a stop id
    cache: KVCache


class Decoded(NamedTuple):
    """What a decode returns, rows as the cache's."""

    tokens_BR: jax.Array   # int32, pad_id after a stop
    mask_BR: jax.Array     # bool, the completion (its stop token included)
    logprobs_BR: jax.Array
    lengths_B: jax.Array
    stopped_B: jax.Array
    cache: KVCache         # the donated input cache, returned only so it is updated in place


@dataclasses.dataclass(frozen=True)
class SamplerLoop:
    """Prefill and decode of one model, for one sampler config, n samples per prompt and one
    sampling strategy.

    Frozen and hashable: it is the static `self` of its jitted methods, so everything it
    holds (graphdef, config, n, strategy, mesh, sharding table) is compiled in, and
    everything passed per call (parameters, prompts, key, sampling parameters) is traced.
    Both methods trace under the mesh (the model's constraints bind) and pin their outputs
    to the table's shardings; inputs keep the shardings they arrive with.
    """

    graphdef: Any
    config: SamplerConfig
    n: int
    mesh: Mesh | None = None
    sharding: ShardingConfig = FSDP_TP
    strategy: Strategy = Sampled()

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n={self.n}; it must be at least 1")

    def _mesh_context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh)

    def _model(self, params):
        model = nnx.merge(self.graphdef, params)
        if model.options.sharding != self.sharding:
            raise ConfigError("the model's ModelOptions.sharding is not the sampler's table; "
                              "pass the same ShardingConfig to both")
        return model

    def _pin_cache(self, cache: KVCache) -> KVCache:
        shd = self.sharding
        return KVCache(constrain(cache.k_LBKSH, shd.cache_LBKSH),
                       constrain(cache.v_LBKSH, shd.cache_LBKSH),
                       constrain(cache.valid_BS, shd.cache_BS), cache.end)

    @functools.partial(jax.jit, static_argnames=("self",))
    def prefill(self, params, tokens_PT, valid_PT) -> tuple[KVCache, jax.Array]:
        """Runs the prompts once; returns the cache grown to `config.cache_slots(T)` slots
        with n copies per prompt (B = P·n rows, a prompt's copies contiguous), and the last
        position's float32 logits [B, V]."""
        with self._mesh_context():
            model = self._model(params)
            p, t = tokens_PT.shape
            cache = KVCache.empty(model.config, p, t, jnp.dtype(
                self.config.cache_dtype or model.options.compute_dtype))
            h_PTD, cache = model.hidden_states(tokens_PT, valid_PT, cache=cache)
            logits_PV = model.logits(h_PTD[:, -1:])[:, 0]  # left-padded: the last slot is real
            grow, n = self.config.cache_slots(t) - t, self.n

            def grown(x_LPKTH):  # new slots are empty and invalid
                return jnp.repeat(jnp.pad(x_LPKTH, ((0, 0), (0, 0), (0, 0), (0, grow), (0, 0))),
                                  n, axis=1)

            valid_BS = jnp.repeat(jnp.pad(cache.valid_BS, ((0, 0), (0, grow))), n, axis=0)
            cache = self._pin_cache(KVCache(grown(cache.k_LBKSH), grown(cache.v_LBKSH),
                                            valid_BS, cache.end))
            return cache, constrain(jnp.repeat(logits_PV, n, axis=0), self.sharding.rows_BT)

    # The prefill's cache is donated: the loop updates it in place (it comes back in
    # `Decoded.cache` only to alias it) instead of holding two copies.
    @functools.partial(jax.jit, static_argnames=("self",), donate_argnames=("cache",))
    def decode(self, params, cache: KVCache, logits_BV, positions_B, key,
               sampling: SamplingParams) -> Decoded:
        """Samples R tokens per row after `prefill`; stops early once every row has stopped
        (checked between chunks of `config.chunk_steps` steps).

        `positions_B` is each row's prompt length (the position of its first new token).
        """
        with self._mesh_context():
            return self._decode(self._model(params), cache, logits_BV, positions_B, key,
                                sampling)

    @functools.partial(jax.jit, static_argnames=("self", "read"), donate_argnames=("cache",))
    def step(self, params, cache: KVCache, tokens_B, positions_B, key, sampling: SamplingParams,
             read: int) -> tuple[jax.Array, KVCache]:
        """One decode step on its own, as the loop's body runs it (the cache's first `read`
        slots read): the sampled tokens [B] and the cache. The loop never calls it; it is
        what one token costs, for the planner's cost model."""
        with self._mesh_context():
            live_B = jnp.ones(tokens_B.shape, jnp.bool_)
            logits_BV, cache = _next_logits(self._model(params), cache, tokens_B, live_B,
                                            positions_B, read)
            tok_B, _ = sample_token(logits_BV, key, sampling, self.strategy)
            return tok_B, self._pin_cache(cache)

    def _decode(self, model, cache, logits_BV, positions_B, key, sampling) -> Decoded:
        config, shd = self.config, self.sharding
        b, r, w = logits_BV.shape[0], config.max_new_tokens, config.chunk_steps
        stop_ids = jnp.asarray(config.stop_ids or (-1,), jnp.int32)
        slots = cache.k_LBKSH.shape[3]
        prefixes = config.read_prefixes(slots)

        def record(s: DecodeState, logits_BV, cache) -> DecodeState:
            live_B = ~s.done_B & (s.step < r)  # the steps past R of the last chunk write pads
            tok_B, logp_B = sample_token(logits_BV, jax.random.fold_in(key, s.step), sampling,
                                         self.strategy)
            tok_B = jnp.where(live_B, tok_B, config.pad_id)
            logp_B = jnp.where(live_B, logp_B, 0.0)
            return DecodeState(
                step=s.step + 1,
                tokens_BR=jax.lax.dynamic_update_slice(s.tokens_BR, tok_B[:, None], (0, s.step)),
                logprobs_BR=jax.lax.dynamic_update_slice(s.logprobs_BR, logp_B[:, None],
                                                         (0, s.step)),
                lengths_B=s.lengths_B + live_B.astype(jnp.int32),
                done_B=s.done_B | (live_B & jnp.isin(tok_B, stop_ids)),
                cache=cache)

        def token_step(read: int):
            def body(_, s: DecodeState) -> DecodeState:
                last_B = jax.lax.dynamic_slice_in_dim(s.tokens_BR, s.step - 1, 1, axis=1)[:, 0]
                logits_BV, cache = _next_logits(model, s.cache, last_B, ~s.done_B,
                                                positions_B + s.step - 1, read)
                return record(s, logits_BV, cache.in_layout(model.options.platform))
            return body

        def more(s: DecodeState):
            return (s.step < r) & ~jnp.all(s.done_B)

        # One loop per cache prefix, in turn: its chunks' steps read the blocks a chunk can
        # have written by its end, a static slice. Loops in sequence rather than a switch
        # between chunk loops: XLA:TPU copies a buffer that passes through a conditional, and
        # the whole cache was copied in and out of every step (4 copies a token).
        def prefix_loop(index: int, read: int):
            chunk = functools.partial(jax.lax.fori_loop, 0, w, token_step(read))
            within = lambda s: more(s) & (config.read_index(s.cache.end, slots) == index)
            return functools.partial(jax.lax.while_loop, within, chunk)

        width = config.steps
        start = DecodeState(
            step=jnp.int32(0), tokens_BR=jnp.full((b, width), config.pad_id, jnp.int32),
            logprobs_BR=jnp.zeros((b, width), jnp.float32), lengths_B=jnp.zeros((b,), jnp.int32),
            done_B=jnp.zeros((b,), jnp.bool_), cache=cache)
        end = record(start, logits_BV, cache)
        for index, read in enumerate(prefixes):
            end = prefix_loop(index, read)(end)
        mask_BR = jnp.arange(r)[None, :] < end.lengths_B[:, None]
        rows = lambda x: constrain(x, shd.rows_BT if x.ndim == 2 else shd.rows_B)
        return Decoded(tokens_BR=rows(end.tokens_BR[:, :r]), mask_BR=rows(mask_BR),
                       logprobs_BR=rows(end.logprobs_BR[:, :r]), lengths_B=rows(end.lengths_B),
                       stopped_B=rows(end.done_B), cache=self._pin_cache(end.cache))


def _next_logits(model, cache: KVCache, tokens_B, live_B, positions_B, read: int):
    """The float32 logits [B, V] after one more token per row, and the cache it is written to
    (the first `read` slots read)."""
    logits_B1V, cache = model(tokens_B[:, None], live_B[:, None], positions_B[:, None], cache,
                              read_slots=read)
    return logits_B1V[:, 0], cache


# ----------------------------------------------------------------------------- host API


def decode_model(config: Qwen2Config, options: ModelOptions, table: ShardingConfig):
    """The graphdef of the rollout copy of a model built with `options`: parameters in the
    compute dtype, forward-only (no remat; nothing is differentiated), constraints from the
    decode table."""
    decode = dataclasses.replace(options, param_dtype=options.compute_dtype, remat=False,
                                 sharding=table, forward_only=True)
    return abstract_model(config, decode)[0]


def _axes(spec) -> tuple[str, ...]:
    """The mesh axes of a one-dimensional spec (the rows')."""
    return tuple(a for axes in spec for a in ((axes,) if isinstance(axes, str) else axes or ()))


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to [P, length] int32 tokens and a bool mask."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), np.bool_)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = p
            valid[i, length - len(p):] = True
    return tokens, valid


class Sampler:
    """The host side of sampling: buckets and pads prompts, places them, and runs a
    `SamplerLoop`, optionally over a device mesh.

    The parameters are passed per call (the trainer's own arrays, left on whatever shardings
    they have: nothing is copied). With a mesh, prompt rows go over the table's rows; the key
    and sampling parameters are replicated.
    """

    def __init__(self, graphdef, model_config: Qwen2Config, *, max_new_tokens: int,
                 stop_ids: Sequence[int], pad_id: int,
                 buckets: Sequence[int] = (128, 256, 512, 1024), mesh: Mesh | None = None,
                 cache_dtype: str | None = None, max_prompts_per_call: int | None = None,
                 sharding: ShardingConfig = FSDP_TP, param_dtype: str | None = None,
                 chunk: int = 16, cache_block: int | None = 128):
        self.config = SamplerConfig(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                                    pad_id=pad_id, buckets=tuple(buckets),
                                    cache_dtype=cache_dtype,
                                    max_prompts_per_call=max_prompts_per_call, chunk=chunk,
                                    cache_block=cache_block)
        self.model_config = model_config
        self.mesh = mesh
        self.graphdef = graphdef
        self.sharding = sharding
        self.param_dtype = None if param_dtype is None else jnp.dtype(param_dtype)
        self._copies: dict[Any, Any] = {}

    def loop(self, n: int, strategy: Strategy = Sampled()) -> SamplerLoop:
        """The static loop for n samples per prompt (equal loops share their compilations)."""
        return SamplerLoop(self.graphdef, self.config, n, self.mesh, self.sharding, strategy)

    def decode_params(self, params):
        """The parameters the loop decodes with: cast to `param_dtype` (when set) and placed
        on the table's parameter shardings (with a mesh), a new copy.

        Made once per `generate`, so the decode loop carries neither the trainer's float32
        master weights nor its FSDP shards (which XLA would gather into full float32 replicas
        held through the loop)."""
        structure = jax.tree.structure(params)
        if structure not in self._copies:  # one jitted copy per parameter tree
            dtype = self.param_dtype
            cast = lambda tree: jax.tree.map(lambda x: x if dtype is None else x.astype(dtype),
                                             tree)
            out = None if self.mesh is None else param_shardings(params, self.mesh,
                                                                 self.sharding)
            self._copies[structure] = jax.jit(cast, out_shardings=out)
        return self._copies[structure](params)

    @property
    def data_parallel(self) -> int:
        """Rows per call must be a multiple of this (the devices the rows go over)."""
        if self.mesh is None:
            return 1
        return int(np.prod([self.mesh.shape[a] for a in _axes(self.sharding.rows_B)]))

    def bucket_for(self, length: int) -> int:
        for b in self.config.buckets:
            if length <= b:
                return b
        raise ConfigError(f"a prompt of {length} tokens is longer than the largest prompt "
                          f"bucket ({self.config.buckets[-1]}); raise data.prompt_buckets or "
                          "filter long prompts")

    def _put(self, x: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(x)
        return put_global(x, batch_sharding(self.mesh, x.ndim, self.sharding))

    def sample_padded(self, state, tokens_PT: np.ndarray, valid_PT: np.ndarray, *,
                      key: jax.Array, params: SamplingParams, n: int,
                      strategy: Strategy = Sampled()) -> SampleOutput:
        """One prefill + decode over already padded prompts (P a multiple of data_parallel),
        on parameters already in the decode layout (`decode_params`)."""
        if tokens_PT.shape[0] % self.data_parallel:
            raise ConfigError(f"{tokens_PT.shape[0]} prompts do not divide over the "
                              f"{self.data_parallel} data-parallel devices")
        positions_B = np.repeat(valid_PT.sum(axis=1).astype(np.int32), n)
        # The prefill does not sample: one compile serves every strategy.
        cache, logits_BV = self.loop(n).prefill(state, self._put(tokens_PT), self._put(valid_PT))
        out = self.loop(n, strategy).decode(state, cache, logits_BV, self._put(positions_B), key,
                                            params)
        return SampleOutput(out.tokens_BR, out.mask_BR, out.logprobs_BR, out.lengths_B,
                            out.stopped_B, self._put(np.repeat(tokens_PT, n, axis=0)),
                            self._put(np.repeat(valid_PT, n, axis=0)))

    def generate(self, state, prompts: Sequence[Sequence[int]], *, key: jax.Array,
                 n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
                 ) -> SampleOutput:
        """n samples for each prompt (token id lists); B = len(prompts) * n rows.

        Prompts are left-padded to the smallest bucket that holds the longest of each call
        and processed `max_prompts_per_call` at a time (rounded up to a multiple of the
        data-parallel size; a short last call is padded with copies of its first prompt, whose
        rows are dropped).
        """
        if not prompts:
            raise ConfigError("generate() needs at least one prompt")
        if n < 1:
            raise ConfigError(f"n={n}; it must be at least 1")
        params = SamplingParams.make(temperature, top_p, top_k)
        strategy = strategy_for(temperature, top_p, top_k)
        state = self.decode_params(state)
        dp = self.data_parallel
        size = min(self.config.max_prompts_per_call or len(prompts), len(prompts))
        size = -(-size // dp) * dp  # every call the same shape, a multiple of dp
        outputs = []
        for index, start in enumerate(range(0, len(prompts), size)):
            chunk = list(prompts[start: start + size])
            real = len(chunk)
            chunk += [chunk[0]] * (size - real)
            bucket = self.bucket_for(max(len(p) for p in chunk))
            tokens, valid = pad_prompts(chunk, bucket, self.config.pad_id)
            out = self.sample_padded(state, tokens, valid, key=jax.random.fold_in(key, index),
                                     params=params, n=n, strategy=strategy)
            outputs.append((out, real * n))
        if len(outputs) == 1 and outputs[0][1] == outputs[0][0].tokens.shape[0]:
            return outputs[0][0]
        return _concat_rows(outputs, self.config.pad_id)


def _concat_rows(outputs, pad_id: int) -> SampleOutput:
    """Joins per-call outputs, keeping each call's first `rows` rows; prompts are re-padded
    (on the left) to the widest bucket used."""
    width = max(o.prompt_tokens.shape[1] for o, _ in outputs)
    fill = {"prompt_tokens": pad_id, "prompt_mask": False}
    fields = []
    for name in SampleOutput._fields:
        parts = []
        for o, rows in outputs:
            x = getattr(o, name)[:rows]
            if name in fill:
                x = jnp.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=fill[name])
            parts.append(x)
        fields.append(jnp.concatenate(parts, axis=0))
    return SampleOutput(*fields)
