"""The seam between the GRPO engine and a task: what the engine needs, and nothing of how.

The engine (rollout.py, trainer.py, setup.py) knows records only as dicts with an "id" and
"prompt_token_ids"; everything else about them (what a right answer is, how text is scored,
which properties of a response are worth logging, how a model is evaluated) is the task's.
A task is one frozen object of plain callables, as tunix hands reward functions to its
learner: the diagnosis task (jaxzero/diagnosis/task.py) is one, the toy task of the tests
(emit the tokens 5, 6, 7) another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Record = dict  # at least "id" (str) and "prompt_token_ids" (list[int]); the rest is the task's
# (params, prompt token lists) -> a sampler output (tokens, lengths) of one greedy row each
Generate = Callable[[Any, Sequence[Sequence[int]]], Any]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One completion as logged in the text panels: its prompt, text, score and target."""

    prompt: str
    completion: str
    score: float
    target: Any


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """An eval's outcome: un-namespaced metrics (the engine logs them under eval/), the number
    of cases they are over, and a few samples for the text panel."""

    metrics: dict[str, float]
    cases: int
    samples: tuple[Sample, ...]


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task hands the engine.

    decode:   the completions' token ids (stop token excluded) -> texts.
    reward:   (texts [B], targets [B]) -> float32 scores [B]; called on the reward thread.
    target:   a record -> what `reward` compares a completion against.
    prompt_text: a record -> its prompt as a person reads it (text panels only).
    analyze:  texts -> namespaced rates over the batch (e.g. {"format/format_ok": 0.9}).
    evaluate: (greedy generate, params, records) -> an Evaluation; the engine times it.
    correct_score: the score at or above which a completion counts as right (reward/accuracy).
    warmup:   None, or (graphdef, params, mesh, log) -> params, run once before a fresh run's
              first step (the demo's warm-up).
    sources:  {"train": file, "test": file or None}, the files the records came from: the run
              directory fingerprints them (a resume on other data is refused) and names them
              in data errors; empty for a task whose records are made in memory.
    """

    name: str
    train_records: tuple[Record, ...]
    test_records: tuple[Record, ...]
    decode: Callable[[list[list[int]]], list[str]]
    reward: Callable[[Sequence[str], Sequence[Any]], np.ndarray]
    target: Callable[[Record], Any]
    prompt_text: Callable[[Record], str]
    analyze: Callable[[Sequence[str]], dict[str, float]]
    evaluate: Callable[[Generate, Any, Sequence[Record]], Evaluation]
    correct_score: float
    warmup: Callable[..., Any] | None = None
    sources: Mapping[str, Path | None] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "train_records", tuple(self.train_records))
        object.__setattr__(self, "test_records", tuple(self.test_records))
        for where, records in (("train", self.train_records), ("test", self.test_records)):
            for r in records:
                if "id" not in r or not r.get("prompt_token_ids"):
                    raise ValueError(f"task {self.name!r}: a {where} record lacks an id or "
                                     f"prompt_token_ids: {sorted(r)}")
        ids = [r["id"] for r in self.train_records]
        if len(set(ids)) != len(ids):
            # The processes of a multi-host run exchange records by id.
            raise ValueError(f"task {self.name!r}: training record ids are not unique")


# (run config, run directory, tokenizer) -> the Task; the trainer calls it once the run
# directory and the tokenizer exist (a demo task prepares its data into the run directory).
TaskFactory = Callable[[Any, Path, Any], Task]
