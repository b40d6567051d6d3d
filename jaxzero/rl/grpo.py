"""GRPO math: group advantages, KL estimators, the clipped policy loss and its aggregation.

Pure functions of arrays and static hyperparameters: B rollouts (P prompts × G rollouts each, a
prompt's rollouts contiguous), R response tokens (the padded response length), V vocabulary.
The advantages, KL estimators and clipped surrogate are verl's (`core_algos.py`). Of the
aggregations, `token-mean` over the whole batch is modern verl's; the verl that DiagnosisZero
forked does not compute it. Its `dp_actor.update_policy` takes each micro-batch's own token
mean, divides it by the gradient accumulation and averages ranks' gradients, which is
`seed-micro-token-mean` with a `loss_scale` (see `seed_row_order` and configs/qwen2.5-*.yaml).

Exact micro-batching: every loss term and metric is a sum over tokens divided by a
normaliser of the *whole* batch (`AggNorms`), so summing micro-batch losses, gradients and
metrics computed with the full batch's `AggNorms` (its per-row field split with the rows)
gives the full-batch ones, however the batch is cut for memory.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SEED_AGG = "seed-micro-token-mean"
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm", SEED_AGG)
KL_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
_LOG_RATIO_BOUND = 20.0   # verl clamps log-ratios to ±20 before exp
_K3_BOUND = 10.0          # and the k3 estimate to ±10


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(AGG_MODES)}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AggNorms:
    """Whole-batch normalisers, float32 scalars; each is at least 1 so empty batches give 0."""

    tokens: jax.Array      # valid tokens (token-mean)
    sequences: jax.Array   # rows with at least one valid token (seq-mean-*)
    cells: jax.Array       # B × R of the padded batch (seq-mean-token-sum-norm, Dr. GRPO)
    # Per row, the valid tokens of its loss group (seed-micro-token-mean): the only field with
    # a batch axis, so it is split with the rows when the batch is cut into micro-batches.
    group_tokens_B: jax.Array
    groups: jax.Array      # loss groups in the whole batch


def aggregation_norms(mask_BR: jax.Array, mode: str, *,
                      group_rows: int | None = None) -> AggNorms:
    """Normalisers of a full batch, to pass to `aggregate` for each of its micro-batches.

    All are computed whatever `mode` is, because the metrics are token means; `mode` is
    checked here so a misspelt mode fails before any micro-batch runs. The loss groups are
    consecutive blocks of `group_rows` rows (seed-micro-token-mean); otherwise the whole
    batch is one group, so a group token mean is the batch's token mean.
    """
    _check_mode(mode)
    m_BR = mask_BR.astype(jnp.float32)
    b = mask_BR.shape[0]
    one = jnp.float32(1.0)
    rows = b if group_rows is None else group_rows
    if mode == SEED_AGG and group_rows is None:
        raise ValueError(f"{SEED_AGG} needs group_rows (rows per seed micro-batch)")
    if rows < 1 or b % rows:
        raise ValueError(f"group_rows={rows} must be ≥ 1 and divide the batch ({b})")
    group_tokens_M = jnp.maximum(m_BR.sum(-1).reshape(b // rows, rows).sum(-1), one)
    return AggNorms(tokens=jnp.maximum(m_BR.sum(), one),
                    sequences=jnp.maximum((m_BR.sum(-1) > 0).sum().astype(jnp.float32), one),
                    cells=jnp.float32(max(mask_BR.shape[0] * mask_BR.shape[1], 1)),
                    group_tokens_B=jnp.repeat(group_tokens_M, rows),
                    groups=jnp.float32(b // rows))


def aggregate(x_BR: jax.Array, mask_BR: jax.Array, mode: str, *,
              norm: AggNorms | None = None) -> jax.Array:
    """Reduces per-token values to a scalar; `norm` (default: this batch's) makes it exact
    under micro-batching. Masked tokens and empty rows contribute 0, never NaN."""
    _check_mode(mode)
    if norm is None:
        norm = aggregation_norms(mask_BR, mode)
    m_BR = mask_BR.astype(jnp.float32)
    x_BR = jnp.where(m_BR > 0, x_BR.astype(jnp.float32), 0.0) * m_BR
    if mode == "token-mean":
        return x_BR.sum() / norm.tokens
    if mode == "seq-mean-token-sum":
        return x_BR.sum() / norm.sequences
    if mode == "seq-mean-token-mean":
        # A row's own token count is local to its micro-batch; only the row count is global.
        seq_B = x_BR.sum(-1) / jnp.maximum(m_BR.sum(-1), 1.0)
        return seq_B.sum() / norm.sequences
    if mode == SEED_AGG:
        # The mean over groups of each group's token mean: a row's share is divided by its
        # own group's token count.
        return (x_BR.sum(-1) / norm.group_tokens_B).sum() / norm.groups
    return x_BR.sum() / norm.cells


# ---- the seed's rows-to-micro-batches -------------------------------------------------------

class _Heaped:
    """A partial partition in the heap: popped first is the largest spread, then the largest
    leading part (verl's order), and two states that tie compare equal, as verl's do, so the
    heap pops them in the same order."""

    def __init__(self, parts: list[tuple[int, list[tuple[int, int]]]]):
        self.parts = sorted(parts, key=_part_key, reverse=True)

    def key(self):
        spread = self.parts[0][0] - self.parts[-1][0]
        lead_sum, lead = self.parts[0]
        # Larger sorts first: negate everything (parts compared have equal lengths).
        return (-spread, -lead_sum, -len(lead), [(-i, -v) for i, v in lead])

    def __lt__(self, other: "_Heaped") -> bool:
        return self.key() < other.key()


def _part_key(part):
    total, items = part
    return total, len(items), items


def karmarkar_karp(sizes: Sequence[int], k: int) -> list[list[int]]:
    """verl's equal-size Karmarkar–Karp partition of row indices into k parts of len/k rows,
    balancing the sums of `sizes`; each part's indices ascending (`seqlen_balancing`'s
    get_seqlen_balanced_partitions(equal_size=True), its tie-breaking included).

    Rows sorted by (size, index) are dealt k at a time into one state each; the two states of
    largest spread are merged, largest part with smallest, until one state is left.
    """
    n = len(sizes)
    if k < 1 or n % k or n < k:
        raise ValueError(f"{n} rows do not split into {k} equal parts")
    ordered = sorted((int(v), i) for i, v in enumerate(sizes))
    heap = []
    for start in range(0, n, k):
        heapq.heappush(heap, _Heaped([(v, [(i, v)]) for v, i in ordered[start:start + k]]))
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a.parts, reversed(b.parts))]
        heapq.heappush(heap, _Heaped(merged))
    return [sorted(i for i, _ in items) for _, items in heap[0].parts]


def seed_row_order(seqlen_B, ranks: int) -> np.ndarray:
    """The row permutation that DiagnosisZero's trainer applies before its update
    (`ray_trainer._balance_batch`): Karmarkar–Karp over `ranks` data-parallel ranks by each
    row's token count (prompt + response), parts in rank order. Rank r then holds rows
    [r·B/ranks, (r+1)·B/ranks) of the permuted batch and cuts them into consecutive
    micro-batches, so consecutive blocks of `group_rows` rows are the seed's micro-batches.
    """
    seqlen_B = np.asarray(seqlen_B)
    return np.array([i for part in karmarkar_karp(seqlen_B.tolist(), ranks) for i in part],
                    np.int64)


def group_advantages(scores_B: jax.Array, group_size: int, *, eps: float = 1e-6,
                     scale_by_std: bool = True) -> jax.Array:
    """(s − group mean) / (group std + eps), std unbiased as torch.std; float32 [B].

    A group of one has mean 0 and std 1, as in verl. `scale_by_std=False` is Dr. GRPO.
    """
    n = scores_B.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size} must be ≥ 1 and divide the batch ({n})")
    s_PG = jnp.asarray(scores_B, jnp.float32).reshape(n // group_size, group_size)
    if group_size == 1:
        mean_P1, std_P1 = jnp.zeros_like(s_PG), jnp.ones_like(s_PG)
    else:
        mean_P1 = s_PG.mean(-1, keepdims=True)
        std_P1 = s_PG.std(-1, keepdims=True, ddof=1)
    adv_PG = s_PG - mean_P1
    if scale_by_std:
        adv_PG = adv_PG / (std_P1 + eps)
    return adv_PG.reshape(n)


def kl_penalty(logp_BR: jax.Array, ref_logp_BR: jax.Array, kind: str) -> jax.Array:
    """Per-token KL(π‖π_ref) estimate: k1 (kl), abs, k2 (mse) or k3 (low_var_kl)."""
    diff_BR = logp_BR.astype(jnp.float32) - ref_logp_BR.astype(jnp.float32)
    if kind in ("k1", "kl"):
        return diff_BR
    if kind == "abs":
        return jnp.abs(diff_BR)
    if kind in ("k2", "mse"):
        return 0.5 * jnp.square(diff_BR)
    if kind in ("k3", "low_var_kl"):
        x_BR = jnp.clip(-diff_BR, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        return jnp.clip(jnp.exp(x_BR) - x_BR - 1.0, -_K3_BOUND, _K3_BOUND)
    raise ValueError(f"unknown KL kind {kind!r}; valid: {', '.join(KL_KINDS)}")


def policy_loss(logp_BR: jax.Array, old_logp_BR: jax.Array, adv: jax.Array, mask_BR: jax.Array,
                *, clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float | None = None,
                agg: str = "token-mean", norm: AggNorms | None = None,
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate (asymmetric clip, optional dual clip) as verl's vanilla loss.

    `adv` is [B] (one advantage per rollout) or [B, R]. Metrics: `clipfrac` (tokens where
    the clipped term is strictly the larger), `clipfrac_lower` (tokens capped by the dual
    clip), `approx_kl` (token mean of old_logp − logp).
    """
    if norm is None:
        norm = aggregation_norms(mask_BR, agg)
    adv_BR = jnp.asarray(adv, jnp.float32)
    if adv_BR.ndim == 1:
        adv_BR = adv_BR[:, None]
    log_ratio_BR = jnp.clip(logp_BR.astype(jnp.float32) - old_logp_BR.astype(jnp.float32),
                            -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio_BR = jnp.exp(log_ratio_BR)
    unclipped_BR = -adv_BR * ratio_BR
    clipped_BR = -adv_BR * jnp.clip(ratio_BR, 1.0 - clip_low, 1.0 + clip_high)
    loss_BR = jnp.maximum(unclipped_BR, clipped_BR)
    token_mean = lambda x_BR: aggregate(x_BR, mask_BR, "token-mean", norm=norm)
    metrics = {"clipfrac": token_mean((clipped_BR > unclipped_BR).astype(jnp.float32)),
               "approx_kl": token_mean(-log_ratio_BR)}
    if clip_c is None:
        metrics["clipfrac_lower"] = jnp.zeros((), jnp.float32)
    else:
        cap_BR = -adv_BR * clip_c
        negative_BR = adv_BR < 0
        metrics["clipfrac_lower"] = token_mean((negative_BR & (loss_BR > cap_BR))
                                               .astype(jnp.float32))
        loss_BR = jnp.where(negative_BR, jnp.minimum(loss_BR, cap_BR), loss_BR)
    return aggregate(loss_BR, mask_BR, agg, norm=norm), metrics


def token_logprobs(logits_BRV: jax.Array, tokens_BR: jax.Array) -> jax.Array:
    """log softmax(logits)[token], float32 [B, R]; gathers one logit instead of a V-wide
    log-softmax."""
    lse_BR = jax.nn.logsumexp(logits_BRV.astype(jnp.float32), axis=-1)
    picked_BR = jnp.take_along_axis(logits_BRV, tokens_BR[..., None].astype(jnp.int32),
                                    axis=-1)[..., 0]
    return picked_BR.astype(jnp.float32) - lse_BR


def token_entropy(logits_BRV: jax.Array) -> jax.Array:
    """Entropy of softmax(logits), float32 [B, R], for finite logits.

    Σ_v p_v·(lse − l_v) has only non-negative terms; the upcasts sit inside one fused
    reduction, so no V-wide float32 copy is kept.
    """
    lse_BR1 = jax.nn.logsumexp(logits_BRV.astype(jnp.float32), axis=-1, keepdims=True)
    gap_BRV = lse_BR1 - logits_BRV.astype(jnp.float32)
    return jnp.sum(jnp.exp(-gap_BRV) * gap_BRV, axis=-1)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static hyperparameters of the GRPO loss; hashable, so it can be a static jit argument."""

    clip_low: float = 0.2
    clip_high: float = 0.2             # > clip_low is DAPO's clip-higher
    clip_c: float | None = None        # dual-clip cap for negative advantages; None: off
    agg: str = "token-mean"
    entropy_coeff: float = 0.001
    use_kl_loss: bool = True
    kl_coef: float = 0.001
    kl_kind: str = "low_var_kl"
    group_rows: int | None = None      # rows per loss group; seed-micro-token-mean only
    loss_scale: float = 1.0            # multiplies the loss (and so the gradient) before clip

    def __post_init__(self):
        _check_mode(self.agg)
        if (self.agg == SEED_AGG) != (self.group_rows is not None):
            raise ValueError(f"group_rows is needed with agg={SEED_AGG!r} and only then")
        if self.group_rows is not None and self.group_rows < 1:
            raise ValueError(f"group_rows must be ≥ 1, got {self.group_rows}")
        if not self.loss_scale > 0:
            raise ValueError(f"loss_scale must be positive, got {self.loss_scale}")
        if self.kl_kind not in KL_KINDS:
            raise ValueError(f"unknown KL kind {self.kl_kind!r}; valid: {', '.join(KL_KINDS)}")
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise ValueError(f"need 0 ≤ clip_low < 1 and clip_high ≥ 0, got "
                             f"{self.clip_low}, {self.clip_high}")
        if self.clip_c is not None and self.clip_c <= 1:
            raise ValueError(f"clip_c must be > 1 (or None for off), got {self.clip_c}")
        if self.entropy_coeff < 0 or self.kl_coef < 0:
            raise ValueError("entropy_coeff and kl_coef must be ≥ 0")


def grpo_loss(logp_BR: jax.Array, old_logp_BR: jax.Array, ref_logp_BR: jax.Array | None,
              adv_B: jax.Array, mask_BR: jax.Array, *, entropy_BR: jax.Array,
              config: LossConfig, norm: AggNorms | None = None,
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """loss_scale·(pg_loss − entropy_coeff·agg(entropy) [+ kl_coef·agg(kl) when
    use_kl_loss]), as verl; the metrics are unscaled.

    `ref_logp_BR` may be None when use_kl_loss is off; the `kl` metric is then 0. Every
    metric is additive over micro-batches that share the full batch's `norm`.
    """
    if norm is None:
        norm = aggregation_norms(mask_BR, config.agg, group_rows=config.group_rows)
    pg_loss, metrics = policy_loss(logp_BR, old_logp_BR, adv_B, mask_BR,
                                   clip_low=config.clip_low, clip_high=config.clip_high,
                                   clip_c=config.clip_c, agg=config.agg, norm=norm)
    entropy = aggregate(entropy_BR, mask_BR, config.agg, norm=norm)
    total = pg_loss - config.entropy_coeff * entropy
    if config.use_kl_loss:
        if ref_logp_BR is None:
            raise ValueError("use_kl_loss needs ref_logp_BR")
        kl = aggregate(kl_penalty(logp_BR, ref_logp_BR, config.kl_kind), mask_BR, config.agg,
                       norm=norm)
        total = total + config.kl_coef * kl
    else:
        kl = jnp.zeros((), jnp.float32)
    return config.loss_scale * total, dict(metrics, pg_loss=pg_loss, entropy=entropy, kl=kl)
