"""Writing a model directory whole: into a temporary sibling, swapped in only when complete.

An interrupted conversion or export then leaves the target as it was (absent, or the old
files), and the next attempt clears the leftover sibling, which only jaxzero creates.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jaxzero.errors import CheckpointError


def sibling(out_dir: Path, tag: str) -> Path:
    """A hidden name beside `out_dir` that only jaxzero writes."""
    return out_dir.parent / f".{out_dir.name}.jaxzero-{tag}"


def holds_files(path: Path) -> bool:
    """True for a file, or a directory that is not empty."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_target(out_dir: Path, *, replace: bool, flag: str | None = "--force") -> None:
    """Refuses an existing file, or a non-empty directory unless `replace`; `flag` is the
    option that asks for the replacement (None: there is none)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file; choose a directory")
    if holds_files(out_dir) and not replace:
        how = (f", or pass {flag} to replace it (the new files are written beside it and "
               "swapped in only once complete)" if flag else "")
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new "
                              f"directory{how}")


def begin(out_dir: Path) -> Path:
    """A fresh, empty staging directory for `out_dir` (a leftover one is removed first)."""
    staging = sibling(out_dir, "partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit(staging: Path, out_dir: Path) -> None:
    """Swaps the complete `staging` in as `out_dir`; the old directory is deleted after."""
    old = sibling(out_dir, "old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(staging, out_dir)
    if old.exists():
        shutil.rmtree(old)
