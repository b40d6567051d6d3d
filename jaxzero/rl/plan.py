"""Planner: every phase of a GRPO step compiled ahead of time on abstract inputs, for this
machine's devices or a TPU topology (`parallel.target`), with per-device memory and roofline
bounds.

Nothing is allocated and nothing runs: the model, optimizer state and batch are
`jax.ShapeDtypeStruct`s with their shardings, and the update, the log-prob pass, the prefill,
the whole decode loop and single decode steps (on the rollout's decode copy and layout) are
lowered and compiled for the mesh. Each phase's per-device peak is counted twice: from shapes
and shardings (resident state plus the activations the phase needs) and from XLA's memory
analysis of the compiled program (plus the state resident outside it). XLA's cost model
(FLOPs, bytes accessed) with the chip's public peaks gives each phase's roofline lower bound.

On a TPU target XLA:TPU's figures are the compiler's own for the real chip and the plan goes
by them. XLA:CPU's memory analysis ignores rematerialisation (its figure is the same with and
without `jax.checkpoint`) and fuses unlike GPUs and TPUs, so on CPU the computed figures are
the ones to trust.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxzero.rl import grpo
from jaxzero.model.qwen2 import KVCache, ModelOptions, abstract_model
from jaxzero.model.config import Qwen2Config
from jaxzero.model.sampler import Sampler, decode_model
from jaxzero.model.sampling import Sampled, SamplingParams
from jaxzero.parallel.loop_cost import loop_cost
from jaxzero.parallel.target import Chip
from jaxzero.parallel.sharding import (FSDP_TP, ShardingConfig, abstract_on, batch_sharding,
                                       bytes_per_device, choose_decode_layout, decode_table,
                                       param_shardings)
from jaxzero.rl.train_step import (RowLoss, Rows, TrainBatch, build_step_functions,
                                   make_optimizer)

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """The run sizes that decide memory."""

    prompts_per_step: int
    n: int
    prompt_len: int
    response_len: int
    micro_batches: int
    param_dtype: str
    compute_dtype: str
    ref_dtype: str
    remat: bool
    use_kl: bool
    rollout_micro_batch: int | None = None  # sequences per sampler call (None: whole batch)
    decode_layout: str = "auto"             # rollout.decode_layout
    decode_chunk: int = 16
    cache_block: int | None = 128
    cache_dtype: str | None = None
    top_k: int = 0
    top_p: float = 1.0
    micro_batch_tokens: int | None = None   # packed rows of this many tokens (grpo's)
    attention: str = "einsum"               # model.attention resolved for the target backend
    updates_per_step: int = 1

    def train_rows(self, shards: int) -> tuple[int, int]:
        """(sequences, tokens) of one row of a micro-batch on one device, at the widest: a
        padded rollout (trimming only narrows it), or one packed row of the token budget."""
        if self.micro_batch_tokens is not None:
            return 1, self.micro_batch_tokens
        return (math.ceil(self.prompts_per_step * self.n / shards / self.micro_batches),
                self.prompt_len + self.response_len)


def train_activations(config: Qwen2Config, inputs: PlanInputs, mesh: Mesh,
                      param_bytes: int, logit_chunk: int = 128) -> int:
    """Per-device bytes the update needs beyond its inputs, counted from shapes, at the larger
    of its two peaks (XLA:TPU's buffer listings show both).

    Held throughout a micro-batch of `seqs` sequences of `length` tokens: every block's input
    (kept for the backward) and, with micro-batching, the float32 gradient accumulator. On
    top of it, the larger of
    - the lm_head's backward: its weight gathered whole in the compute dtype (twice: for the
      forward and the backward), its float32 gradient whole before the reduce-scatter, and
      one chunk of float32 logits with their gradient;
    - the blocks' backward: one block's internals rebuilt (with remat; without, every
      block's are kept: attention scores and probabilities in float32 with their gradient
      unless splash, the q/k/v, attention and MLP activations) and the micro-batch's
      gradients.
    """
    seqs, length = inputs.train_rows(mesh.shape["data"] * mesh.shape["fsdp"])
    block, logits = _block_and_logits(config, inputs, mesh, seqs, length, logit_chunk)
    cb = np.dtype(inputs.compute_dtype).itemsize
    inputs_kept = config.num_hidden_layers * seqs * length * config.hidden_size * cb
    accumulator = param_bytes if inputs.micro_batches > 1 else 0
    lm_head = _vocab_weight_elements(config, mesh) * (2 * cb + 4) + 2 * logits
    blocks = (block if inputs.remat else config.num_hidden_layers * block) + param_bytes
    return int(inputs_kept + accumulator + max(lm_head, blocks))


def logprob_activations(config: Qwen2Config, inputs: PlanInputs, mesh: Mesh,
                        logit_chunk: int = 128) -> int:
    """Per-device bytes of a log-prob pass beyond its inputs, counted from shapes: one
    micro-batch, forward only, so one block's internals (no gradient), the residual stream
    in and out, the lm_head's weight gathered whole in the compute dtype, one chunk of
    float32 logits with its softmax, and the [M·B, N] output."""
    seqs, length = inputs.train_rows(mesh.shape["data"] * mesh.shape["fsdp"])
    block, logits = _block_and_logits(config, inputs, mesh, seqs, length, logit_chunk)
    cb = np.dtype(inputs.compute_dtype).itemsize
    stream = 2 * seqs * length * config.hidden_size * cb
    out = inputs.prompts_per_step * inputs.n * inputs.response_len * 4 / \
        (mesh.shape["data"] * mesh.shape["fsdp"])
    lm_head = _vocab_weight_elements(config, mesh) * cb
    return int(block * 2 / 3 + stream + lm_head + 2 * logits + out)


def _vocab_weight_elements(config: Qwen2Config, mesh: Mesh) -> float:
    """Elements of the lm_head's weight on one device once FSDP has gathered it: the whole
    [V, D], its vocabulary split over the tensor axis."""
    return config.vocab_size / mesh.shape["tensor"] * config.hidden_size


def _block_and_logits(config, inputs, mesh, seqs, length, logit_chunk):
    """Bytes of one block's internals with their gradient (attention scores and
    probabilities in float32 unless splash, q/k/v, attention and MLP activations), and of one float32
    logits chunk, for `seqs` rows of `length` tokens on one device."""
    tp = mesh.shape["tensor"]
    cb = np.dtype(inputs.compute_dtype).itemsize
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    n, k = config.num_attention_heads / tp, config.num_key_value_heads
    # Splash keeps no scores, only its float32 log-sum-exp residual per query.
    scores = seqs * n * length * (4 if inputs.attention == "splash" else length * 4 * 3)
    internals = seqs * length * (4 * d + (2 * n + 2 * k) * h + 3 * f / tp) * cb
    return scores + internals, seqs * logit_chunk * config.vocab_size / tp * 4


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-device work of one call of a compiled program, from XLA's cost model with every
    loop counted for its trip count (`parallel.loop_cost`; XLA's own figure charges a scanned
    program one layer of one micro-batch)."""

    flops: float
    bytes_accessed: float

    @classmethod
    def of(cls, compiled) -> "Cost":
        """The program's cost; none (zero) for a program XLA refused to compile."""
        if isinstance(compiled, Refused):
            return cls(0.0, 0.0)
        cost = loop_cost(compiled)
        return cls(cost.flops, cost.bytes_accessed)

    def scaled(self, factor: float) -> "Cost":
        return Cost(self.flops * factor, self.bytes_accessed * factor)

    def bound_s(self, chip: Chip) -> float:
        """Roofline lower bound: the slower of compute at the chip's bf16 peak and HBM
        traffic at its bandwidth."""
        return max(self.flops / chip.bf16_flops, self.bytes_accessed / chip.hbm_bandwidth)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a step at its per-device memory peak: what stays resident (policy,
    optimizer state, reference and, in the rollout, the decode copy and KV cache) plus the
    compiled program's own needs, counted two ways."""

    name: str
    computed: int       # from shapes and shardings
    xla: int            # resident state outside the program + the program's own bytes, from
                        # XLA's memory analysis (`program_bytes`)
    cost: Cost          # one call (the decode phase: one whole rollout call)
    calls: int          # calls per step
    knob: str           # what to change when it does not fit
    refused: str | None = None  # XLA's refusal when it would not compile the program for the
                                # chip's memory (then `xla` is what it said it needs, and
                                # `cost` is unknown: zero)


@dataclasses.dataclass(frozen=True)
class PlanReport:
    platform: str       # what XLA compiled for: "cpu" or "tpu"
    devices: int
    mesh: dict[str, int]
    params: int             # computed
    opt_state: int          # computed
    reference: int          # computed
    decode_copy: int        # computed: the rollout's copy of the policy (compute dtype)
    decode_layout: str      # the copy's layout (rollout.decode_layout resolved)
    kv_cache: int           # computed
    phases: tuple[Phase, ...]
    decode_token: Cost      # one decode step at the mean cache prefix read
    decode_hbm_bytes: int   # what one decode step must read: the copy and the mean cache prefix
    compile_s: float
    # The compiled programs by name (update, log-prob pass, prefill, decode loop, decode
    # step), for reading their HLO.
    programs: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False,
                                                 compare=False)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def planned(self, phase: Phase) -> int:
        """The figure the plan goes by: XLA:TPU's own on a TPU target (the compiler's memory
        analysis of the real chip's program), the computed one on CPU, whose XLA ignores
        remat and fuses differently from GPUs and TPUs."""
        return phase.xla if self.platform == "tpu" else phase.computed

    @property
    def peak(self) -> int:
        return max(self.planned(p) for p in self.phases)

    @property
    def resident(self) -> int:
        return self.params + self.opt_state + self.reference


KNOBS = {
    "update": "raise grpo.micro_batches (or lower grpo.micro_batch_tokens), set model.remat: "
              "block, or raise mesh.tensor",
    "log-prob pass": "raise grpo.micro_batches (or lower grpo.micro_batch_tokens)",
    "prefill": "set rollout.micro_batch (fewer rows per sampler call) or "
               "rollout.decode_layout: tensor",
    "decode loop": "set rollout.micro_batch (fewer rows per sampler call), "
                   "rollout.cache_dtype, or rollout.decode_layout: tensor",
}


@dataclasses.dataclass(frozen=True)
class Refused:
    """A program XLA refused to compile because it does not fit the chip's memory
    (XLA:TPU's RESOURCE_EXHAUSTED), with the bytes XLA said it needs."""

    needs: int          # per device, as XLA reported it (its figure at the refusal)
    message: str        # XLA's first line


_XLA_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def refused_needs(message: str) -> int | None:
    """The bytes an XLA:TPU out-of-memory refusal says the program needs ("the total memory
    required for HLO temporaries (19.00G)", or "Used 3.27G of 3.25G hbm"; G = GiB), None if
    the message says neither."""
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)|Used ([\d.]+)([KMGT]?) of", message)
    if m is None:
        return None
    value, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return int(float(value) * _XLA_UNITS[unit])


def _compiled_or_refused(compile_thunk):
    """`compile_thunk()`, or the Refused XLA's out-of-memory refusal of it describes."""
    try:
        return compile_thunk()
    except jax.errors.JaxRuntimeError as e:
        needs = refused_needs(str(e)) if "RESOURCE_EXHAUSTED" in str(e) else None
        if needs is None:
            raise
        return Refused(needs, str(e).strip().splitlines()[0])


def program_bytes(compiled) -> int:
    """Per-device bytes a compiled program needs: XLA's peak of the buffers live at once,
    arguments and outputs included (`peak_memory_in_bytes`, the temporaries' heap with its
    fragmentation), plus the program's code, which a TPU keeps in HBM (its "overlays").

    That is what XLA:TPU fits against the chip's memory: capped by
    `xla_tpu_max_hbm_size_mib`, it compiles a program exactly when this figure fits, within
    a few per cent (tests/parallel/test_tpu_target.py). Its `temp_size_in_bytes` counts more
    (arguments + temp came to 1.19x the "Used" of XLA:TPU's own refusal for 1.5B's update
    cut to 2 layers on v5p, BENCHMARKS.md), so it is not used. Where a backend reports no
    peak: arguments + outputs - aliased (donated) + temporaries."""
    if isinstance(compiled, Refused):
        return compiled.needs
    m = compiled.memory_analysis()
    if m.peak_memory_in_bytes > 0:
        return int(m.peak_memory_in_bytes + m.generated_code_size_in_bytes)
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def _argument_bytes(compiled) -> int:
    return int(compiled.memory_analysis().argument_size_in_bytes)


def rows_per_device(rows: int, mesh: Mesh, table: ShardingConfig) -> int:
    return batch_sharding(mesh, 1, table).shard_shape((rows,))[0]


def prefill_activations(config: Qwen2Config, inputs: PlanInputs, mesh: Mesh,
                        table: ShardingConfig, prompts: int) -> int:
    """Per-device bytes a prefill needs beyond the decode copy and the grown cache, from
    shapes: the prompts' own cache (before it grows and is repeated n times), one block's
    forward internals over the prompt (the heads and MLP split over the devices the rows are
    not), its attention scores and probabilities in float32 (none with splash), and the last
    position's float32 logits before and after the repeat."""
    cb = np.dtype(inputs.cache_dtype or inputs.compute_dtype).itemsize
    p, t = rows_per_device(prompts, mesh, table), inputs.prompt_len
    split = mesh.size * p / prompts
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    n, k = config.num_attention_heads, config.num_key_value_heads
    prompt_cache = 2 * config.num_hidden_layers * p * t * k * h * cb
    internals = p * t * (2 * d + ((n + 2 * k) * h + 2 * f) / split) * cb
    scores = 0 if inputs.attention == "splash" else 2 * p * n / split * t * t * 4
    logits = (p + p * inputs.n) * config.vocab_size * 4
    return int(prompt_cache + internals + scores + logits)


def decode_temporaries(config: Qwen2Config, inputs: PlanInputs, mesh: Mesh,
                       table: ShardingConfig, rows: int, slots: int) -> int:
    """Per-device bytes the decode loop needs beyond the copy and the cache, from shapes:
    the float32 logits of a step with the sampler's working copies of them, the loop state
    (tokens and log-probs of every step), and one layer's attention scores."""
    b = rows_per_device(rows, mesh, table)
    logits = 3 * b * config.vocab_size * 4
    state = b * (inputs.response_len + inputs.decode_chunk) * 8
    scores = b * config.num_attention_heads * slots * 4
    return int(logits + state + scores)


class TrainSetup(NamedTuple):
    """The abstract model, optimizer state and step functions the train phases compile, with
    their computed per-device bytes."""

    options: ModelOptions
    fns: Any                # train_step.StepFunctions
    params: Any             # abstract, with their shardings
    opt: Any
    param_bytes: int
    opt_bytes: int
    ref_bytes: int          # the frozen reference (0 without KL)


def train_setup(config: Qwen2Config, inputs: PlanInputs, mesh: Mesh,
                sharding: ShardingConfig = FSDP_TP) -> TrainSetup:
    options = ModelOptions(param_dtype=jnp.dtype(inputs.param_dtype),
                           compute_dtype=jnp.dtype(inputs.compute_dtype), remat=inputs.remat,
                           sharding=sharding, attention=inputs.attention,
                           platform=mesh.devices.flat[0].platform)
    graphdef, abstract = abstract_model(config, options)
    optimizer = make_optimizer(lr=1e-6, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                               grad_clip=1.0)
    fns = build_step_functions(graphdef, abstract, optimizer,
                               grpo.LossConfig(use_kl_loss=inputs.use_kl), mesh,
                               response_len=inputs.response_len,
                               micro_batches=inputs.micro_batches, sharding=sharding)
    abstract_opt = jax.eval_shape(optimizer.init, abstract)
    p_bytes = bytes_per_device(abstract, fns.param_shardings)
    ref_itemsize = np.dtype(inputs.ref_dtype).itemsize / np.dtype(inputs.param_dtype).itemsize
    return TrainSetup(options, fns, abstract_on(abstract, fns.param_shardings),
                      abstract_on(abstract_opt, fns.opt_shardings), p_bytes,
                      bytes_per_device(abstract_opt, fns.opt_shardings),
                      int(p_bytes * ref_itemsize) if inputs.use_kl else 0)


def plan_memory(config: Qwen2Config, inputs: PlanInputs, mesh: Mesh,
                sharding: ShardingConfig = FSDP_TP, device_bytes: int | None = None,
                host_devices: int | None = None) -> PlanReport:
    """Compiles every phase of a step for `mesh` (whatever its devices: this machine's, or a
    TPU topology's, compiled deviceless) and counts its per-device memory.

    `device_bytes`: one device's memory, for rollout.decode_layout auto (None: as the CPU
    reports, none); `host_devices`: devices per host, the span a tensor decode layout may take
    (None: this process's)."""
    started = time.perf_counter()
    train = train_setup(config, inputs, mesh, sharding)
    # The rollout first: a decode layout the mesh cannot take is refused before the minutes
    # the train programs take to compile.
    rollout = _rollout(config, inputs, train.options, mesh, device_bytes,
                       host_devices or jax.local_device_count())
    update, logprobs = (_compiled_or_refused(lowered.compile) for lowered in
                        _train_lowered(train.fns, train.params, train.opt, inputs, mesh))
    p_bytes, o_bytes, ref_bytes = train.param_bytes, train.opt_bytes, train.ref_bytes
    resident = p_bytes + o_bytes + ref_bytes

    train_acts = train_activations(config, inputs, mesh, p_bytes)
    # The update's arguments are the policy, its optimizer state and the batch; the log-prob
    # pass's the policy (or the reference) and the batch; the rest stays resident.
    rows = inputs.rollout_micro_batch or inputs.prompts_per_step * inputs.n
    calls = math.ceil(inputs.prompts_per_step * inputs.n / rows)
    passes = int(inputs.use_kl) + int(inputs.updates_per_step > 1)
    rollout_resident = resident + rollout.copy + rollout.kv
    refusal = lambda program: program.message if isinstance(program, Refused) else None
    phases = (
        Phase("update", resident + train_acts, ref_bytes + program_bytes(update),
              Cost.of(update), inputs.updates_per_step, KNOBS["update"], refusal(update)),
        Phase("log-prob pass", resident + logprob_activations(config, inputs, mesh),
              o_bytes + ref_bytes + program_bytes(logprobs), Cost.of(logprobs), passes,
              KNOBS["log-prob pass"], refusal(logprobs)),
        Phase("prefill", rollout_resident + rollout.prefill_acts,
              resident + program_bytes(rollout.prefill), Cost.of(rollout.prefill),
              calls, KNOBS["prefill"], refusal(rollout.prefill)),
        Phase("decode loop", rollout_resident + rollout.decode_temps,
              resident + program_bytes(rollout.decode),
              rollout.token.scaled(inputs.response_len), calls, KNOBS["decode loop"],
              refusal(rollout.decode)),
    )
    return PlanReport(
        platform=mesh.devices.flat[0].platform, devices=mesh.size, mesh=dict(mesh.shape),
        params=p_bytes, opt_state=o_bytes, reference=ref_bytes, decode_copy=rollout.copy,
        decode_layout=rollout.layout, kv_cache=rollout.kv, phases=phases,
        decode_token=rollout.token, decode_hbm_bytes=rollout.hbm_bytes,
        compile_s=time.perf_counter() - started,
        programs={"update": update, "log-prob pass": logprobs, "prefill": rollout.prefill,
                  "decode loop": rollout.decode, "decode step": rollout.step})


def train_programs(fns, params, opt, inputs: PlanInputs, mesh: Mesh,
                   compiler_options: dict | None = None):
    """The compiled update and log-prob pass at their widest: the padded batch (a trimmed one
    is no wider), or every packed micro-batch the layout may use. `compiler_options` go to
    both compiles (XLA flags, e.g. `xla_tpu_max_hbm_size_mib`)."""
    return tuple(lowered.compile(compiler_options=compiler_options)
                 for lowered in _train_lowered(fns, params, opt, inputs, mesh))


def _train_lowered(fns, params, opt, inputs: PlanInputs, mesh: Mesh):
    """The update and log-prob pass of `train_programs`, lowered."""
    b, t = inputs.prompts_per_step * inputs.n, inputs.prompt_len + inputs.response_len
    r, f32, i32 = inputs.response_len, jnp.float32, jnp.int32
    if inputs.micro_batch_tokens is None:
        batch = abstract_on(TrainBatch(
            tokens_BT=jax.ShapeDtypeStruct((b, t), i32),
            valid_BT=jax.ShapeDtypeStruct((b, t), jnp.bool_),
            response_mask_BR=jax.ShapeDtypeStruct((b, r), f32),
            advantages_B=jax.ShapeDtypeStruct((b,), f32),
            old_logp_BR=jax.ShapeDtypeStruct((b, r), f32),
            ref_logp_BR=jax.ShapeDtypeStruct((b, r), f32)), fns.batch_shardings)
        update = fns.update.lower(params, opt, batch)
        logprobs = fns.logprobs.lower(params, batch.tokens_BT, batch.valid_BT)
    else:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        mkw = (math.ceil(b / shards), shards, inputs.micro_batch_tokens)
        rows = abstract_on(Rows(*[jax.ShapeDtypeStruct(mkw, i32)] * 5,
                                jax.ShapeDtypeStruct(mkw[:1], i32)), fns.row_shardings)
        loss = abstract_on(RowLoss(*[jax.ShapeDtypeStruct(mkw, f32)] * 5),
                           fns.row_loss_shardings)
        update = fns.row_update.lower(params, opt, rows, loss)
        logprobs = fns.row_logprobs.lower(params, rows)
    return update, logprobs


class _Rollout(NamedTuple):
    copy: int               # computed bytes of the decode copy
    kv: int                 # computed bytes of the KV cache
    layout: str
    prefill: Any            # compiled
    decode: Any             # compiled whole decode loop
    token: Cost             # one step at the mean read prefix
    step: Any               # compiled decode step at the last prefix
    hbm_bytes: int          # the copy plus the mean cache prefix, per device
    prefill_acts: int       # computed
    decode_temps: int       # computed


class DecodeSetup(NamedTuple):
    """The rollout's decode as the trainer runs it, abstract: its sampler and loop on the
    decode copy and layout, and the shapes one sampler call takes."""

    sampler: Sampler
    loop: Any               # the SamplerLoop of the run's strategy
    layout: str             # rollout.decode_layout resolved
    copy: Any               # the decode copy of the policy, ShapeDtypeStructs
    cache: KVCache          # the grown cache, ShapeDtypeStructs
    prompts: int            # prompts per sampler call (padded to the data-parallel devices)
    rows: int               # rows per sampler call (prompts · n)
    slots: int              # cache slots
    sampling: SamplingParams

    @property
    def copy_bytes(self) -> int:
        """Per-device bytes of the decode copy."""
        return bytes_per_device(self.copy, jax.tree.map(lambda x: x.sharding, self.copy))

    @property
    def cache_bytes(self) -> int:
        """Per-device bytes of the KV cache."""
        return bytes_per_device(self.cache, jax.tree.map(lambda x: x.sharding, self.cache))

    def step_program(self, read: int):
        """The compiled standalone decode step reading the cache's first `read` slots."""
        positions = jax.ShapeDtypeStruct((self.rows,), jnp.int32,
                                         sharding=batch_sharding(self.loop.mesh, 1,
                                                                 self.loop.sharding))
        return self.loop.step.lower(self.loop, self.copy, self.cache, positions, positions,
                                    jax.random.key(0), self.sampling, read).compile()


def decode_setup(config: Qwen2Config, inputs: PlanInputs, options: ModelOptions, mesh: Mesh,
                 device_bytes: int | None, host_devices: int) -> DecodeSetup:
    """The decode of one sampler call at `inputs`' shape, on the layout the trainer picks."""
    compute = jnp.dtype(inputs.compute_dtype)
    layout = choose_decode_layout(inputs.decode_layout, config.num_params() * compute.itemsize,
                                  device_bytes, mesh, host_devices)
    table = decode_table(layout)
    sampler = Sampler(decode_model(config, options, table), config, mesh=mesh,
                      max_new_tokens=inputs.response_len, stop_ids=(), pad_id=0,
                      buckets=(inputs.prompt_len,), cache_dtype=inputs.cache_dtype,
                      sharding=table, param_dtype=compute.name, chunk=inputs.decode_chunk,
                      cache_block=inputs.cache_block)
    _, abstract = abstract_model(config, options)
    copy = abstract_on(jax.eval_shape(lambda t: jax.tree.map(lambda x: x.astype(compute), t),
                                      abstract), param_shardings(abstract, mesh, table))
    # Each sampler call takes a multiple of the devices its rows go over, padding the prompts
    # with repeats as `Sampler.generate` does.
    asked = (inputs.rollout_micro_batch or inputs.prompts_per_step * inputs.n) // inputs.n
    dp = sampler.data_parallel
    prompts = -(-max(asked, 1) // dp) * dp
    rows = prompts * inputs.n
    slots = sampler.config.cache_slots(inputs.prompt_len)
    cache = abstract_on(jax.eval_shape(lambda: KVCache.empty(
        config, rows, slots, jnp.dtype(inputs.cache_dtype or compute))),
        KVCache.shardings(config, mesh, table))
    loop = sampler.loop(inputs.n, Sampled(top_k=inputs.top_k > 0, top_p=inputs.top_p < 1))
    return DecodeSetup(sampler, loop, layout, copy, cache, prompts, rows, slots,
                       SamplingParams.make(1.0, inputs.top_p, inputs.top_k))


def _rollout(config: Qwen2Config, inputs: PlanInputs, options: ModelOptions, mesh: Mesh,
             device_bytes: int | None, host_devices: int) -> _Rollout:
    """The rollout phase as the trainer runs it, on its decode copy and layout: the compiled
    prefill, decode loop and single decode steps (at the first and last cache prefix a chunk
    reads: a step's cost is linear in the prefix), and the copy's and cache's bytes."""
    setup = decode_setup(config, inputs, options, mesh, device_bytes, host_devices)
    sampler, loop, copy, cache = setup.sampler, setup.loop, setup.copy, setup.cache
    table, rows, slots = sampler.sharding, setup.rows, setup.slots
    rows_B, rows_BT = batch_sharding(mesh, 1, table), batch_sharding(mesh, 2, table)
    key, positions = jax.random.key(0), jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rows_B)
    prompt = jax.ShapeDtypeStruct((setup.prompts, inputs.prompt_len), jnp.int32,
                                  sharding=rows_BT)
    prefill_loop = sampler.loop(inputs.n)  # the prefill does not sample (one compile for all)
    prefill = _compiled_or_refused(prefill_loop.prefill.lower(
        prefill_loop, copy, prompt,
        jax.ShapeDtypeStruct(prompt.shape, jnp.bool_, sharding=rows_BT)).compile)
    decode = _compiled_or_refused(loop.decode.lower(
        loop, copy, cache, jax.ShapeDtypeStruct((rows, config.vocab_size), jnp.float32,
                                                sharding=rows_BT),
        positions, key, setup.sampling).compile)
    prefixes = sampler.config.read_prefixes(slots)
    first, last = (_compiled_or_refused(lambda read=read: setup.step_program(read))
                   for read in (prefixes[0], prefixes[-1]))
    token = Cost.of(first).scaled(0.5)
    token = Cost(token.flops + Cost.of(last).flops / 2,
                 token.bytes_accessed + Cost.of(last).bytes_accessed / 2)
    copy_bytes, kv_bytes = setup.copy_bytes, setup.cache_bytes
    # The share of the cache a step must read: the prompt and, on average, half the steps.
    mean_read = (inputs.prompt_len + sampler.config.steps / 2) / slots
    return _Rollout(copy_bytes, kv_bytes, setup.layout, prefill, decode, token, last,
                    int(copy_bytes + mean_read * kv_bytes),
                    prefill_activations(config, inputs, mesh, table, setup.prompts),
                    decode_temporaries(config, inputs, mesh, table, rows, slots))


def format_report(name: str, report: PlanReport, inputs: PlanInputs,
                  chip: Chip | None = None, device_memory_gib: float | None = None) -> str:
    """The plan as text: resident state, each phase's peak computed and by XLA, whether it
    fits (the chip's HBM, or `device_memory_gib`) and, with a chip, roofline bounds."""
    g = lambda x: f"{x / GiB:7.2f} GiB"
    xla = "XLA:TPU" if report.platform == "tpu" else "XLA:CPU"
    lines = [
        f"plan for {name}: {report.devices} {report.platform} devices, mesh {report.mesh}"
        + (f", {chip.name} ({chip.hbm_bytes / GiB:g} GiB HBM per device)" if chip else ""),
        f"  batch {inputs.prompts_per_step} prompts x {inputs.n} rollouts, prompt "
        f"{inputs.prompt_len} + response {inputs.response_len} tokens, "
        + (f"{inputs.micro_batches} micro-batches" if inputs.micro_batch_tokens is None else
           f"packed micro-batches of {inputs.micro_batch_tokens} tokens per device")
        + f", remat {'block' if inputs.remat else 'none'}, params {inputs.param_dtype}, "
        f"compute {inputs.compute_dtype}, attention {inputs.attention}",
        "  resident per device (computed from shapes and shardings)",
        f"    parameters              {g(report.params)}",
        f"    optimizer state (Adam)  {g(report.opt_state)}",
        f"    reference model         {g(report.reference)}   ({inputs.ref_dtype})",
        f"    rollout copy of policy  {g(report.decode_copy)}   ({inputs.compute_dtype}, "
        f"{report.decode_layout}; rollout phases only)",
        f"    KV cache                {g(report.kv_cache)}   (rollout phases only)",
        f"  peak per device by phase    computed   {xla:>11}   {xla}/computed",
    ]
    for p in report.phases:
        lines.append(f"    {p.name:<22} {g(p.computed)}   {g(p.xla)}   "
                     f"{p.xla / max(p.computed, 1):5.2f}"
                     + ("   (refused by XLA: what it said it needs)" if p.refused else ""))
    source = f"{xla}'s" if report.platform == "tpu" else "the computed"
    lines.append(f"  peak                       {g(report.peak)}   ({source} figures: "
                 + ("the compiler's own for the chip)" if report.platform == "tpu" else
                    "XLA:CPU ignores remat and fuses unlike GPUs and TPUs)"))
    memory = chip.hbm_bytes if chip else (device_memory_gib or 0) * GiB
    if memory:
        lines += fits_lines(report, memory)
    if chip:
        lines += roofline_lines(report, inputs, chip)
    lines.append(f"  compiled in {report.compile_s:.0f} s")
    return "\n".join(lines)


def fits_lines(report: PlanReport, memory: float) -> list[str]:
    over = [(p, report.planned(p) - memory) for p in report.phases if report.planned(p) > memory]
    if not over:
        return [f"  fits: yes, every phase within {memory / GiB:g} GiB per device "
                f"({(memory - report.peak) / GiB:.2f} GiB to spare at the peak)"]
    lines = [f"  fits: NO, {len(over)} phase(s) over {memory / GiB:g} GiB per device"]
    for p, excess in over:
        lines.append(f"    {p.name}: {excess / GiB:.2f} GiB over; {p.knob}")
        if p.refused:
            lines.append(f"      (XLA:TPU would not compile it: {p.refused})")
    if report.resident > memory:
        lines.append(f"    the policy, optimizer state and reference alone take "
                     f"{report.resident / GiB:.2f} GiB: shard over more devices (mesh.fsdp)")
    return lines


def roofline_lines(report: PlanReport, inputs: PlanInputs, chip: Chip) -> list[str]:
    """Lower bounds from XLA's cost model at the chip's peaks: not timings."""
    lines = [f"  roofline lower bounds per device ({chip.name}: {chip.bf16_flops / 1e12:g} "
             f"bf16 TFLOP/s, {chip.hbm_bandwidth / 1e9:g} GB/s HBM); bounds from XLA's cost "
             "model, not timings",
             "    phase                     TFLOP      GB   bound/call  calls  bound/step"]
    step = 0.0
    for p in report.phases:
        if p.refused:
            lines.append(f"    {p.name:<22} no bound: XLA:TPU would not compile it (it does "
                         "not fit)")
            continue
        bound = p.cost.bound_s(chip)
        step += bound * p.calls
        lines.append(f"    {p.name:<22} {p.cost.flops / 1e12:9.3f} {p.cost.bytes_accessed / 1e9:7.2f}"
                     f"   {bound:9.4f} s  {p.calls:5d}  {bound * p.calls:9.4f} s")
    if report.decode_token.bytes_accessed:  # none when XLA would not compile the step
        token = report.decode_token.bound_s(chip)
        hbm = report.decode_hbm_bytes / chip.hbm_bandwidth
        lines.append(f"    decode, one token          {report.decode_token.flops / 1e12:9.3f} "
                     f"{report.decode_token.bytes_accessed / 1e9:7.2f}   {token * 1e3:9.3f} ms; "
                     f"HBM bound (decode copy + mean cache read) {hbm * 1e3:.3f} ms: "
                     f"{token / hbm:.2f}x")
    if any(p.refused for p in report.phases):
        lines.append("  no step lower bound: a phase does not fit")
        return lines
    tokens = inputs.prompts_per_step * inputs.n * (inputs.prompt_len + inputs.response_len)
    lines.append(f"  step lower bound {step:.2f} s: at most {tokens / step / report.devices:,.0f} "
                 "tokens/s per device (prompt + response tokens)")
    return lines
