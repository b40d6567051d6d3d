"""TensorBoard logging (process 0 only) and the console: one aligned line per step and per
eval, phase notes for slow first calls, and an optional JSON-lines log."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

from jaxzero.parallel.distributed import is_main_process


class MetricsWriter:
    """Namespaced scalars, text panels and the hyperparameter table, from process 0 only."""

    def __init__(self, log_dir: str | Path):
        self._writer = None
        if is_main_process():
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(str(log_dir), flush_secs=10)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            value = float(value)
            if np.isfinite(value):
                self._writer.add_scalar(tag, value, step)

    def text(self, step: int, tag: str, markdown: str) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, markdown, step)

    def hparams(self, flat_config: dict[str, object]) -> None:
        """The run's hyperparameters as a markdown table (tensorboard's TEXT tab)."""
        if self._writer is None:
            return
        rows = "\n".join(f"|{k}|{json.dumps(v) if not isinstance(v, str) else v}|"
                         for k, v in sorted(flat_config.items()))
        self._writer.add_text("hyperparameters", "|parameter|value|\n|-|-|\n" + rows, 0)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def samples_markdown(prompts: list[str], completions: list[str], rewards: list[float],
                     labels: list[list[str]]) -> str:
    """A text panel: a few prompts with their completion, reward and ground truth."""
    parts = []
    for i, (p, c, r, lab) in enumerate(zip(prompts, completions, rewards, labels)):
        tail = p[-300:].replace("\n", " ")
        parts.append(f"**example {i}** · reward {r:.2f} · labels {lab}\n\n"
                     f"prompt (end): `…{tail}`\n\n```\n{c}\n```")
    return "\n\n---\n\n".join(parts)


# (metric, label, format) of the step line, in order; absent metrics are left out.
STEP_FIELDS = (("reward/mean", "reward", ".2f"), ("reward/accuracy", "acc", ".2f"),
               ("format/format_ok", "format", ".2f"), ("response/length_mean", "len", ".1f"),
               ("losses/kl", "kl", ".3f"), ("optim/grad_norm", "grad", ".2f"))
# The same for an eval line (the eval's metrics, before their eval/ namespace).
EVAL_FIELDS = (("reward_mean", "reward", ".2f"), ("format_ok", "format", ".2f"),
               ("think_dropped", "think-dropped", ".2f"),
               ("mixed_language", "mixed-language", ".2f"))


def clock(seconds: float) -> str:
    """H:MM:SS."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _fields(metrics: dict[str, float], fields) -> list[str]:
    return [f"{label} {metrics[key]:{fmt}}" for key, label, fmt in fields if key in metrics]


def step_line(step: int, total: int, metrics: dict[str, float], *, elapsed: float,
              eta: float | None) -> str:
    """`step 12/40 · 0:01:43 elapsed · ETA 0:04:10 | reward 0.42 · … · 3.2 s/step`."""
    head = f"step {step:{len(str(total))}d}/{total} · {clock(elapsed)} elapsed · ETA " \
           f"{clock(eta) if eta is not None else '-:--:--'}"
    tail = _fields(metrics, STEP_FIELDS)
    if "time/step" in metrics:
        tail.append(f"{metrics['time/step']:.1f} s/step")
    return head + " | " + " · ".join(tail)


def eval_line(step: int, metrics: dict[str, float], cases: int, seconds: float) -> str:
    """`eval @ step 10: accuracy 0.31 (64 cases) · reward 0.42 · … · 12.3 s`."""
    parts = [f"accuracy {metrics['accuracy']:.2f} ({cases} cases)"] if "accuracy" in metrics \
        else [f"{cases} cases"]
    return f"eval @ step {step}: " + " · ".join(parts + _fields(metrics, EVAL_FIELDS)
                                                 + [f"{seconds:.1f} s"])


def json_line(step: int, metrics: dict[str, float]) -> str:
    """One JSON object; NaN and infinities become null (JSON has no such numbers)."""
    clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
    return json.dumps({"step": step, **clean}, allow_nan=False)


class Console:
    """What a run shows: step and eval lines, notes, and the JSON-lines log, on process 0.

    `quiet` keeps only the lines `always` prints (the end-of-run summary, a signal). The
    JSON log gets what `record` is handed: the trainer hands it one object per logged step
    (with that step's eval, if any) and one for the eval before the first step."""

    def __init__(self, log: Callable[[str], None] = print, *, quiet: bool = False,
                 json_out: IO[str] | None = None, main: bool | None = None):
        self._log = log
        self._quiet = quiet
        self._json = json_out
        self._main = is_main_process() if main is None else main
        self._seen: set = set()

    def info(self, message: str) -> None:
        if self._main and not self._quiet:
            self._log(message)

    def always(self, message: str) -> None:
        if self._main:
            self._log(message)

    def phase(self, key, message: str) -> None:
        """A note shown the first time `key` comes up (what a slow first call is doing)."""
        if key not in self._seen:
            self._seen.add(key)
            self.info(message)

    def step(self, step: int, total: int, metrics: dict[str, float], *, elapsed: float,
             eta: float | None) -> None:
        self.info(step_line(step, total, metrics, elapsed=elapsed, eta=eta))

    def eval(self, step: int, metrics: dict[str, float], cases: int, seconds: float) -> None:
        self.info(eval_line(step, metrics, cases, seconds))

    def record(self, step: int, metrics: dict[str, float]) -> None:
        if self._main and self._json is not None:
            self._json.write(json_line(step, metrics) + "\n")
            self._json.flush()
