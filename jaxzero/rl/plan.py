"""Memory planner: per-device memory of a run, from ahead-of-time compilation on abstract inputs.

Nothing is allocated: the model, optimizer state and batch are `jax.ShapeDtypeStruct`s with
their shardings, and the train step and the sampler's whole decode loop (on the rollout's
decode copy and layout) are lowered and compiled for the mesh. Parameter, optimizer,
reference, decode-copy and KV-cache sizes are computed from shapes and shardings; the train
step's and sampler's temporaries (activations, gradients, logits) come from XLA's compiled
memory analysis of the per-device program.

XLA:CPU's memory analysis does not reflect rematerialisation (its figure is the same with and
without `jax.checkpoint`), so the planner also counts the train step's activations from shapes
(`train_activations`), remat-aware: on CPU that computed figure is the one to trust for GPU and
TPU, and XLA's is an upper bound.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxzero.rl import grpo
from jaxzero.model.qwen2 import KVCache, ModelOptions, abstract_model
from jaxzero.model.config import Qwen2Config
from jaxzero.model.sampler import Sampler, decode_model
from jaxzero.model.sampling import Sampled, SamplingParams
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

    def train_rows(self, shards: int) -> tuple[int, int]:
        """(sequences, tokens) of one row of a micro-batch on one device, at the widest: a
        padded rollout (trimming only narrows it), or one packed row of the token budget."""
        if self.micro_batch_tokens is not None:
            return 1, self.micro_batch_tokens
        return (math.ceil(self.prompts_per_step * self.n / shards / self.micro_batches),
                self.prompt_len + self.response_len)


@dataclasses.dataclass(frozen=True)
class PlanReport:
    devices: int
    mesh: dict[str, int]
    params: int             # computed
    opt_state: int          # computed
    reference: int          # computed
    decode_copy: int        # computed: the rollout's copy of the policy (compute dtype)
    decode_layout: str      # the copy's layout (rollout.decode_layout resolved)
    kv_cache: int           # computed
    train_activations: int  # computed: activations, logits chunk, gradients (remat-aware)
    train_temp: int         # XLA memory analysis of the update
    train_peak: int         # arguments + outputs - aliased + temporaries of the update (XLA)
    sampler_temp: int       # XLA memory analysis of the whole decode loop
    logprob_activations: int  # computed: one micro-batch of a log-prob pass, forward only
    logprob_temp: int       # XLA memory analysis of a log-prob pass (reference or old)
    total_train_phase: int      # computed: params + optimizer + reference + activations
    total_rollout_phase: int
    total_logprob_phase: int    # computed: params + optimizer + reference + its activations
    xla_train_phase: int        # XLA's figure for the same phase

    @property
    def peak(self) -> int:
        return max(self.total_train_phase, self.total_rollout_phase, self.total_logprob_phase)


def train_activations(config: Qwen2Config, inputs: PlanInputs, mesh: Mesh,
                      param_bytes: int, logit_chunk: int = 128) -> int:
    """Per-device bytes the update needs beyond its inputs, counted from shapes.

    Per micro-batch of `seqs` sequences of `length` tokens: with remat, every block's input
    is kept and one block's internals at a time are rebuilt for its backward pass (attention
    scores and probabilities in float32 with their gradient, the q/k/v, attention and MLP
    activations); without remat every block's internals are kept. Plus one chunk of float32
    logits with its softmax and gradient, and the gradients (twice with micro-batching: the
    accumulator and the current micro-batch's).
    """
    seqs, length = inputs.train_rows(mesh.shape["data"] * mesh.shape["fsdp"])
    block, logits = _block_and_logits(config, inputs, mesh, seqs, length, logit_chunk)
    inputs_kept = config.num_hidden_layers * seqs * length * config.hidden_size * \
        np.dtype(inputs.compute_dtype).itemsize
    acts = inputs_kept + (block if inputs.remat else config.num_hidden_layers * block)
    grads = param_bytes * (2 if inputs.micro_batches > 1 else 1)
    return int(acts + 3 * logits + grads)


def logprob_activations(config: Qwen2Config, inputs: PlanInputs, mesh: Mesh,
                        logit_chunk: int = 128) -> int:
    """Per-device bytes of a log-prob pass beyond its inputs, counted from shapes: one
    micro-batch, forward only, so one block's internals (no gradient), the residual stream
    in and out, one chunk of float32 logits with its softmax, and the [M·B, N] output."""
    seqs, length = inputs.train_rows(mesh.shape["data"] * mesh.shape["fsdp"])
    block, logits = _block_and_logits(config, inputs, mesh, seqs, length, logit_chunk)
    stream = 2 * seqs * length * config.hidden_size * np.dtype(inputs.compute_dtype).itemsize
    out = inputs.prompts_per_step * inputs.n * inputs.response_len * 4 / \
        (mesh.shape["data"] * mesh.shape["fsdp"])
    return int(block * 2 / 3 + stream + 2 * logits + out)


def _block_and_logits(config, inputs, mesh, seqs, length, logit_chunk):
    """Bytes of one block's internals with their gradient (attention scores and
    probabilities in float32, q/k/v, attention and MLP activations), and of one float32
    logits chunk, for `seqs` rows of `length` tokens on one device."""
    tp = mesh.shape["tensor"]
    cb = np.dtype(inputs.compute_dtype).itemsize
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    n, k = config.num_attention_heads / tp, config.num_key_value_heads
    scores = seqs * n * length * length * 4 * 3
    internals = seqs * length * (4 * d + (2 * n + 2 * k) * h + 3 * f / tp) * cb
    return scores + internals, seqs * logit_chunk * config.vocab_size / tp * 4


def _rollout(config: Qwen2Config, inputs: PlanInputs, options: ModelOptions, mesh: Mesh,
             device_bytes: int | None) -> tuple[int, int, int, str]:
    """The rollout phase as the trainer runs it: its decode copy's and KV cache's bytes per
    device, the compiled decode loop's temporaries, and the copy's layout."""
    compute = jnp.dtype(inputs.compute_dtype)
    layout = choose_decode_layout(inputs.decode_layout, config.num_params() * compute.itemsize,
                                  device_bytes, mesh, jax.local_device_count())
    table = decode_table(layout)
    sampler = Sampler(decode_model(config, options, table), config, mesh=mesh,
                      max_new_tokens=inputs.response_len, stop_ids=(), pad_id=0,
                      buckets=(inputs.prompt_len,), cache_dtype=inputs.cache_dtype,
                      sharding=table, param_dtype=compute.name, chunk=inputs.decode_chunk,
                      cache_block=inputs.cache_block)
    _, abstract = abstract_model(config, options)
    copy = abstract_on(jax.eval_shape(lambda t: jax.tree.map(lambda x: x.astype(compute), t),
                                      abstract), param_shardings(abstract, mesh, table))
    rows = inputs.rollout_micro_batch or inputs.prompts_per_step * inputs.n
    slots = sampler.config.cache_slots(inputs.prompt_len)
    cache = abstract_on(jax.eval_shape(lambda: KVCache.empty(
        config, rows, slots, jnp.dtype(inputs.cache_dtype or compute))),
        KVCache.shardings(config, mesh, table))
    rows_B = batch_sharding(mesh, 1, table)
    loop = sampler.loop(inputs.n, Sampled(top_k=inputs.top_k > 0, top_p=inputs.top_p < 1))
    decode = loop.decode.lower(
        loop, copy, cache,
        jax.ShapeDtypeStruct((rows, config.vocab_size), jnp.float32,
                             sharding=batch_sharding(mesh, 2, table)),
        jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rows_B), jax.random.key(0),
        SamplingParams.make(1.0, inputs.top_p, inputs.top_k)).compile().memory_analysis()
    return (bytes_per_device(copy, jax.tree.map(lambda x: x.sharding, copy)),
            bytes_per_device(cache, jax.tree.map(lambda x: x.sharding, cache)),
            int(decode.temp_size_in_bytes), layout)


def plan_memory(config: Qwen2Config, inputs: PlanInputs, mesh: Mesh,
                sharding: ShardingConfig = FSDP_TP,
                device_bytes: int | None = None) -> PlanReport:
    """`device_bytes`: one device's memory, for rollout.decode_layout auto (None: as the CPU
    reports, none)."""
    options = ModelOptions(param_dtype=jnp.dtype(inputs.param_dtype),
                           compute_dtype=jnp.dtype(inputs.compute_dtype), remat=inputs.remat,
                           sharding=sharding)
    graphdef, abstract = abstract_model(config, options)
    optimizer = make_optimizer(lr=1e-6, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                               grad_clip=1.0)
    loss_config = grpo.LossConfig(use_kl_loss=inputs.use_kl)
    fns = build_step_functions(graphdef, abstract, optimizer, loss_config, mesh,
                               response_len=inputs.response_len,
                               micro_batches=inputs.micro_batches, sharding=sharding)
    params = abstract_on(abstract, fns.param_shardings)
    opt = abstract_on(jax.eval_shape(optimizer.init, abstract), fns.opt_shardings)
    b, t = inputs.prompts_per_step * inputs.n, inputs.prompt_len + inputs.response_len
    r, f32, i32 = inputs.response_len, jnp.float32, jnp.int32
    # The update and a log-prob pass at their widest: the padded batch (a trimmed one is no
    # wider), or every packed micro-batch the layout may use.
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
    stats = update.compile().memory_analysis()
    logprob_temp = int(logprobs.compile().memory_analysis().temp_size_in_bytes)
    train_temp = int(stats.temp_size_in_bytes)
    train_peak = int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                     - stats.alias_size_in_bytes + stats.temp_size_in_bytes)

    p_bytes = bytes_per_device(abstract, fns.param_shardings)
    o_bytes = bytes_per_device(jax.eval_shape(optimizer.init, abstract), fns.opt_shardings)
    ref_itemsize = np.dtype(inputs.ref_dtype).itemsize / np.dtype(inputs.param_dtype).itemsize
    ref_bytes = int(p_bytes * ref_itemsize) if inputs.use_kl else 0

    copy_bytes, kv_bytes, sampler_temp, layout = _rollout(config, inputs, options, mesh,
                                                         device_bytes)
    activations = train_activations(config, inputs, mesh, p_bytes)
    lp_activations = logprob_activations(config, inputs, mesh)
    return PlanReport(
        devices=mesh.size, mesh=dict(mesh.shape), params=p_bytes, opt_state=o_bytes,
        reference=ref_bytes, decode_copy=copy_bytes, decode_layout=layout, kv_cache=kv_bytes,
        train_activations=activations,
        train_temp=train_temp, train_peak=train_peak, sampler_temp=sampler_temp,
        logprob_activations=lp_activations, logprob_temp=logprob_temp,
        total_train_phase=p_bytes + o_bytes + ref_bytes + activations,
        total_rollout_phase=p_bytes + o_bytes + ref_bytes + copy_bytes + kv_bytes + sampler_temp,
        total_logprob_phase=p_bytes + o_bytes + ref_bytes + lp_activations,
        xla_train_phase=train_peak + ref_bytes)


def format_report(name: str, report: PlanReport, inputs: PlanInputs,
                  device_memory_gib: float | None = None) -> str:
    g = lambda x: f"{x / GiB:8.2f} GiB"
    lines = [
        f"memory plan for {name}: {report.devices} devices, mesh {report.mesh}",
        f"  batch {inputs.prompts_per_step} prompts x {inputs.n} rollouts, prompt "
        f"{inputs.prompt_len} + response {inputs.response_len} tokens, "
        + (f"{inputs.micro_batches} micro-batches" if inputs.micro_batch_tokens is None else
           f"packed micro-batches of {inputs.micro_batch_tokens} tokens per device")
        + f", remat {'block' if inputs.remat else 'none'}, "
        f"params {inputs.param_dtype}, compute {inputs.compute_dtype}",
        "  per device                          source",
        f"  parameters              {g(report.params)}   computed from shapes and shardings",
        f"  optimizer state (Adam)  {g(report.opt_state)}   computed",
        f"  reference model         {g(report.reference)}   computed ({inputs.ref_dtype})",
        f"  rollout copy of policy  {g(report.decode_copy)}   computed ({inputs.compute_dtype}, "
        f"{report.decode_layout})",
        f"  KV cache (rollouts)     {g(report.kv_cache)}   computed",
        f"  train activations+grads {g(report.train_activations)}   computed from shapes "
        "(remat-aware)",
        f"  train step temporaries  {g(report.train_temp)}   XLA memory analysis "
        "(on CPU it ignores remat: an upper bound)",
        f"  decode loop temporaries {g(report.sampler_temp)}   XLA memory analysis of the "
        "compiled decode loop",
        f"  log-prob activations    {g(report.logprob_activations)}   computed (reference and "
        "old passes, a micro-batch at a time)",
        f"  log-prob temporaries    {g(report.logprob_temp)}   XLA memory analysis",
        f"  train phase peak        {g(report.total_train_phase)}   computed",
        f"  train phase, XLA        {g(report.xla_train_phase)}   XLA args+outputs-aliased"
        "+temps, plus reference",
        f"  rollout phase peak      {g(report.total_rollout_phase)}   computed + XLA temps",
        f"  log-prob phase peak     {g(report.total_logprob_phase)}   computed",
        f"  peak                    {g(report.peak)}",
    ]
    if device_memory_gib:
        fits = report.peak / GiB <= device_memory_gib
        lines.append(f"  fits in {device_memory_gib:g} GiB per device: {'yes' if fits else 'NO'}")
    return "\n".join(lines)
