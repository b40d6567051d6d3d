"""The jitted pieces of a GRPO step: completion log-probs and the sharded, donated update.

Shapes as in `jaxzero.model.qwen2`: B rows, T = prompt bucket + R response slots.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxzero.rl import grpo
from jaxzero.parallel.sharding import (FSDP_TP, ShardingConfig, batch_sharding, follow_params,
                                       param_shardings, replicated, traced_under, undivided)


class TrainBatch(NamedTuple):
    """One GRPO batch of B = P prompts × G rollouts; T = prompt bucket + R response slots."""

    tokens_BT: jax.Array          # int32, prompt left-padded to its bucket, then the response
    valid_BT: jax.Array           # bool, real tokens (prompt padding and post-stop are False)
    response_mask_BR: jax.Array   # float32, response tokens that enter the loss
    advantages_B: jax.Array       # float32
    old_logp_BR: jax.Array        # float32, log-probs under the rollout policy
    ref_logp_BR: jax.Array        # float32, log-probs under the frozen reference


def completion_logprobs(model, tokens_BT, valid_BT, response_len: int, *,
                        with_entropy: bool = False, chunk: int = 128,
                        temperature: float = 1.0):
    """Float32 log-probs (and entropies) of the last `response_len` tokens given what precedes,
    under softmax(logits / temperature): the distribution the rollouts were sampled from, as
    verl's old-log-prob, reference and update passes all divide by the rollout temperature.

    Logits are formed `chunk` response positions at a time under a rematerialised map, so the
    [B, R, V] float32 logits never exist at once, in the forward or the backward pass.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    h_BTD, _ = model.hidden_states(tokens_BT, valid_BT)
    b, length = tokens_BT.shape
    h_BRD = h_BTD[:, length - response_len - 1: length - 1]
    targets_BR = tokens_BT[:, length - response_len:]
    w_VD = model.lm_head_weight().astype(model.options.compute_dtype)
    chunk = min(chunk, response_len)
    pad = -response_len % chunk
    if pad:
        h_BRD = jnp.pad(h_BRD, ((0, 0), (0, pad), (0, 0)))
        targets_BR = jnp.pad(targets_BR, ((0, 0), (0, pad)))
    n_chunks = h_BRD.shape[1] // chunk
    h_CBWD = h_BRD.reshape(b, n_chunks, chunk, -1).swapaxes(0, 1)
    t_CBW = targets_BR.reshape(b, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h_BWD, t_BW = args
        logits_BWV = jnp.einsum("BWD,VD->BWV", h_BWD, w_VD, preferred_element_type=jnp.float32)
        if temperature != 1.0:
            logits_BWV = logits_BWV / temperature
        logp_BW = grpo.token_logprobs(logits_BWV, t_BW)
        ent_BW = grpo.token_entropy(logits_BWV) if with_entropy else jnp.zeros_like(logp_BW)
        return logp_BW, ent_BW

    logp_CBW, ent_CBW = jax.lax.map(one_chunk, (h_CBWD, t_CBW))
    logp_BR = logp_CBW.swapaxes(0, 1).reshape(b, -1)[:, :response_len]
    ent_BR = ent_CBW.swapaxes(0, 1).reshape(b, -1)[:, :response_len]
    return logp_BR, ent_BR


def clip_by_global_norm_as_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_ (verl's clip): g · min(1, max_norm / (‖g‖ + 1e-6))."""

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(*, lr: float | Callable, weight_decay: float, b1: float, b2: float,
                   eps: float, grad_clip: float | None) -> optax.GradientTransformation:
    """AdamW (decay on every parameter, as torch and verl do) after torch's global-norm clip."""
    adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(clip_by_global_norm_as_torch(grad_clip), adamw) if grad_clip else adamw


def lr_schedule(kind: str, lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps)
    elif kind == "linear":
        main = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        raise ValueError(f"unknown schedule {kind!r}; use constant, cosine or linear")
    if not warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main],
                                [warmup_steps])


def _micro_split(x, m: int):
    """[B, ...] -> [M, B/M, ...] taking strided rows, so each micro-batch spans every device."""
    return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The jitted functions of a run, compiled with explicit shardings over one mesh."""

    logprobs: Callable     # (params, tokens_BT, valid_BT) -> logp_BR
    update: Callable       # (params, opt_state, batch) -> (params, opt_state, metrics)
    param_shardings: object
    opt_shardings: object
    batch_shardings: TrainBatch
    # What the table asks to shard but the shapes replicate (`sharding.undivided`), for the
    # start-up log; empty when everything shards as asked.
    replicated: tuple[str, ...]


def build_step_functions(graphdef, abstract_params, optimizer: optax.GradientTransformation,
                         loss_config: grpo.LossConfig, mesh: Mesh, *, response_len: int,
                         micro_batches: int = 1, logit_chunk: int = 128,
                         temperature: float = 1.0,
                         sharding: ShardingConfig = FSDP_TP) -> StepFunctions:
    """Jits the log-prob pass and the update with explicit in/out shardings on `mesh`, all
    from the `sharding` table, which must be the one the model's options constrain with.
    Both trace under the mesh, so the model's activation constraints bind.

    `temperature` is the rollouts': both passes score softmax(logits / temperature).
    """
    p_shard = param_shardings(abstract_params, mesh, sharding)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    o_shard = follow_params(abstract_opt, abstract_params, mesh, sharding)
    rows_BT, rows_B = batch_sharding(mesh, 2, sharding), batch_sharding(mesh, 1, sharding)
    batch_shard = TrainBatch(tokens_BT=rows_BT, valid_BT=rows_BT, response_mask_BR=rows_BT,
                             advantages_B=rows_B, old_logp_BR=rows_BT, ref_logp_BR=rows_BT)

    def merge(params):
        model = nnx.merge(graphdef, params)
        if model.options.sharding != sharding:
            raise ValueError("the model's ModelOptions.sharding is not the table the step "
                             "functions were built with; pass the same ShardingConfig to both")
        return model

    def logprobs(params, tokens_BT, valid_BT):
        logp_BR, _ = completion_logprobs(merge(params), tokens_BT, valid_BT, response_len,
                                         chunk=logit_chunk, temperature=temperature)
        return logp_BR

    def loss_fn(params, mb: TrainBatch, norm):
        model = merge(params)
        logp_BR, ent_BR = completion_logprobs(model, mb.tokens_BT, mb.valid_BT, response_len,
                                              with_entropy=True, chunk=logit_chunk,
                                              temperature=temperature)
        if loss_config.entropy_coeff == 0.0:
            # Still logged (a collapsing entropy is the first sign of a dying run), but with
            # no bonus it needs no gradient: the backward pass skips it.
            ent_BR = jax.lax.stop_gradient(ent_BR)
        return grpo.grpo_loss(logp_BR, mb.old_logp_BR, mb.ref_logp_BR, mb.advantages_B,
                              mb.response_mask_BR, entropy_BR=ent_BR, config=loss_config,
                              norm=norm)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(params, opt_state, batch: TrainBatch):
        # Normalisers come from the whole batch, so micro-batch losses and gradients sum
        # exactly to the full-batch ones.
        norm = grpo.aggregation_norms(batch.response_mask_BR, loss_config.agg,
                                      group_rows=loss_config.group_rows)
        if micro_batches == 1:
            (loss, metrics), grads = grad_fn(params, batch, norm)
        else:
            # The per-row normaliser travels with its rows, so any cut of the batch sums to
            # the whole batch's loss, the seed's micro-batch token means included.
            micro = jax.tree.map(lambda x: _micro_split(x, micro_batches),
                                 (batch, norm.group_tokens_B))
            zeros = jax.tree.map(jnp.zeros_like, params)
            with_rows = lambda rows_B: dataclasses.replace(norm, group_tokens_B=rows_B)
            (_, metrics_shape), _ = jax.eval_shape(
                grad_fn, params, jax.tree.map(lambda x: x[0], micro[0]),
                with_rows(micro[1][0]))

            def accumulate(carry, mb_rows):
                grads_acc, loss_acc, metrics_acc = carry
                mb, rows_B = mb_rows
                (loss, metrics), grads = grad_fn(params, mb, with_rows(rows_B))
                return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss,
                        jax.tree.map(jnp.add, metrics_acc, metrics)), None

            init = (zeros, jnp.zeros((), jnp.float32),
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
            (grads, loss, metrics), _ = jax.lax.scan(accumulate, init, micro)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient leaves parameters and optimizer state untouched.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                       skipped=(~finite).astype(jnp.float32))
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    # params and opt_state are donated: the update writes the new ones into the same buffers,
    # so a step never holds two copies of the model and its Adam moments. in_shardings follow
    # the (params, opt_state, batch) arguments; there are no static ones to shift them.
    update_jit = jax.jit(traced_under(mesh, update),
                         in_shardings=(p_shard, o_shard, batch_shard),
                         out_shardings=(p_shard, o_shard, replicated(mesh)),
                         donate_argnames=("params", "opt_state"))
    logprobs_jit = jax.jit(traced_under(mesh, logprobs),
                           in_shardings=(p_shard, rows_BT, rows_BT), out_shardings=rows_BT)
    return StepFunctions(
        logprobs=logprobs_jit, update=update_jit, param_shardings=p_shard, opt_shardings=o_shard,
        batch_shardings=batch_shard,
        replicated=tuple(undivided(abstract_params, mesh, sharding, opt_state=abstract_opt)))


def init_opt_state(optimizer, params, opt_shardings):
    """Optimizer state created directly on its shardings (it follows the parameters)."""
    return jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
