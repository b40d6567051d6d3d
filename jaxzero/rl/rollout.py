"""From sampled rollouts to a GRPO batch: decode, score off the device path, advantages."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from jaxzero.rl import grpo
from jaxzero.diagnosis import reward
from jaxzero.diagnosis.analysis import analyze_response, summarize


@dataclasses.dataclass(frozen=True)
class ScoredRollouts:
    """Host-side results of one rollout batch (B = prompts × n, contiguous per prompt)."""

    texts: list[str]
    scores_B: np.ndarray
    analysis: dict[str, float]


class RewardWorker:
    """Decodes and scores rollouts in a background thread while the device works on."""

    def __init__(self, tokenizer, reward_kwargs: dict):
        self._tokenizer = tokenizer
        self._kwargs = reward_kwargs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def submit(self, tokens_BR: np.ndarray, lengths_B: np.ndarray,
               labels: list[list[str]]) -> Future:
        return self._pool.submit(self._score, tokens_BR, lengths_B, labels)

    def _score(self, tokens_BR, lengths_B, labels) -> ScoredRollouts:
        texts = self._tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(tokens_BR, lengths_B)], skip_special_tokens=True)
        scores = reward.score_batch(texts, labels, **self._kwargs)
        return ScoredRollouts(texts, np.asarray(scores, np.float32),
                              summarize([analyze_response(t) for t in texts]))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def group_spread(scores_B: np.ndarray, group_size: int) -> np.ndarray:
    """Per-group standard deviation of rewards (zero: the group teaches nothing)."""
    return scores_B.reshape(-1, group_size).std(axis=1)


def response_mask(valid_BR: np.ndarray, truncated_B: np.ndarray, mask_truncated: bool):
    """Response tokens that enter the loss; truncated responses drop out if asked."""
    mask = valid_BR.astype(np.float32)
    if mask_truncated:
        mask = mask * (~truncated_B)[:, None]
    return mask


def advantages(scores_B: np.ndarray, group_size: int, *, eps: float,
               scale_by_std: bool) -> np.ndarray:
    return np.asarray(grpo.group_advantages(scores_B, group_size, eps=eps,
                                            scale_by_std=scale_by_std), np.float32)


def rollout_metrics(scores_B, lengths_B, truncated_B, group_size: int, analysis: dict,
                    threshold_score: float) -> dict[str, float]:
    spread = group_spread(scores_B, group_size)
    out = {
        "reward/mean": float(scores_B.mean()),
        "reward/std": float(scores_B.std()),
        "reward/accuracy": float((scores_B >= threshold_score).mean()),
        "reward/zero_std_groups": float((spread == 0).mean()),
        "response/length_mean": float(lengths_B.mean()),
        "response/length_max": float(lengths_B.max()),
        "response/clip_ratio": float(truncated_B.mean()),
    }
    out.update({f"format/{k}": v for k, v in analysis.items()})
    return out
