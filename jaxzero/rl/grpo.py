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
gives the full-batch ones, however the batch is cut for memory. `token_weights` states each
mode as one weight per token, so the same holds for tokens laid out in trimmed or packed rows.
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


def token_weights(mask_BR: jax.Array, mode: str, norm: AggNorms) -> jax.Array:
    """Per-token weights w_BR with `aggregate(x_BR, mask_BR, mode, norm=norm)` = Σ x·w.

    Every mode is a weighted token sum, so the weights can follow their tokens anywhere: into
    micro-batches, trimmed rows or packed rows (`jaxzero.rl.layout`), exactly.
    """
    _check_mode(mode)
    m_BR = mask_BR.astype(jnp.float32)
    if mode == "token-mean":
        return m_BR / norm.tokens
    if mode == "seq-mean-token-sum":
        return m_BR / norm.sequences
    if mode == "seq-mean-token-mean":
        # A row's own token count is local to the row; only the row count is global.
        return m_BR / (jnp.maximum(m_BR.sum(-1, keepdims=True), 1.0) * norm.sequences)
    if mode == SEED_AGG:
        # The mean over groups of each group's token mean: a row's share is divided by its
        # own group's token count.
        return m_BR / (norm.group_tokens_B[:, None] * norm.groups)
    return m_BR / norm.cells


def weighted_sum(x: jax.Array, w: jax.Array) -> jax.Array:
    """Σ x·w in float32; tokens of weight 0 contribute 0 (and no gradient), never NaN."""
    return jnp.sum(jnp.where(w != 0, x.astype(jnp.float32), 0.0) * w)


def aggregate(x_BR: jax.Array, mask_BR: jax.Array, mode: str, *,
              norm: AggNorms | None = None) -> jax.Array:
    """Reduces per-token values to a scalar; `norm` (default: this batch's) makes it exact
    under micro-batching. Masked tokens and empty rows contribute 0, never NaN."""
    if norm is None:
        norm = aggregation_norms(mask_BR, mode)
    return weighted_sum(x_BR, token_weights(mask_BR, mode, norm))


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
    return weighted_policy_loss(logp_BR, old_logp_BR, adv, token_weights(mask_BR, agg, norm),
                                token_weights(mask_BR, "token-mean", norm),
                                clip_low=clip_low, clip_high=clip_high, clip_c=clip_c)


def weighted_policy_loss(logp_BN: jax.Array, old_logp_BN: jax.Array, adv: jax.Array,
                         loss_w_BN: jax.Array, mean_w_BN: jax.Array, *, clip_low: float,
                         clip_high: float, clip_c: float | None,
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`policy_loss` on tokens of any layout: the loss is Σ loss·loss_w, the metrics token
    means with weights mean_w (`token_weights`); `adv` is per row [B] or per token."""
    adv_BN = jnp.asarray(adv, jnp.float32)
    if adv_BN.ndim == logp_BN.ndim - 1:
        adv_BN = adv_BN[..., None]
    log_ratio_BN = jnp.clip(logp_BN.astype(jnp.float32) - old_logp_BN.astype(jnp.float32),
                            -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio_BN = jnp.exp(log_ratio_BN)
    unclipped_BN = -adv_BN * ratio_BN
    clipped_BN = -adv_BN * jnp.clip(ratio_BN, 1.0 - clip_low, 1.0 + clip_high)
    loss_BN = jnp.maximum(unclipped_BN, clipped_BN)
    token_mean = lambda x_BN: weighted_sum(x_BN, mean_w_BN)
    metrics = {"clipfrac": token_mean((clipped_BN > unclipped_BN).astype(jnp.float32)),
               "approx_kl": token_mean(-log_ratio_BN)}
    if clip_c is None:
        metrics["clipfrac_lower"] = jnp.zeros((), jnp.float32)
    else:
        cap_BN = -adv_BN * clip_c
        negative_BN = adv_BN < 0
        metrics["clipfrac_lower"] = token_mean((negative_BN & (loss_BN > cap_BN))
                                               .astype(jnp.float32))
        loss_BN = jnp.where(negative_BN, jnp.minimum(loss_BN, cap_BN), loss_BN)
    return weighted_sum(loss_BN, loss_w_BN), metrics


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
    return weighted_grpo_loss(logp_BR, old_logp_BR, ref_logp_BR, adv_B,
                              token_weights(mask_BR, config.agg, norm),
                              token_weights(mask_BR, "token-mean", norm),
                              entropy_BN=entropy_BR, config=config)


def weighted_grpo_loss(logp_BN: jax.Array, old_logp_BN: jax.Array, ref_logp_BN: jax.Array | None,
                       adv: jax.Array, loss_w_BN: jax.Array, mean_w_BN: jax.Array, *,
                       entropy_BN: jax.Array, config: LossConfig,
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`grpo_loss` on tokens of any layout, with `token_weights` for config.agg (loss_w) and
    token-mean (mean_w): the loss and metrics are sums over tokens, so any cut sums exactly."""
    pg_loss, metrics = weighted_policy_loss(logp_BN, old_logp_BN, adv, loss_w_BN, mean_w_BN,
                                            clip_low=config.clip_low, clip_high=config.clip_high,
                                            clip_c=config.clip_c)
    entropy = weighted_sum(entropy_BN, loss_w_BN)
    total = pg_loss - config.entropy_coeff * entropy
    if config.use_kl_loss:
        if ref_logp_BN is None:
            raise ValueError("use_kl_loss needs ref_logp_BR")
        kl = weighted_sum(kl_penalty(logp_BN, ref_logp_BN, config.kl_kind), loss_w_BN)
        total = total + config.kl_coef * kl
    else:
        kl = jnp.zeros((), jnp.float32)
    return config.loss_scale * total, dict(metrics, pg_loss=pg_loss, entropy=entropy, kl=kl)
