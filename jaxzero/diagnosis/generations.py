"""Greedy generations kept on disk per checkpoint, so a re-run after a judge failure only judges.

`OUT/generations/<checkpoint>-<digest>.jsonl` holds one JSON line `{"id", "prompt", "response",
"length"}` per case, appended as each batch finishes; `prompt` is a digest of the prompt's
token ids. The digest in the file name covers the checkpoint and every setting that changes a
greedy completion (`max_new_tokens`, `top_k`, dtype), so other settings get another file and
nothing is ever overwritten. A torn last line (a run killed mid-write) is cut off on open.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

from jaxzero.io.jsonl import complete_lines
from jaxzero.errors import DataError

GENERATIONS_DIR = "generations"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def prompt_digest(prompt_ids: Sequence[int]) -> str:
    return _digest([int(i) for i in prompt_ids])


class GenerationStore:
    """The kept generations of one checkpoint under one set of settings."""

    def __init__(self, out_dir: str | Path, checkpoint: str, settings: dict):
        slug = re.sub(r"[^A-Za-z0-9@._-]+", "_", Path(checkpoint).name).strip("_")[:80]
        self.path = (Path(out_dir) / GENERATIONS_DIR /
                     f"{slug}-{_digest([checkpoint, settings])}.jsonl")
        self._kept: dict[tuple[str, str], tuple[str, int]] = {}
        if self.path.exists():
            self._load()

    def _load(self):
        for lineno, line in complete_lines(self.path, "kept generations"):
            try:
                row = json.loads(line.decode("utf-8"))
                self._kept[(row["id"], row["prompt"])] = (row["response"], int(row["length"]))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                    ValueError) as err:
                raise DataError(f"{self.path}: line {lineno}: not a kept generation ({err!r}); "
                                "delete the file to generate afresh") from None

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, case_id: str, prompt_ids: Sequence[int]) -> tuple[str, int] | None:
        return self._kept.get((case_id, prompt_digest(prompt_ids)))

    def put_many(self, case_ids: Sequence[str], prompt_ids: Sequence[Sequence[int]],
                 responses: Sequence[str], lengths: Sequence[int]):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for case_id, ids, text, n in zip(case_ids, prompt_ids, responses, lengths):
                key = (case_id, prompt_digest(ids))
                f.write(json.dumps({"id": key[0], "prompt": key[1], "response": text,
                                    "length": int(n)}, ensure_ascii=False) + "\n")
                self._kept[key] = (text, int(n))
