"""Kept generations: reused by case and prompt, one file per checkpoint and settings."""

import pytest

from jaxzero.diagnosis.generations import GenerationStore
from jaxzero.errors import DataError

SETTINGS = {"max_new_tokens": 8, "top_k": 1, "dtype": "float32"}


def test_kept_reused_and_separated(tmp_path):
    store = GenerationStore(tmp_path, "/runs/r@5", SETTINGS)
    store.put_many(["a", "b"], [[1, 2], [3]], ["<answer>X</answer>", "y"], [4, 1])
    again = GenerationStore(tmp_path, "/runs/r@5", SETTINGS)
    assert again.path == store.path and again.path.name.startswith("r@5-")
    assert again.get("a", [1, 2]) == ("<answer>X</answer>", 4)
    assert again.get("a", [1, 9]) is None          # another prompt for the same case id
    assert GenerationStore(tmp_path, "/runs/r@5", {**SETTINGS, "top_k": 5}).path != store.path
    assert GenerationStore(tmp_path, "/other/r@5", SETTINGS).path != store.path


def test_torn_last_line_is_cut_and_corruption_refused(tmp_path):
    store = GenerationStore(tmp_path, "m", SETTINGS)
    store.put_many(["a"], [[1]], ["x"], [1])
    with open(store.path, "a") as f:
        f.write('{"id": "b", "pro')
    assert len(GenerationStore(tmp_path, "m", SETTINGS)) == 1
    with open(store.path, "a") as f:
        f.write("garbage\n")
    with pytest.raises(DataError, match="line 2: not a kept generation"):
        GenerationStore(tmp_path, "m", SETTINGS)
