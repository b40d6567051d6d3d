"""RareArena cases: read and validate, build the prompt, split, and write the trainer's files.

Reproduces DiagnosisZero's preparation: the case text is `case_report + " " + test_results`,
stripped; the labels are {diagnosis, Orpha_name} without duplicates; the first
int(n * train_ratio) records in file order are the training set, the rest the test set; a
prompt over max_prompt_length tokens is dropped, as the seed's dataset filter drops it. Bad
input stops with an error naming file:line and field, or is skipped and counted on request.
A record repeated whole (same `_id`, same content) is kept once and counted; two records that
share an `_id` but differ are refused, since one id would then sit in both splits.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tqdm import tqdm

from jaxzero.errors import ConfigError, DataError
from jaxzero.io.tokenizer import chat_text

PLACEHOLDER = "{case_text}"
LONG_PROMPT_POLICIES = ("drop", "truncate_left")
MAX_REPORTED = 10  # bad records whose messages are kept for the summary

# Required fields and their JSON types. `test_results` is RDC's only; `age`, `gender` and
# `pub_date` are optional and unused.
_REQUIRED = {"_id": (str, int), "case_report": (str,), "diagnosis": (str,),
             "Orpha_name": (str,), "Orpha_id": (str, int)}
_JSON_TYPE = {str: "a string", int: "an integer"}
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # undecodable bytes, as surrogateescape keeps them
_SURROGATE = re.compile("[\ud800-\udfff]")  # a JSON escape such as "\\ud83d" left unpaired
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


@dataclasses.dataclass(frozen=True)
class Case:
    """One valid RareArena record."""

    id: str
    case_text: str
    diagnosis: str
    orpha_name: str
    orpha_id: str
    line: int  # where the record starts in its file

    @property
    def labels(self) -> list[str]:
        """[diagnosis, Orpha_name], stripped, without case-insensitive duplicates or blanks."""
        out: list[str] = []
        for name in (self.diagnosis.strip(), self.orpha_name.strip()):
            if name and name.lower() not in (o.lower() for o in out):
                out.append(name)
        return out


@dataclasses.dataclass(frozen=True)
class ReadStats:
    records: int       # valid records returned
    bad_records: int   # skipped (only with skip_bad_records)
    bad_messages: tuple[str, ...]  # the first MAX_REPORTED of them
    duplicates: int = 0            # valid records identical to an earlier one, dropped
    duplicate_messages: tuple[str, ...] = ()  # the first MAX_REPORTED of them


# ----------------------------------------------------------------------------- reading

def _position(raw: str, index: int, first_line: int) -> tuple[int, int]:
    line = first_line + raw.count("\n", 0, index)
    return line, index - (raw.rfind("\n", 0, index) + 1) + 1


def _jsonl_entries(text: str, path: str) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(text.split("\n"), start=1):
        if raw.strip():
            yield number, raw


def _array_entries(text: str, path: str) -> Iterator[tuple[int, str]]:
    """Each element's line and source text. A syntax error ends the file: past it, nothing
    says where the next element starts."""
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    if text.startswith("]", pos):
        pos = _JSON_SPACE.match(text, pos + 1).end()
    else:
        while True:
            try:
                _, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                bad = _NOT_UTF8.match(text, err.pos)
                what = (f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02X})" if bad
                        else f"malformed JSON ({err.msg})")
                raise DataError(f"{path}:{err.lineno}: {what} at column {err.colno}; the "
                                "rest of a JSON array cannot be read") from None
            line += text.count("\n", counted, pos)
            counted = pos
            yield line, text[pos:end]
            pos = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
                break
            else:
                lineno, col = _position(text, pos, 1)
                raise DataError(f"{path}:{lineno}: expected ',' or ']' after an array element "
                                f"at column {col}")
    if pos != len(text):
        lineno, col = _position(text, pos, 1)
        raise DataError(f"{path}:{lineno}: text after the closing ']' at column {col}")


def _not_utf8(raw: str, bad: re.Match, path: str, line: int) -> DataError:
    lineno, col = _position(raw, bad.start(), line)
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:  # the bad byte is outside any string
        record = None
    fields = [k for k, v in record.items() if isinstance(v, str) and _NOT_UTF8.search(v)] \
        if isinstance(record, dict) else []
    field = f"field '{fields[0]}' " if fields else ""
    return DataError(f"{path}:{lineno}: {field}is not UTF-8 text (byte "
                     f"0x{ord(bad.group()) - 0xDC00:02X} at column {col})")


def _parse(raw: str, path: str, line: int) -> dict:
    """Parse and validate one record; DataError names what is wrong."""
    where = f"{path}:{line}"
    bad_byte = _NOT_UTF8.search(raw)
    if bad_byte:
        raise _not_utf8(raw, bad_byte, path, line)
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    for field, types in _REQUIRED.items():
        if field not in record:
            raise DataError(f"{where}: field '{field}' is missing")
        value = record[field]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(_JSON_TYPE[t] for t in types)
            raise DataError(f"{where}: field '{field}' should be {wanted}, found "
                            f"{json.dumps(value, ensure_ascii=False)[:40]}")
    test_results = record.get("test_results")  # absent in RDS
    if test_results is not None and not isinstance(test_results, str):
        raise DataError(f"{where}: field 'test_results' should be a string, found "
                        f"{json.dumps(test_results, ensure_ascii=False)[:40]}")
    for field in (*_REQUIRED, "test_results"):
        if isinstance(record.get(field), str) and _SURROGATE.search(record[field]):
            raise DataError(f"{where}: field '{field}' holds an unpaired surrogate escape, "
                            "which is not text")
    for field in ("diagnosis", "case_report"):
        if not record[field].strip():
            raise DataError(f"{where}: field '{field}' is empty")
    return record


def _case(record: dict, line: int) -> Case:
    return Case(id=str(record["_id"]),
                case_text=f"{record['case_report']} {record.get('test_results') or ''}".strip(),
                diagnosis=record["diagnosis"], orpha_name=record["Orpha_name"],
                orpha_id=str(record["Orpha_id"]), line=line)


def _conflict(path: str, case_id: str, first: tuple[int, dict], line: int,
              record: dict) -> DataError:
    first_line, earlier = first
    fields = sorted(set(earlier) | set(record), key=str)
    differ = [f for f in fields if earlier.get(f, ...) != record.get(f, ...)]
    return DataError(f"{path}:{line}: _id {case_id!r} is also the id of line {first_line}, "
                     f"whose record differs (in {', '.join(repr(f) for f in differ)}); ids "
                     "must be unique, so remove or renumber one of the two")


def read_records(path: str | os.PathLike, *,
                 skip_bad_records: bool = False) -> tuple[list[Case], ReadStats]:
    """Valid cases of a RareArena file, JSON Lines (RDC.json, RDS.json) or a JSON array.

    A bad record (malformed JSON, a missing or mistyped field, an empty diagnosis or case
    report, bytes that are not UTF-8) raises DataError naming file:line and field, unless
    skip_bad_records, which skips and counts it. Syntax errors in a JSON array always raise.
    A valid record equal to an earlier one is dropped and counted (`ReadStats.duplicates`);
    one that shares an earlier record's `_id` but differs from it raises, naming both lines.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    # surrogateescape keeps undecodable bytes as markers, so each is reported at its line.
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    entries = _array_entries if text.lstrip().startswith("[") else _jsonl_entries
    cases, bad, messages = [], 0, []
    seen: dict[str, tuple[int, dict]] = {}  # id -> (line, record) of its first occurrence
    duplicates: list[str] = []
    for line, raw in entries(text, str(path)):
        try:
            record = _parse(raw, str(path), line)
        except DataError as err:
            if not skip_bad_records:
                raise DataError(f"{err} (pass --skip-bad-records to skip and count such "
                                "records)") from None
            bad += 1
            if len(messages) < MAX_REPORTED:
                messages.append(str(err))
            continue
        case = _case(record, line)
        if case.id in seen:
            # Skipping cannot choose between two versions of one case: always refused.
            if seen[case.id][1] != record:
                raise _conflict(str(path), case.id, seen[case.id], line, record)
            duplicates.append(f"{path}:{line}: repeats line {seen[case.id][0]} "
                              f"(_id {case.id!r})")
            continue
        seen[case.id] = (line, record)
        cases.append(case)
    return cases, ReadStats(len(cases), bad, tuple(messages), len(duplicates),
                            tuple(duplicates[:MAX_REPORTED]))


# ----------------------------------------------------------------------------- prompts

def load_prompt_template(path: str | os.PathLike | None = None) -> str:
    """The user-turn template with one `{case_text}`; by default the packaged, verbatim
    DiagnosisZero prompt. One trailing newline of the file is not part of the template."""
    try:
        if path is None:
            text = (importlib.resources.files("jaxzero.diagnosis") / "templates" /
                    "diagnosis_prompt.txt").read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"prompt template {path}: cannot read ({err})") from None
    text = text.removesuffix("\n")
    if text.count(PLACEHOLDER) != 1:
        raise ConfigError(f"prompt template {path or 'diagnosis_prompt.txt'} must contain "
                          f"{PLACEHOLDER} exactly once, found {text.count(PLACEHOLDER)}")
    return text


def build_prompt_text(case_text: str, template: str) -> str:
    """The user turn: the template with the case text in place (no other braces are read)."""
    return template.replace(PLACEHOLDER, case_text)


def split_cases(cases: Sequence[Case], train_ratio: float,
                shuffle_seed: int | None = None) -> tuple[list[Case], list[Case]]:
    """The first int(n * train_ratio) cases for training, the rest for testing; shuffled
    first (seeded) only if shuffle_seed is given."""
    if not 0.0 <= train_ratio <= 1.0:
        raise ConfigError(f"train_ratio must be in [0, 1], got {train_ratio}")
    cases = list(cases)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(cases))
        cases = [cases[i] for i in order]
    n_train = int(len(cases) * train_ratio)
    return cases[:n_train], cases[n_train:]


def _fit_left(case_text: str, template: str, tokenizer, max_len: int,
              excess: int) -> tuple[str, list[int]]:
    """Drop tokens from the start of the case text until the chat prompt fits in max_len."""
    offsets = tokenizer(case_text, add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    drop = 0
    while excess > 0:
        drop += excess  # token boundaries may merge, so re-measure after each cut
        if drop >= len(offsets):
            raise ConfigError(f"the prompt template alone is over max_prompt_length {max_len} "
                              "tokens; raise max_prompt_length")
        text = case_text[offsets[drop][0]:].lstrip()
        ids = tokenizer.encode(chat_text(tokenizer, build_prompt_text(text, template)),
                               add_special_tokens=False)
        excess = len(ids) - max_len
    return text, ids


# ----------------------------------------------------------------------------- preparing

@dataclasses.dataclass(frozen=True)
class PrepareStats:
    """What `prepare_data` read, dropped and wrote; `format()` is the CLI's summary."""

    input_path: str
    records_read: int      # valid records, duplicates excluded
    bad_records: int       # skipped (only with skip_bad_records)
    duplicates: int        # valid records identical to an earlier one, dropped
    dropped_too_long: int  # over max_prompt_length under the "drop" policy
    truncated: int         # case text cut from the left under "truncate_left"
    train_size: int
    test_size: int
    max_prompt_length: int | None  # None: no tokenizer, so lengths were not measured
    longest_prompt: int | None     # tokens in the longest prompt written
    train_path: str
    test_path: str
    bad_messages: tuple[str, ...] = ()
    duplicate_messages: tuple[str, ...] = ()

    def format(self) -> str:
        total = self.records_read + self.bad_records + self.duplicates
        lines = [f"read {total} records from {self.input_path}: {self.records_read} valid, "
                 f"{self.bad_records} bad, {self.duplicates} duplicates"]
        for count, messages, what in ((self.bad_records, self.bad_messages, "skipped bad"),
                                      (self.duplicates, self.duplicate_messages,
                                       "dropped duplicate")):
            if count:
                shown = len(messages)
                lines.append(f"{what} records (first {shown}):" if shown < count
                             else f"{what} records:")
                lines += [f"  {m}" for m in messages]
        if self.max_prompt_length is None:
            lines.append("no tokenizer: prompts were not tokenized here; the trainer "
                         "tokenizes them and drops those over data.max_prompt_length")
        else:
            lines.append(f"prompts over {self.max_prompt_length} tokens: "
                         f"{self.dropped_too_long} dropped, {self.truncated} truncated from "
                         f"the left; longest kept: {self.longest_prompt} tokens")
        lines.append(f"train: {self.train_size} records -> {self.train_path}")
        lines.append(f"test: {self.test_size} records -> {self.test_path}")
        return "\n".join(lines)


def _token_ids(texts: Sequence[str], tokenizer, desc: str, chunk: int = 256) -> Iterator[list]:
    """Token ids of each text, in batched calls under a progress bar (shown on a terminal)."""
    with tqdm(total=len(texts), desc=desc, unit="prompt", disable=None) as bar:
        for start in range(0, len(texts), chunk):
            part = texts[start:start + chunk]
            yield from tokenizer(list(part), add_special_tokens=False)["input_ids"]
            bar.update(len(part))


def _prepared_rows(cases: Sequence[Case], template: str, tokenizer, max_len: int,
                   policy: str, desc: str) -> tuple[list[dict], int, int, int]:
    """(rows, dropped, truncated, longest prompt in tokens)."""
    prompts = [build_prompt_text(c.case_text, template) for c in cases]
    rows = [{"id": c.id, "case_text": c.case_text, "prompt": p, "labels": c.labels,
             "orpha_id": c.orpha_id, "diagnosis": c.diagnosis} for c, p in zip(cases, prompts)]
    if tokenizer is None or not rows:
        return rows, 0, 0, 0
    texts = [chat_text(tokenizer, p) for p in prompts]
    kept, dropped, truncated = [], 0, 0
    for row, text, ids in zip(rows, texts, _token_ids(texts, tokenizer, desc)):
        if len(ids) > max_len:
            if policy == "drop":
                dropped += 1
                continue
            case_text, ids = _fit_left(row["case_text"], template, tokenizer, max_len,
                                       len(ids) - max_len)
            row["prompt"] = build_prompt_text(case_text, template)
            text = chat_text(tokenizer, row["prompt"])
            truncated += 1
        kept.append({**row, "prompt_text": text, "prompt_token_ids": list(ids)})
    longest = max((len(r["prompt_token_ids"]) for r in kept), default=0)
    return kept, dropped, truncated, longest


def write_prepared(rows: Sequence[dict], path: Path) -> None:
    """Prepared records to a JSON-lines file, one per line, written whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a crash never leaves a half-written file under the real name


OUTPUT_FILES = ("train.jsonl", "test.jsonl", "prepare_stats.json")


def check_output_dir(out_dir: str | os.PathLike, *, force: bool = False) -> None:
    """Refuses an output path that is not a directory, and a non-empty directory unless
    `force` (which replaces the prepared files there and leaves any others alone)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output directory {out} exists and is not a directory")
    if out.is_dir() and not force:
        held = sorted(p.name for p in out.iterdir())
        if held:
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise DataError(f"output directory {out} is not empty (it holds {shown}); pass "
                            "--force to replace its prepared files, or choose another "
                            "directory")


def prepare_data(input_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 train_ratio: float = 0.7, tokenizer=None, max_prompt_length: int = 1024,
                 long_prompt_policy: str = "drop", skip_bad_records: bool = False,
                 shuffle_seed: int | None = None, template: str | None = None,
                 force: bool = False) -> PrepareStats:
    """Write out_dir/train.jsonl, test.jsonl and prepare_stats.json from a RareArena file.

    The split comes first, over all valid records in file order (DiagnosisZero's split), and
    long prompts are dropped or truncated within each side after it, so both sides hold the
    same cases as the original's, less the dropped ones. Without a tokenizer, prompts are
    neither tokenized nor length-checked here (the trainer does both: `with_prompt_ids`).
    A non-empty out_dir is refused unless `force`; nothing is created before the input reads.
    """
    check_output_dir(out_dir, force=force)
    if long_prompt_policy not in LONG_PROMPT_POLICIES:
        raise ConfigError(f"long_prompt_policy must be one of {LONG_PROMPT_POLICIES}, got "
                          f"{long_prompt_policy!r}")
    if max_prompt_length < 1:
        raise ConfigError(f"max_prompt_length must be positive, got {max_prompt_length}")
    if template is None:
        template = load_prompt_template()
    elif template.count(PLACEHOLDER) != 1:
        raise ConfigError(f"the prompt template must contain {PLACEHOLDER} exactly once")
    cases, read = read_records(input_path, skip_bad_records=skip_bad_records)
    if not cases:
        raise DataError(f"{input_path}: no valid records")
    train, test = split_cases(cases, train_ratio, shuffle_seed)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes, dropped, truncated, longest = {}, 0, 0, 0
    for name, part in (("train", train), ("test", test)):
        rows, d, t, n = _prepared_rows(part, template, tokenizer, max_prompt_length,
                                       long_prompt_policy, desc=f"tokenizing {name}")
        write_prepared(rows, out / f"{name}.jsonl")
        sizes[name], dropped, truncated, longest = len(rows), dropped + d, truncated + t, \
            max(longest, n)
    stats = PrepareStats(
        input_path=str(input_path), records_read=read.records, bad_records=read.bad_records,
        duplicates=read.duplicates, dropped_too_long=dropped, truncated=truncated, train_size=sizes["train"],
        test_size=sizes["test"],
        max_prompt_length=None if tokenizer is None else max_prompt_length,
        longest_prompt=None if tokenizer is None else longest,
        train_path=str(out / "train.jsonl"), test_path=str(out / "test.jsonl"),
        bad_messages=read.bad_messages, duplicate_messages=read.duplicate_messages)
    settings = {"train_ratio": train_ratio, "shuffle_seed": shuffle_seed,
                "long_prompt_policy": long_prompt_policy, "tokenized": tokenizer is not None}
    (out / "prepare_stats.json").write_text(
        json.dumps({**dataclasses.asdict(stats), "settings": settings}, indent=1,
                   ensure_ascii=False) + "\n", encoding="utf-8")
    return stats


# ----------------------------------------------------------------------------- reading back

_PREPARED_FIELDS = {"id": str, "case_text": str, "prompt": str, "labels": list,
                    "orpha_id": str, "diagnosis": str}
_TOKENIZED_FIELDS = {"prompt_text": str, "prompt_token_ids": list}


def _check_prepared(row, where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(row).__name__}")
    tokenized = [f for f in _TOKENIZED_FIELDS if f in row]
    if len(tokenized) == 1:
        missing = next(f for f in _TOKENIZED_FIELDS if f not in row)
        raise DataError(f"{where}: field '{missing}' is missing (it comes with "
                        f"'{tokenized[0]}')")
    for field, kind in {**_PREPARED_FIELDS, **_TOKENIZED_FIELDS}.items():
        if field not in row:
            if field in _TOKENIZED_FIELDS:
                continue
            raise DataError(f"{where}: field '{field}' is missing")
        if not isinstance(row[field], kind):
            raise DataError(f"{where}: field '{field}' should be a {kind.__name__}, found "
                            f"{type(row[field]).__name__}")
    for field in ("prompt", "diagnosis"):
        if not row[field].strip():
            raise DataError(f"{where}: field '{field}' is empty")
    if not row["labels"] or not all(isinstance(x, str) and x.strip() for x in row["labels"]):
        raise DataError(f"{where}: field 'labels' should be a non-empty list of non-empty "
                        "strings")
    ids = row.get("prompt_token_ids")
    if ids is not None and not (ids and all(type(i) is int and i >= 0 for i in ids)):
        raise DataError(f"{where}: field 'prompt_token_ids' should be a non-empty list of "
                        "non-negative integers")


def read_prepared(path: str | os.PathLike) -> list[dict]:
    """The records of a train.jsonl or test.jsonl written by prepare_data, validated."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02X} at byte "
                            f"{err.start + 1})") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") \
                from None
        _check_prepared(row, where)
        rows.append(row)
    return rows


def with_prompt_ids(records: list[dict], tokenizer, max_len: int, *,
                    source: str | os.PathLike = "prepared data") -> tuple[list[dict], int]:
    """(records whose prompts fit in max_len tokens, how many were dropped).

    Rows prepared without a tokenizer get `prompt_token_ids` here, through the chat template.
    A prompt over max_len is dropped, as DiagnosisZero's dataset filter drops it: cutting it
    would keep its end and lose the system header and the instructions at its start.
    """
    missing = [r for r in records if not r.get("prompt_token_ids")]
    texts = [chat_text(tokenizer, r["prompt"]) for r in missing]
    for row, ids in zip(missing, _token_ids(texts, tokenizer, "tokenizing prompts")):
        row["prompt_token_ids"] = list(ids)
    kept = [r for r in records if len(r["prompt_token_ids"]) <= max_len]
    if records and not kept:
        longest = max(len(r["prompt_token_ids"]) for r in records)
        raise DataError(f"{source}: every prompt is over max_prompt_length {max_len} tokens "
                        f"(the shortest has {min(len(r['prompt_token_ids']) for r in records)}"
                        f", the longest {longest}); raise data.max_prompt_length")
    return kept, len(records) - len(kept)
