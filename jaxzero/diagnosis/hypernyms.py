"""RareArena's Orphanet hypernym table: the score-1 (hypernym) labels of a case.

The file (`orphanet_hypernym.json` in RareArena) is a JSON array of entries
`{"Orphanetid": "5", "name": str, "type": str, "parents": [{"parent": str,
"parent_child_count": int, "parent_disease_count": int}, ...]}`. RareArena's judge accepts as a
hypernym only a parent that groups few diseases (`parent_disease_count <= 10`): a broad class
such as "Rare hereditary metabolic disease" would otherwise earn credit for nearly any answer.

Two lookups: `hypernyms` (jaxzero's: by id, else by case-folded name, deduplicated) and
`rarearena_sets` (RareArena's `eval_updated.py`, reproduced as it runs: see its docstring).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from jaxzero.errors import DataError

DEFAULT_MAX_DISEASE_COUNT = 10

_ORPHA_ID = re.compile(r"(?:ORPHA:)?(\d+)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Parent:
    name: str
    child_count: int
    disease_count: int


@dataclasses.dataclass(frozen=True)
class Disease:
    orpha_id: str
    name: str
    type: str
    parents: tuple[Parent, ...]


def normalize_orpha_id(orpha_id: str | int) -> str:
    """'5', 5 and 'ORPHA:5' all name Orphanet entry '5' (the file stores ids as digit strings)."""
    if isinstance(orpha_id, bool) or not isinstance(orpha_id, (str, int)):
        raise DataError(f"Orphanet id {orpha_id!r} is not a string or an integer")
    match = _ORPHA_ID.fullmatch(str(orpha_id).strip())
    if match is None:
        raise DataError(f"Orphanet id {orpha_id!r} is not digits or 'ORPHA:<digits>'")
    return str(int(match.group(1)))


@dataclasses.dataclass(frozen=True)
class HypernymTable:
    """Orphanet entries by id and by case-folded name, and the score-1 cut-off."""

    by_id: Mapping[str, Disease]
    id_by_name: Mapping[str, str]
    max_disease_count: int = DEFAULT_MAX_DISEASE_COUNT

    def __post_init__(self):
        if self.max_disease_count < 1:
            raise ValueError(f"max_disease_count must be >= 1, got {self.max_disease_count}")
        # RareArena's name -> parents dict is rebuilt for each entry of a name, so the last
        # entry of a repeated name wins; by_id keeps file order, so a forward pass does too.
        by_name = {d.name: d for d in self.by_id.values()}
        object.__setattr__(self, "_last_by_name", MappingProxyType(by_name))

    def rarearena_sets(self, orpha_id: str | int | None,
                       diagnosis: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(score-2 set, score-1 set) as RareArena's `eval_updated.py` builds them:
        - the Orphanet name is the table's name for the case's id, or the diagnosis when the
          id is not in the table;
        - score 2: [diagnosis], plus that name when it differs ignoring case;
        - score 1: the parents with `parent_disease_count <= max_disease_count` of the entry
          with exactly that name (the last such entry), in file order, repeats kept; () when
          no entry has that name.
        """
        disease = None
        if orpha_id is not None and orpha_id != "":
            disease = self.by_id.get(normalize_orpha_id(orpha_id))
        name = disease.name if disease is not None else diagnosis
        score2 = (diagnosis,) if diagnosis.lower() == name.lower() else (diagnosis, name)
        entry = self._last_by_name.get(name)
        if entry is None:
            return score2, ()
        return score2, tuple(p.name for p in entry.parents
                             if p.disease_count <= self.max_disease_count)

    def find(self, orpha_id: str | int | None = None, name: str | None = None) -> Disease | None:
        """The entry for an Orpha id, else for an exact (case-insensitive) name, else None."""
        if orpha_id is not None and orpha_id != "":
            disease = self.by_id.get(normalize_orpha_id(orpha_id))
            if disease is not None:
                return disease
        if name:
            key = self.id_by_name.get(name.strip().casefold())
            if key is not None:
                return self.by_id[key]
        return None

    def hypernyms(self, orpha_id: str | int | None = None,
                  name: str | None = None) -> tuple[str, ...]:
        """The parents with `disease_count <= max_disease_count`, in file order, deduplicated;
        () for a case the table does not know (RareArena then judges without a score-1 set)."""
        disease = self.find(orpha_id, name)
        if disease is None:
            return ()
        kept = [p.name for p in disease.parents if p.disease_count <= self.max_disease_count]
        return tuple(dict.fromkeys(kept))


def _field(entry: dict, key: str, kind: type, where: str):
    if key not in entry:
        raise DataError(f"{where}: missing field {key!r}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} should be {kind.__name__}, "
                        f"got {type(value).__name__} {value!r}")
    return value


def _parse_parent(raw, where: str) -> Parent:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: should be an object, got {type(raw).__name__}")
    name = _field(raw, "parent", str, where).strip()
    if not name:
        raise DataError(f"{where}: field 'parent' is empty")
    counts = [_field(raw, k, int, where) for k in ("parent_child_count", "parent_disease_count")]
    if min(counts) < 0:
        raise DataError(f"{where}: negative count {counts}")
    return Parent(name, *counts)


def _parse_entry(raw, where: str) -> Disease:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: should be an object, got {type(raw).__name__}")
    raw_id = raw.get("Orphanetid")
    if raw_id is None:
        raise DataError(f"{where}: missing field 'Orphanetid'")
    try:
        orpha_id = normalize_orpha_id(raw_id)
    except DataError as err:
        raise DataError(f"{where}: field 'Orphanetid': {err}") from None
    name = _field(raw, "name", str, where).strip()
    if not name:
        raise DataError(f"{where}: field 'name' is empty")
    parents = _field(raw, "parents", list, where)
    return Disease(orpha_id, name, _field(raw, "type", str, where),
                   tuple(_parse_parent(p, f"{where} parents[{j}]") for j, p in enumerate(parents)))


def load_hypernyms(path: str | Path,
                   max_disease_count: int = DEFAULT_MAX_DISEASE_COUNT) -> HypernymTable:
    """Read and validate the whole table; a malformed file raises DataError naming the file,
    the entry index and the field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                        f"{err.msg})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: should be a JSON array of Orphanet entries, "
                        f"got {type(raw).__name__}")
    by_id: dict[str, Disease] = {}
    id_by_name: dict[str, str] = {}
    for i, entry in enumerate(raw):
        disease = _parse_entry(entry, f"{path}: entry {i}")
        if disease.orpha_id in by_id:
            raise DataError(f"{path}: entry {i}: field 'Orphanetid': duplicate id "
                            f"{disease.orpha_id}")
        by_id[disease.orpha_id] = disease
        id_by_name.setdefault(disease.name.casefold(), disease.orpha_id)
    return HypernymTable(MappingProxyType(by_id), MappingProxyType(id_by_name),
                         max_disease_count)
