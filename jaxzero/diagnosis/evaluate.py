"""Greedy generation over a test split, scored by the matching rule (used in training and by
`jaxzero eval`, which adds the LLM-judge protocol on top)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxzero.diagnosis import reward
from jaxzero.diagnosis.analysis import analyze_response, summarize
from jaxzero.parallel.sharding import to_host


@dataclasses.dataclass(frozen=True)
class EvalResult:
    prompts: list[str]
    completions: list[str]
    scores: list[float]
    labels: list[list[str]]
    lengths: list[int]
    metrics: dict[str, float]


def generate_texts(generate_fn, params, prompt_ids: list[list[int]], tokenizer,
                   batch_size: int) -> tuple[list[str], list[int]]:
    """Completions for every prompt, `batch_size` at a time; the last batch is padded with
    repeats of its first prompt so every call has the same shape (one compile)."""
    texts, lengths = [], []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start: start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (min(batch_size, len(prompt_ids)) - real)
        out = generate_fn(params, chunk)
        tokens, lens = to_host(out.tokens)[:real], to_host(out.lengths)[:real]
        texts += tokenizer.batch_decode([t[:n].tolist() for t, n in zip(tokens, lens)],
                                        skip_special_tokens=True)
        lengths += [int(n) for n in lens]
    return texts, lengths


def evaluate_records(generate_fn, params, records: list[dict], tokenizer, *,
                     reward_kwargs: dict, limit: int | None = None,
                     batch_size: int = 64) -> EvalResult:
    """Greedy completions for the records, with reward, accuracy and format rates."""
    records = records[:limit] if limit else records
    if not records:
        return EvalResult([], [], [], [], [], {})
    texts, lengths = generate_texts(generate_fn, params,
                                    [r["prompt_token_ids"] for r in records], tokenizer,
                                    batch_size)
    labels = [r["labels"] for r in records]
    scores = np.asarray(reward.score_batch(texts, labels, **reward_kwargs), np.float32)
    metrics = {
        "reward_mean": float(scores.mean()),
        "accuracy": float((scores >= reward_kwargs["score"]).mean()),
        "response_length_mean": float(np.mean(lengths)),
    }
    metrics.update(summarize([analyze_response(t) for t in texts]))
    prompts = [r.get("prompt", "") for r in records]
    return EvalResult(prompts, texts, [float(s) for s in scores], labels, lengths, metrics)
