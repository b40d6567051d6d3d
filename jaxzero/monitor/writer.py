"""TensorBoard logging (process 0 only) and the one-line console summary of a step."""

from __future__ import annotations

import json
from pathlib import Path

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


def console_line(step: int, metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    shown = [f"{k.split('/')[-1]} {metrics[k]:.4g}" for k in keys if k in metrics]
    return f"step {step:5d} | " + " | ".join(shown)
