"""Append-only JSON-lines files that survive a kill mid-write: a torn last line is cut off."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def complete_lines(path: str | Path, what: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of each whole line of an append-only file. A torn last line (the
    writer killed mid-line) is cut off the file, with a warning naming `what` it held."""
    path = Path(path)
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s %s: dropping a torn last line (%d bytes)", what, path, len(data) - cut)
        data = data[:cut]
        with open(path, "r+b") as f:
            f.truncate(cut)
    yield from enumerate(data.split(b"\n")[:-1], 1)
