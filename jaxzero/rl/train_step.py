"""The jitted pieces of a GRPO step: completion log-probs and the sharded, donated update.

Shapes as in `jaxzero.model.qwen2`: B rows, T = prompt bucket + R response slots; laid-out
rows (`Rows`) add M micro-batches, W tokens per row and N scored slots per row.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxzero.model.qwen2 import positions_from_mask
from jaxzero.rl import grpo
from jaxzero.rl.token_scores import slot_scores
from jaxzero.parallel.sharding import (FSDP_TP, ShardingConfig, batch_sharding, follow_params,
                                       param_shardings, replicated, traced_under, undivided)


class TrainBatch(NamedTuple):
    """One GRPO batch of B = P prompts × G rollouts; T = prompt bucket + R response slots."""

    tokens_BT: jax.Array          # int32, prompt left-padded to its bucket, then the response
    valid_BT: jax.Array           # bool, real tokens (prompt padding and post-stop are False)
    response_mask_BR: jax.Array   # float32, response tokens that enter the loss
    advantages_B: jax.Array       # float32
    # float32, log-probs under the rollout policy; None: the policy being updated is the
    # rollout policy (one update per step), so they are its own, detached, in the update.
    old_logp_BR: jax.Array | None
    ref_logp_BR: jax.Array | None  # float32, log-probs under the frozen reference; None: no KL


class Rows(NamedTuple):
    """Rollouts laid out for the model (`jaxzero.rl.layout`): M micro-batches of B rows of W
    tokens, each row holding one or more whole rollouts (segments), and N scored slots per
    row, filled from slot 0."""

    tokens_MBW: jax.Array     # int32
    segments_MBW: jax.Array   # int32: 0 padding, k ≥ 1 the row's k-th rollout
    positions_MBW: jax.Array  # int32, restarting at 0 at each segment
    pick_MBN: jax.Array       # int32: the position whose hidden state scores slot n
    targets_MBN: jax.Array    # int32: the token slot n scores
    live_M: jax.Array         # int32: slots in use in the fullest row (0: an empty micro-batch)


class RowLoss(NamedTuple):
    """The loss inputs of every scored slot of `Rows`, [M, B, N] float32."""

    advantages_MBN: jax.Array
    loss_w_MBN: jax.Array     # grpo.token_weights for the loss aggregation (0: not in the loss)
    mean_w_MBN: jax.Array     # grpo.token_weights for token means (the metrics)
    old_logp_MBN: jax.Array | None  # None: the current policy's, detached (as TrainBatch)
    ref_logp_MBN: jax.Array | None


def completion_logprobs(model, tokens_BT, valid_BT, response_len: int, *,
                        with_entropy: bool = False, chunk: int = 128,
                        temperature: float = 1.0):
    """Float32 log-probs (and entropies) of the last `response_len` tokens given what precedes,
    under softmax(logits / temperature): the distribution the rollouts were sampled from, as
    verl's old-log-prob, reference and update passes all divide by the rollout temperature.
    Logits are formed `chunk` response positions at a time (`token_scores.slot_scores`)."""
    h_BTD, _ = model.hidden_states(tokens_BT, valid_BT)
    length = tokens_BT.shape[1]
    return slot_scores(h_BTD[:, length - response_len - 1: length - 1],
                       tokens_BT[:, length - response_len:], model.lm_head_weight(), live=None,
                       with_entropy=with_entropy, chunk=chunk, temperature=temperature)


def row_logprobs(model, rows: Rows, *, with_entropy: bool = False, chunk: int = 128,
                 temperature: float = 1.0):
    """`completion_logprobs` for one micro-batch of `Rows` (no M axis): float32 [B, N] of its
    scored slots, each rollout attending only within its own segment."""
    h_BWD, _ = model.hidden_states(rows.tokens_MBW, rows.segments_MBW > 0, rows.positions_MBW,
                                   segments_BT=rows.segments_MBW)
    h_BND = jnp.take_along_axis(h_BWD, rows.pick_MBN[..., None], axis=1)
    return slot_scores(h_BND, rows.targets_MBN, model.lm_head_weight(), live=rows.live_M,
                       with_entropy=with_entropy, chunk=chunk, temperature=temperature)


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


def _micro_join(x_MB):
    """The inverse of `_micro_split`: [M, B/M, ...] -> [B, ...]."""
    return x_MB.swapaxes(0, 1).reshape(-1, *x_MB.shape[2:])


def padded_rows(tokens_BT, valid_BT, response_len: int, micro_batches: int) -> Rows:
    """A left-padded batch as `Rows`, as it is: one rollout per row, its last `response_len`
    positions scored, the rows cut into `micro_batches` strided micro-batches."""
    b, length = tokens_BT.shape
    valid_BT = valid_BT.astype(jnp.bool_)
    rows = Rows(tokens_MBW=tokens_BT, segments_MBW=valid_BT.astype(jnp.int32),
                positions_MBW=positions_from_mask(valid_BT),
                pick_MBN=jnp.broadcast_to(jnp.arange(length - response_len - 1, length - 1),
                                          (b, response_len)),
                targets_MBN=tokens_BT[:, length - response_len:], live_M=None)
    rows = jax.tree.map(lambda x: _micro_split(x, micro_batches), rows)
    return rows._replace(live_M=jnp.full((micro_batches,), response_len, jnp.int32))


def padded_loss(batch: TrainBatch, loss_config: grpo.LossConfig, micro_batches: int) -> RowLoss:
    """The loss inputs of a padded batch as `RowLoss`, weighted by its whole-batch norms."""
    norm = grpo.aggregation_norms(batch.response_mask_BR, loss_config.agg,
                                  group_rows=loss_config.group_rows)
    mask_BR = batch.response_mask_BR
    loss = RowLoss(
        advantages_MBN=jnp.broadcast_to(batch.advantages_B[:, None], mask_BR.shape),
        loss_w_MBN=grpo.token_weights(mask_BR, loss_config.agg, norm),
        mean_w_MBN=grpo.token_weights(mask_BR, "token-mean", norm),
        old_logp_MBN=batch.old_logp_BR, ref_logp_MBN=batch.ref_logp_BR)
    return jax.tree.map(lambda x: _micro_split(x, micro_batches), loss)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The jitted functions of a run, compiled with explicit shardings over one mesh.

    The padded pair takes a left-padded batch as it is (`response_len` scored positions,
    `micro_batches` micro-batches); the row pair takes rollouts laid out by
    `jaxzero.rl.layout` (trimmed or packed). Both run the same per-micro-batch code.
    """

    logprobs: Callable     # (params, tokens_BT, valid_BT) -> logp_BR
    update: Callable       # (params, opt_state, batch) -> (params, opt_state, metrics)
    row_logprobs: Callable  # (params, rows) -> logp_MBN
    row_update: Callable    # (params, opt_state, rows, loss) -> (params, opt_state, metrics)
    param_shardings: object
    opt_shardings: object
    batch_shardings: TrainBatch
    row_shardings: Rows
    row_loss_shardings: RowLoss
    # What the table asks to shard but the shapes replicate (`sharding.undivided`), for the
    # start-up log; empty when everything shards as asked.
    replicated: tuple[str, ...]


def build_step_functions(graphdef, abstract_params, optimizer: optax.GradientTransformation,
                         loss_config: grpo.LossConfig, mesh: Mesh, *, response_len: int,
                         micro_batches: int = 1, logit_chunk: int = 128,
                         temperature: float = 1.0,
                         sharding: ShardingConfig = FSDP_TP) -> StepFunctions:
    """Jits the log-prob passes and the updates with explicit in/out shardings on `mesh`, all
    from the `sharding` table, which must be the one the model's options constrain with.
    All trace under the mesh, so the model's activation constraints bind.

    `temperature` is the rollouts': every pass scores softmax(logits / temperature). The
    log-prob passes run micro-batch by micro-batch, as the update does.
    """
    p_shard = param_shardings(abstract_params, mesh, sharding)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    o_shard = follow_params(abstract_opt, abstract_params, mesh, sharding)
    rows_BT, rows_B = batch_sharding(mesh, 2, sharding), batch_sharding(mesh, 1, sharding)
    batch_shard = TrainBatch(tokens_BT=rows_BT, valid_BT=rows_BT, response_mask_BR=rows_BT,
                             advantages_B=rows_B, old_logp_BR=rows_BT, ref_logp_BR=rows_BT)
    rows_MBW = NamedSharding(mesh, PartitionSpec(None, *sharding.rows_BT))
    row_shard = Rows(rows_MBW, rows_MBW, rows_MBW, rows_MBW, rows_MBW, replicated(mesh))
    loss_shard = RowLoss(*[rows_MBW] * len(RowLoss._fields))

    def merge(params):
        model = nnx.merge(graphdef, params)
        if model.options.sharding != sharding:
            raise ValueError("the model's ModelOptions.sharding is not the table the step "
                             "functions were built with; pass the same ShardingConfig to both")
        return model

    def logprobs_of_rows(params, rows: Rows):
        def scored(params, mb: Rows):
            return row_logprobs(merge(params), mb, chunk=logit_chunk, temperature=temperature)[0]

        def one(mb: Rows):
            # Operands, not closures: NNX modules do not cross trace levels.
            return jax.lax.cond(mb.live_M > 0, scored, lambda _, mb: jnp.zeros(
                mb.targets_MBN.shape, jnp.float32), params, mb)

        return jax.lax.map(one, rows)

    def logprobs(params, tokens_BT, valid_BT):
        rows = padded_rows(tokens_BT, valid_BT, response_len, micro_batches)
        return _micro_join(logprobs_of_rows(params, rows))

    def loss_fn(params, rows: Rows, loss: RowLoss):
        logp_BN, ent_BN = row_logprobs(merge(params), rows, with_entropy=True,
                                       chunk=logit_chunk, temperature=temperature)
        if loss_config.entropy_coeff == 0.0:
            # Still logged (a collapsing entropy is the first sign of a dying run), but with
            # no bonus it needs no gradient: the backward pass skips it.
            ent_BN = jax.lax.stop_gradient(ent_BN)
        # One update per step: the rollout policy is the one being updated, so its
        # log-probs are these, detached (the ratio is exactly 1), with no pass of their own.
        old_BN = jax.lax.stop_gradient(logp_BN) if loss.old_logp_MBN is None \
            else loss.old_logp_MBN
        return grpo.weighted_grpo_loss(logp_BN, old_BN, loss.ref_logp_MBN, loss.advantages_MBN,
                                       loss.loss_w_MBN, loss.mean_w_MBN, entropy_BN=ent_BN,
                                       config=loss_config)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update_rows(params, opt_state, rows: Rows, loss: RowLoss):
        # The weights come from the whole batch, so micro-batch losses, gradients and
        # metrics sum exactly to the full-batch ones, however the rows were cut.
        micro = (rows, loss)
        if rows.tokens_MBW.shape[0] == 1:
            (loss_value, metrics), grads = grad_fn(params, *jax.tree.map(lambda x: x[0], micro))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            (_, metrics_shape), _ = jax.eval_shape(grad_fn, params,
                                                   *jax.tree.map(lambda x: x[0], micro))

            def add(carry, params, mb):
                grads_acc, loss_acc, metrics_acc = carry
                (value, metrics), grads = grad_fn(params, *mb)
                return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + value,
                        jax.tree.map(jnp.add, metrics_acc, metrics))

            def accumulate(carry, mb):
                # An empty micro-batch (packed layouts pad their count) costs nothing.
                return jax.lax.cond(mb[0].live_M > 0, add, lambda c, *_: c, carry, params,
                                    mb), None

            init = (zeros, jnp.zeros((), jnp.float32),
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
            (grads, loss_value, metrics), _ = jax.lax.scan(accumulate, init, micro)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient leaves parameters and optimizer state untouched.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        metrics = dict(metrics, loss=loss_value, grad_norm=grad_norm,
                       skipped=(~finite).astype(jnp.float32))
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    def update(params, opt_state, batch: TrainBatch):
        return update_rows(params, opt_state,
                           padded_rows(batch.tokens_BT, batch.valid_BT, response_len,
                                       micro_batches),
                           padded_loss(batch, loss_config, micro_batches))

    # params and opt_state are donated: the update writes the new ones into the same buffers,
    # so a step never holds two copies of the model and its Adam moments. in_shardings follow
    # the arguments; there are no static ones to shift them.
    out = (p_shard, o_shard, replicated(mesh))
    donate = ("params", "opt_state")
    update_jit = jax.jit(traced_under(mesh, update), in_shardings=(p_shard, o_shard, batch_shard),
                         out_shardings=out, donate_argnames=donate)
    row_update_jit = jax.jit(traced_under(mesh, update_rows),
                             in_shardings=(p_shard, o_shard, row_shard, loss_shard),
                             out_shardings=out, donate_argnames=donate)
    logprobs_jit = jax.jit(traced_under(mesh, logprobs),
                           in_shardings=(p_shard, rows_BT, rows_BT), out_shardings=rows_BT)
    row_logprobs_jit = jax.jit(traced_under(mesh, logprobs_of_rows),
                               in_shardings=(p_shard, row_shard), out_shardings=rows_MBW)
    return StepFunctions(
        logprobs=logprobs_jit, update=update_jit, row_logprobs=row_logprobs_jit,
        row_update=row_update_jit, param_shardings=p_shard, opt_shardings=o_shard,
        batch_shardings=batch_shard, row_shardings=row_shard, row_loss_shardings=loss_shard,
        replicated=tuple(undivided(abstract_params, mesh, sharding, opt_state=abstract_opt)))


def init_opt_state(optimizer, params, opt_shardings):
    """Optimizer state created directly on its shardings (it follows the parameters)."""
    return jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
