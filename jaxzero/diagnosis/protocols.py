"""Judge protocols: where the judge's prompt comes from, how a case fills it, how a reply reads.

- `rarearena` (the default) is RareArena's `eval/eval_updated.py` (2026-03): `eval_prompt1`
  (scores 2 and 0) for a case without hypernyms, `eval_prompt2` (2, 1 and 0) otherwise; the
  score-2 set is [diagnosis, the Orphanet table's name for the case's id where it differs],
  the score-1 set the parents with `parent_disease_count <= 10` of that name
  (`HypernymTable.rarearena_sets`). Judge call: temperature 0.1, max_tokens 4096.
- `rarearena-2025` is `eval/eval.py` (2025-04): one prompt, `eval_prompt`, where 1 means "a
  broad category that includes the reference" and the reference is the diagnosis alone.
- `jaxzero` is jaxzero's own rewrite (`templates/judge_prompt.txt`): both sets as lists, the
  answers numbered, temperature 0 and 512 tokens.

The two RareArena protocols send the model's answer block as written (stripped, case kept)
and fill the templates with Python lists, as `str.format` does in RareArena's scripts.
RareArena's code is CC BY-NC-SA, so jaxzero ships none of its prompt text: it is read from the
user's checkout (`--rarearena-dir`) with `ast`, never executed.

Every reply is read twice (`parse_reply`): loosely, as RareArena's `eval/metric.py` does (every
`score (\\d+)`; top-1 the first, top-5 the largest of the first five, none read as 0), and
strictly (one `i. <name>: score S` line per ranked answer, S allowed by the prompt).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import re
import string
from importlib import resources
from pathlib import Path
from typing import ClassVar, Sequence

from jaxzero.diagnosis.hypernyms import HypernymTable
from jaxzero.diagnosis.reward import MAX_ANSWER_CHARS
from jaxzero.errors import DataError

PROTOCOLS = ("rarearena", "rarearena-2025", "jaxzero")
UNPARSED = "unparsed"

JAXZERO_PROMPT_FILE = "templates/judge_prompt.txt"
JAXZERO_PROMPT = resources.files("jaxzero.diagnosis").joinpath(JAXZERO_PROMPT_FILE).read_text(
    encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class JudgeItem:
    """One case as the judge sees it: the answer text, the ranked answers in it (as many
    score lines as a strict reply must hold) and the two reference sets."""

    answer_text: str
    answers: tuple[str, ...]
    score2_labels: tuple[str, ...]
    score1_labels: tuple[str, ...] = ()

    @classmethod
    def make(cls, answers: Sequence[str | None], score2_labels: Sequence[str],
             score1_labels: Sequence[str] = ()) -> JudgeItem:
        """jaxzero's cleaned item: whitespace collapsed (a multi-line answer cannot break the
        numbered list), answers cut to the reward's MAX_ANSWER_CHARS, blank answers dropped,
        labels that repeat (ignoring case) or, for hypernyms, are score-2 labels dropped."""
        def dedupe(names, seen):
            kept = []
            for name in names:
                name = " ".join(name.split())
                if name and name.casefold() not in seen:
                    seen.add(name.casefold())
                    kept.append(name)
            return tuple(kept)

        seen: set[str] = set()
        score2 = dedupe(score2_labels, seen)
        if not score2:
            raise DataError(f"judge item has no score-2 label (got {list(score2_labels)!r})")
        cut = (" ".join(a[:MAX_ANSWER_CHARS].split()) for a in answers if a)
        kept = tuple(a for a in cut if a)
        return cls("\n".join(kept), kept, score2, dedupe(score1_labels, seen))

    @classmethod
    def as_written(cls, answer_text: str, answers: Sequence[str], score2_labels: Sequence[str],
                   score1_labels: Sequence[str] = ()) -> JudgeItem:
        """RareArena's item: the answer text stripped and nothing else; the sets as built."""
        text = answer_text.strip()
        return cls(text, tuple(answers) if text else (), tuple(score2_labels),
                   tuple(score1_labels))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A judge reply read both ways. `scores`: the strict parse, None when it fails (`reason`
    says why); `loose`: every `score N` in the reply, in order, as RareArena's metric reads."""

    scores: tuple[int, ...] | None
    loose: tuple[int, ...] = ()
    reply: str = ""
    reason: str = ""

    @classmethod
    def of_scores(cls, scores: Sequence[int]) -> Verdict:
        """A verdict known without a reply (no answer to judge, or the matching rule)."""
        return cls(tuple(scores), tuple(scores))

    @property
    def status(self) -> str:
        return UNPARSED if self.scores is None else "ok"

    def top(self, k: int) -> int | None:
        """Strict: best score among the first k answers (0 without answers); None when
        unparsed, so that callers must count it rather than read it as a miss."""
        if self.scores is None:
            return None
        return max(self.scores[:k], default=0)

    def loose_top(self, k: int) -> int:
        """metric.py: top-1 is the first score, top-5 the largest of the first five; a reply
        with no score at all counts as 0 (metric.py would stop with an IndexError)."""
        return max(self.loose[:k], default=0)


_LOOSE_SCORE = re.compile(r"score (\d+)")
_SCORE_LINE = re.compile(r"(\d+)\s*[.)]\s*(.*?)\s*:\s*score\s*[:=]?\s*(\d+)\s*[;.]?", re.I)
_ANY_SCORE = re.compile(r"score\s*[:=]?\s*\d", re.I)


def parse_reply(reply: str, item: JudgeItem, allowed: frozenset[int]) -> Verdict:
    """Both reads of a reply. Strict: exactly the lines `i. <name>: score S` for i = 1..n in
    order, n = len(item.answers), S in `allowed`; lines without a score (a preamble) are
    ignored and markdown emphasis (`*`, `` ` ``) is stripped first."""
    loose = tuple(int(s) for s in _LOOSE_SCORE.findall(reply))

    def unparsed(reason: str) -> Verdict:
        return Verdict(None, loose, reply, reason)

    n, found = len(item.answers), []
    for line in reply.splitlines():
        line = line.replace("*", "").replace("`", "").strip()
        match = _SCORE_LINE.fullmatch(line)
        if match:
            found.append((int(match.group(1)), int(match.group(3))))
        elif _ANY_SCORE.search(line):
            return unparsed(f"unreadable score line {line[:80]!r}")
    if [i for i, _ in found] != list(range(1, n + 1)):
        return unparsed(f"expected score lines 1..{n}, got {[i for i, _ in found]}")
    scores = tuple(s for _, s in found)
    if not set(scores) <= allowed:
        return unparsed(f"scores {list(scores)} outside {sorted(allowed)}")
    return Verdict(scores, loose, reply)


def read_string_assignments(path: Path, slots: dict[str, set[str]]) -> dict[str, str]:
    """The module-level string constants `name = "..."` of a Python file, parsed with `ast`
    (never executed), for each name in `slots`, whose `{...}` fields must be exactly the
    given ones. A missing file, name or slot is a one-line DataError naming file and name."""
    hint = "--rarearena-dir should be a checkout of github.com/zhao-zy15/RareArena"
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror}); {hint}") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as err:
        raise DataError(f"{path}:{err.lineno}: not valid Python ({err.msg})") from None
    found: dict[str, str] = {}
    for node in tree.body:   # module level only; a later assignment wins, as running it would
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if (isinstance(target, ast.Name) and isinstance(value, ast.Constant)
                and isinstance(value.value, str)):
            found[target.id] = value.value
    texts = {}
    for name, want in slots.items():
        if name not in found:
            raise DataError(f"{path}: no module-level string assignment `{name}`; {hint}")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(found[name]) if f is not None}
        except ValueError as err:
            raise DataError(f"{path}: `{name}` is not a format string ({err})") from None
        if fields != want:
            raise DataError(f"{path}: `{name}` has format fields {sorted(fields)}, expected "
                            f"{sorted(want)}")
        texts[name] = found[name]
    return texts


@dataclasses.dataclass(frozen=True)
class JudgeProtocol:
    """A protocol's prompt texts (variable name -> text), where they came from, and the
    judge call's sampling settings. Subclasses say how a case fills the prompt."""

    prompts: tuple[tuple[str, str], ...]
    source: str
    name: ClassVar[str]
    temperature: ClassVar[float]
    max_tokens: ClassVar[int]

    @property
    def version(self) -> str:
        """Name and a digest of the prompt texts: written into the cache and the report, so
        verdicts from different prompts are never mixed."""
        blob = repr((self.name, self.prompts)).encode()
        return f"{self.name}:{hashlib.sha256(blob).hexdigest()[:12]}"

    def text(self, variable: str) -> str:
        return dict(self.prompts)[variable]

    def item(self, record: dict, answer_text: str, answers: Sequence[str],
             table: HypernymTable | None) -> JudgeItem:
        raise NotImplementedError

    def render(self, item: JudgeItem) -> str:
        raise NotImplementedError

    def allowed(self, item: JudgeItem) -> frozenset[int]:
        raise NotImplementedError

    def parse(self, reply: str, item: JudgeItem) -> Verdict:
        return parse_reply(reply, item, self.allowed(item))


class RareArenaProtocol(JudgeProtocol):
    """eval_updated.py (2026-03)."""

    name = "rarearena"
    temperature = 0.1
    max_tokens = 4096
    FILE = "eval/eval_updated.py"
    SLOTS = {"eval_prompt1": {"answer", "score2_set"},
             "eval_prompt2": {"answer", "score2_set", "score1_set"}}

    def item(self, record, answer_text, answers, table):
        if table is None:
            raise DataError("the rarearena judge protocol needs the Orphanet hypernym table "
                            "(--hypernyms, or --rarearena-dir holding "
                            "benchmark_data/orphanet_hypernym.json)")
        score2, score1 = table.rarearena_sets(record["orpha_id"], record["diagnosis"])
        return JudgeItem.as_written(answer_text, answers, score2, score1)

    def render(self, item):
        if not item.score1_labels:
            return self.text("eval_prompt1").format(answer=item.answer_text,
                                                    score2_set=list(item.score2_labels))
        return self.text("eval_prompt2").format(answer=item.answer_text,
                                                score2_set=list(item.score2_labels),
                                                score1_set=list(item.score1_labels))

    def allowed(self, item):
        return frozenset({0, 1, 2} if item.score1_labels else {0, 2})


class RareArena2025Protocol(JudgeProtocol):
    """eval.py (2025-04): one prompt; 1 is a broad category that includes the diagnosis."""

    name = "rarearena-2025"
    temperature = 0.1
    max_tokens = 4096
    FILE = "eval/eval.py"
    SLOTS = {"eval_prompt": {"answer", "diagnosis"}}

    def item(self, record, answer_text, answers, table):
        return JudgeItem.as_written(answer_text, answers, (record["diagnosis"],))

    def render(self, item):
        return self.text("eval_prompt").format(answer=item.answer_text,
                                               diagnosis=item.score2_labels[0])

    def allowed(self, item):
        return frozenset({0, 1, 2})


class JaxzeroProtocol(JudgeProtocol):
    """jaxzero's rewrite: the record's labels for score 2, its hypernyms (by id, else by
    name, deduplicated) for score 1, cleaned and numbered answers."""

    name = "jaxzero"
    temperature = 0.0
    max_tokens = 512

    def item(self, record, answer_text, answers, table):
        score1 = table.hypernyms(record["orpha_id"], name=record["diagnosis"]) if table else ()
        return JudgeItem.make(answers, record["labels"], score1)

    def render(self, item):
        def lines(names, numbered=False):
            if not names:
                return "(none)"
            return "\n".join(f"{i}. {n}" if numbered else f"- {n}"
                             for i, n in enumerate(names, 1))

        return self.text("judge_prompt").format(
            exact=lines(item.score2_labels), broader=lines(item.score1_labels),
            answers=lines(item.answers, numbered=True))

    def allowed(self, item):
        return frozenset({0, 1, 2} if item.score1_labels else {0, 2})


def jaxzero_protocol() -> JaxzeroProtocol:
    return JaxzeroProtocol((("judge_prompt", JAXZERO_PROMPT),), f"jaxzero/diagnosis/"
                           f"{JAXZERO_PROMPT_FILE}")


def load_protocol(name: str, rarearena_dir: str | Path | None = None) -> JudgeProtocol:
    """The named protocol; the RareArena ones read their prompts from `rarearena_dir`."""
    if name == "jaxzero":
        return jaxzero_protocol()
    kinds = {c.name: c for c in (RareArenaProtocol, RareArena2025Protocol)}
    if name not in kinds:
        raise ValueError(f"judge protocol must be one of {PROTOCOLS}, got {name!r}")
    if rarearena_dir is None:
        raise DataError(f"judge protocol {name!r} reads its prompts from a RareArena checkout: "
                        f"pass --rarearena-dir (git clone "
                        f"https://github.com/zhao-zy15/RareArena), or --judge-protocol jaxzero")
    kind = kinds[name]
    path = Path(rarearena_dir) / kind.FILE
    texts = read_string_assignments(path, kind.SLOTS)
    return kind(tuple(texts.items()), str(path))
