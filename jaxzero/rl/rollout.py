"""From sampled rollouts to a GRPO batch: scoring off the device path, DAPO selection, and the
host-side batch assembly (advantages, masks, one prompt width).

Everything here is host numpy; the task supplies decoding, reward and analysis (task.py).
B rollouts = prompts × n, a prompt's n rollouts contiguous; P prompt slots, R response slots,
L = P + R.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from jaxzero.rl import grpo
from jaxzero.rl.task import Record, Sample, Task


@dataclasses.dataclass(frozen=True)
class ScoredRollouts:
    """The task's verdict on one rollout batch: texts, scores, analysis, and its cost."""

    texts: list[str]
    scores_B: np.ndarray
    analysis: dict[str, float]
    seconds: float  # time the reward thread spent decoding, scoring and analysing


class RewardWorker:
    """Decodes, scores and analyses rollouts on one background thread.

    The trainer submits a batch as soon as its tokens reach the host and collects the result
    only after it has dispatched the device work that does not depend on it (the reference
    and old log-prob passes), so scoring runs while the device computes.
    """

    def __init__(self, task: Task):
        self._task = task
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def submit(self, tokens_BR: np.ndarray, lengths_B: np.ndarray,
               targets_B: Sequence[Any]) -> Future:
        return self._pool.submit(self._score, tokens_BR, lengths_B, list(targets_B))

    def _score(self, tokens_BR, lengths_B, targets_B) -> ScoredRollouts:
        t0 = time.perf_counter()
        texts = self._task.decode([row[:n].tolist() for row, n in zip(tokens_BR, lengths_B)])
        scores_B = np.asarray(self._task.reward(texts, targets_B), np.float32)
        if scores_B.shape != (len(texts),):
            raise ValueError(f"task {self._task.name!r}: reward returned shape "
                             f"{scores_B.shape} for {len(texts)} completions")
        return ScoredRollouts(texts, scores_B, self._task.analyze(texts),
                              time.perf_counter() - t0)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclasses.dataclass(frozen=True)
class Candidates:
    """One sampled batch on the host: the sampler's arrays, its prompts' records, its scores."""

    rollouts: Any              # a SampleOutput of numpy arrays
    records: list[Record]      # one per prompt; rollout row b belongs to records[b // n]
    scored: ScoredRollouts


def group_spread(scores_B: np.ndarray, group_size: int) -> np.ndarray:
    """Per-group standard deviation of rewards (zero: the group teaches nothing)."""
    return scores_B.reshape(-1, group_size).std(axis=1)


def select_groups(candidates: Sequence[Candidates], n: int, want: int
                  ) -> tuple[list[tuple[int, int]], int]:
    """DAPO dynamic sampling: (candidate, group) pairs, groups whose rewards differ first,
    filled up to `want` with the others in order; also how many differed."""
    keep, spare = [], []
    for c, cand in enumerate(candidates):
        for g, s in enumerate(group_spread(cand.scored.scores_B, n)):
            (keep if s > 0 else spare).append((c, g))
    return (keep + spare)[:want], len(keep)


def all_groups(rollouts: Sequence[Any], n: int) -> list[tuple[int, int]]:
    """Every group of every candidate's host sampler output, in order (no dynamic sampling)."""
    return [(c, g) for c, r in enumerate(rollouts) for g in range(r.tokens.shape[0] // n)]


def left_pad(x_BT: np.ndarray, width: int, value) -> np.ndarray:
    """Left-pads [B, T] to [B, width] (prompts are left-padded, so they stay right-aligned)."""
    if x_BT.shape[1] > width:
        raise ValueError(f"cannot pad width {x_BT.shape[1]} down to {width}")
    return np.pad(x_BT, ((0, 0), (width - x_BT.shape[1], 0)), constant_values=value)


def sequences(rollouts: Sequence[Any], groups: Sequence[tuple[int, int]], n: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens_BT and valid_BT of the chosen groups' rows (`rollouts[c]` the host sampler
    output of candidate c): prompts re-padded on the left to the widest prompt bucket among
    them (refill batches may have used other buckets), then the responses."""
    width = max(rollouts[c].prompt_tokens.shape[1] for c, _ in groups)
    tokens, valid = [], []
    for c, g in groups:
        r = rollouts[c]
        rows = slice(g * n, (g + 1) * n)
        tokens.append(np.concatenate([left_pad(r.prompt_tokens[rows], width, pad_id),
                                      r.tokens[rows]], axis=1))
        valid.append(np.concatenate([left_pad(r.prompt_mask[rows], width, False),
                                     r.mask[rows]], axis=1))
    return np.concatenate(tokens).astype(np.int32), np.concatenate(valid).astype(bool)


def response_mask(valid_BR: np.ndarray, truncated_B: np.ndarray, mask_truncated: bool):
    """Response tokens that enter the loss; truncated responses drop out if asked."""
    mask = valid_BR.astype(np.float32)
    if mask_truncated:
        mask = mask * (~truncated_B)[:, None]
    return mask


@dataclasses.dataclass(frozen=True)
class HostBatch:
    """A GRPO batch assembled on the host, before it goes onto the devices."""

    tokens_BT: np.ndarray          # int32, prompts left-padded to one width, then responses
    valid_BT: np.ndarray           # bool
    response_mask_BR: np.ndarray   # float32, tokens that enter the loss
    advantages_B: np.ndarray       # float32
    sampler_logp_BR: np.ndarray    # float32, the sampler's own log-probs
    scores_B: np.ndarray           # float32
    lengths_B: np.ndarray          # int32
    truncated_B: np.ndarray        # bool: ran out of tokens before a stop
    texts: list[str]               # per row
    records: list[Record]          # per row: the record the row's prompt came from

    def take(self, order: np.ndarray | None) -> HostBatch:
        """The rows in `order` (None: as they are). A permuted batch is for the update only:
        its groups are no longer contiguous, so metrics come from the unpermuted one."""
        if order is None:
            return self
        return HostBatch(**{f.name: (np.asarray(v)[order] if isinstance(v, np.ndarray)
                                     else [v[i] for i in order])
                            for f in dataclasses.fields(self)
                            for v in (getattr(self, f.name),)})


def assemble_batch(candidates: Sequence[Candidates], groups: Sequence[tuple[int, int]], n: int,
                   *, pad_id: int, adv_eps: float, scale_by_std: bool,
                   mask_truncated: bool) -> HostBatch:
    """The GRPO batch of the chosen (candidate, group) pairs: a pure host function."""
    tokens_BT, valid_BT = sequences([c.rollouts for c in candidates], groups, n, pad_id)

    def rows(field):
        return np.concatenate([getattr(candidates[c].rollouts, field)[g * n:(g + 1) * n]
                               for c, g in groups])

    scores_B = np.concatenate([candidates[c].scored.scores_B[g * n:(g + 1) * n]
                               for c, g in groups]).astype(np.float32)
    truncated_B = ~rows("stopped").astype(bool)
    adv_B = np.asarray(grpo.group_advantages(scores_B, n, eps=adv_eps,
                                             scale_by_std=scale_by_std), np.float32)
    return HostBatch(
        tokens_BT=tokens_BT, valid_BT=valid_BT,
        response_mask_BR=response_mask(rows("mask"), truncated_B, mask_truncated),
        advantages_B=adv_B, sampler_logp_BR=rows("logprobs").astype(np.float32),
        scores_B=scores_B, lengths_B=rows("lengths").astype(np.int32), truncated_B=truncated_B,
        texts=[candidates[c].scored.texts[g * n + i] for c, g in groups for i in range(n)],
        records=[candidates[c].records[g] for c, g in groups for _ in range(n)])


def training_samples(batch: HostBatch, task: Task, k: int) -> tuple[Sample, ...]:
    """The first k rows of a batch as text-panel samples, each with its own prompt's target."""
    return tuple(Sample(task.prompt_text(rec), text, float(score), task.target(rec))
                 for rec, text, score in zip(batch.records[:k], batch.texts[:k],
                                             batch.scores_B[:k]))


def rollout_metrics(batch: HostBatch, n: int, analysis: dict[str, float],
                    correct_score: float) -> dict[str, float]:
    """reward/, response/ and the task's own (already namespaced) analysis rates."""
    spread = group_spread(batch.scores_B, n)
    out = {
        "reward/mean": float(batch.scores_B.mean()),
        "reward/std": float(batch.scores_B.std()),
        "reward/accuracy": float((batch.scores_B >= correct_score).mean()),
        "reward/zero_std_groups": float((spread == 0).mean()),
        "response/length_mean": float(batch.lengths_B.mean()),
        "response/length_max": float(batch.lengths_B.max()),
        "response/clip_ratio": float(batch.truncated_B.mean()),
    }
    out.update(analysis)
    return out
