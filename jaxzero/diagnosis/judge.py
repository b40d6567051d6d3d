"""RareArena's LLM-judge protocol: grade ranked diagnoses 2 (synonym), 1 (hypernym) or 0.

One judge request covers one case: all of its ranked answers (one for top-1, up to five for
top-5) go into a single prompt and the judge returns one numbered score line per answer, as
RareArena does. Top-k recall is then "any of the first k scored >= 1 (or == 2)", which is
`Verdict.top(k)`. One request per case, not per answer, keeps the cost at one call per case and
lets the judge see the whole list, as the numbers in RareArena's table were produced.

Backends share one interface, `judge_many(items) -> list[Verdict]`:
- `OpenAIJudge`: any OpenAI-compatible `/v1/chat/completions` endpoint, stdlib HTTP only;
- `LocalJudge`: a caller-supplied batched generate function (jaxzero's own sampler);
- `RuleJudge`: no model, the reward's string-matching rule per answer (`--judge none`).
The two model backends keep an append-only JSON-lines cache keyed by everything that decides a
verdict, written as each reply arrives, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import re
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol, Sequence

from jaxzero.errors import DataError, JaxzeroError
from jaxzero.diagnosis.reward import MAX_ANSWER_CHARS, compute_score, extract_answer, similarity

log = logging.getLogger(__name__)

# Bump when the prompt's wording or the reply format changes: it is part of every cache key and
# is written into the report, so verdicts from different prompts are never mixed.
JUDGE_PROMPT_VERSION = "rarearena-judge-v1"
JUDGE_PROMPT = resources.files("jaxzero.diagnosis").joinpath("templates/judge_prompt.txt").read_text(
    encoding="utf-8")
_PROMPT_DIGEST = hashlib.sha256(JUDGE_PROMPT.encode()).hexdigest()[:16]

UNPARSED = "unparsed"


class JudgeError(JaxzeroError):
    """The judge endpoint failed for good (4xx, or every retry used up)."""


@dataclasses.dataclass(frozen=True)
class JudgeItem:
    """One case: its ranked answers and its two reference sets."""

    answers: tuple[str, ...]
    score2_labels: tuple[str, ...]   # the diagnosis and its Orphanet name
    score1_labels: tuple[str, ...] = ()   # hypernyms (parents grouping <= 10 diseases)

    @classmethod
    def make(cls, answers: Sequence[str | None], score2_labels: Sequence[str],
             score1_labels: Sequence[str] = ()) -> JudgeItem:
        """Collapse whitespace (a multi-line answer block becomes one line, so it cannot break
        the numbered list), cut answers to the reward's MAX_ANSWER_CHARS, drop blank answers,
        and drop labels that repeat (ignoring case) or, for hypernyms, are score-2 labels."""
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
        return cls(tuple(a for a in cut if a), score2, dedupe(score1_labels, seen))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Scores per ranked answer, or `scores=None` when the reply could not be parsed."""

    scores: tuple[int, ...] | None
    reply: str = ""
    reason: str = ""   # why the reply is unparsed; empty when it parsed

    @property
    def status(self) -> str:
        return UNPARSED if self.scores is None else "ok"

    def top(self, k: int) -> int | None:
        """Best score among the first k answers (0 when there were no answers); None when
        unparsed, so that callers must count it rather than read it as a miss."""
        if self.scores is None:
            return None
        return max(self.scores[:k], default=0)


def render_prompt(item: JudgeItem) -> str:
    def lines(names, numbered=False):
        if not names:
            return "(none)"
        return "\n".join(f"{i}. {n}" if numbered else f"- {n}" for i, n in enumerate(names, 1))

    return JUDGE_PROMPT.format(exact=lines(item.score2_labels), broader=lines(item.score1_labels),
                               answers=lines(item.answers, numbered=True))


_SCORE_LINE = re.compile(r"(\d+)\s*[.)]\s*(.*?)\s*:\s*score\s*[:=]?\s*(\d+)\s*[;.]?", re.I)
_ANY_SCORE = re.compile(r"score\s*[:=]?\s*\d", re.I)


def parse_reply(reply: str, item: JudgeItem) -> Verdict:
    """Strict: the reply must hold exactly the lines `i. <name>: score S` for i = 1..n in order,
    S in {0, 1, 2} (1 only when there are hypernyms). Lines without a score (a preamble) are
    ignored; markdown emphasis (`*`, `` ` ``) is stripped first. Anything else is unparsed."""
    n, found = len(item.answers), []
    for line in reply.splitlines():
        line = line.replace("*", "").replace("`", "").strip()
        match = _SCORE_LINE.fullmatch(line)
        if match:
            found.append((int(match.group(1)), int(match.group(3))))
        elif _ANY_SCORE.search(line):
            return Verdict(None, reply, f"unreadable score line {line[:80]!r}")
    if [i for i, _ in found] != list(range(1, n + 1)):
        return Verdict(None, reply, f"expected score lines 1..{n}, got {[i for i, _ in found]}")
    scores = tuple(s for _, s in found)
    allowed = {0, 1, 2} if item.score1_labels else {0, 2}
    if not set(scores) <= allowed:
        return Verdict(None, reply, f"scores {list(scores)} outside {sorted(allowed)}")
    return Verdict(scores, reply)


def cache_key(item: JudgeItem, model_id: str) -> str:
    """Hash of everything that decides a verdict: answers, both label sets, the judge model, the
    prompt version and the prompt text itself (an edit without a version bump still misses)."""
    blob = json.dumps([JUDGE_PROMPT_VERSION, _PROMPT_DIGEST, model_id, item.answers,
                       item.score2_labels, item.score1_labels], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class JudgeCache:
    """Append-only JSON lines `{key, model, version, item, reply}`; one line per reply, flushed
    as it arrives. A torn last line (a run killed mid-write) is cut off on open; a malformed
    line elsewhere is a DataError. Single writer: only the calling thread writes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._replies: dict[str, str] = {}
        if self.path.exists():
            self._load()

    def _load(self):
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("judge cache %s: dropping a torn last line (%d bytes)", self.path,
                        len(data) - cut)
            data = data[:cut]
            with open(self.path, "r+b") as f:
                f.truncate(cut)
        for lineno, line in enumerate(data.split(b"\n")[:-1], 1):
            try:
                record = json.loads(line.decode("utf-8"))
                self._replies[record["key"]] = record["reply"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{self.path}: line {lineno}: not a judge cache record "
                                f"({err!r}); delete the file to start afresh") from None

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> str | None:
        return self._replies.get(key)

    def put(self, key: str, model_id: str, item: JudgeItem, reply: str):
        record = {"key": key, "model": model_id, "version": JUDGE_PROMPT_VERSION,
                  "item": dataclasses.asdict(item), "reply": reply}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._replies[key] = reply


class Judge(Protocol):
    model_id: str

    def judge_many(self, items: Sequence[JudgeItem]) -> list[Verdict]: ...


Deliver = Callable[[int, str], None]


class _ModelJudge:
    """Shared by the model backends: skip empty and cached items, ask once per distinct key,
    cache and parse each reply as it is delivered. Subclasses implement `_ask`."""

    model_id: str
    cache: JudgeCache | None

    def _ask(self, prompts: list[str], deliver: Deliver):
        raise NotImplementedError

    def judge_many(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(items)
        waiting: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            if not item.answers:
                verdicts[i] = Verdict(())
                continue
            key = cache_key(item, self.model_id)
            reply = self.cache.get(key) if self.cache is not None else None
            if reply is not None:
                verdicts[i] = parse_reply(reply, item)
            else:
                waiting.setdefault(key, []).append(i)
        keys = list(waiting)

        def deliver(j: int, reply: str):
            first = items[waiting[keys[j]][0]]
            if self.cache is not None:
                self.cache.put(keys[j], self.model_id, first, reply)
            for i in waiting[keys[j]]:
                verdicts[i] = parse_reply(reply, items[i])

        if keys:
            self._ask([render_prompt(items[waiting[k][0]]) for k in keys], deliver)
        return verdicts


class LocalJudge(_ModelJudge):
    """A judge model run by jaxzero. `generate_fn(prompts) -> replies` gets the user messages
    (plain text; it applies the model's chat template) and must decode greedily."""

    def __init__(self, generate_fn: Callable[[list[str]], list[str]], model_id: str, *,
                 batch_size: int = 32, cache: JudgeCache | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.generate_fn, self.model_id = generate_fn, model_id
        self.batch_size, self.cache = batch_size, cache

    def _ask(self, prompts: list[str], deliver: Deliver):
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            replies = self.generate_fn(chunk)
            if len(replies) != len(chunk):
                raise JudgeError(f"local judge returned {len(replies)} replies for "
                                 f"{len(chunk)} prompts")
            for j, reply in enumerate(replies):
                deliver(start + j, reply)


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait in seconds."""

    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.retry_after = retry_after


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as delta-seconds or as an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class OpenAIJudge(_ModelJudge):
    """An OpenAI-compatible chat-completions endpoint (hosted, vLLM, llama.cpp server).

    `base_url` ends where `/chat/completions` is appended, e.g. `http://localhost:8000/v1`. The
    API key is read from the environment variable `api_key_env` (no Authorization header when it
    is unset, as local servers need none); it is never logged, written or shown in errors.
    Timeouts, connection errors, HTTP 408, 429 and 5xx are retried up to `max_retries` times with
    exponential backoff and jitter (or the server's Retry-After, capped at `max_wait_s`); other
    4xx fail at once. Each request is bounded: at most `max_retries + 1` attempts.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 5,
                 max_tokens: int = 512, backoff_s: float = 1.0, max_wait_s: float = 120.0,
                 cache: JudgeCache | None = None):
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError(f"need concurrency >= 1, max_retries >= 0, timeout_s > 0; got "
                             f"{concurrency}, {max_retries}, {timeout_s}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_id = model
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.max_tokens, self.backoff_s, self.max_wait_s = max_tokens, backoff_s, max_wait_s
        self.cache = cache
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None:
            log.info("judge: $%s is not set; sending requests without an API key", api_key_env)

    def __repr__(self) -> str:
        return f"OpenAIJudge(url={self.url!r}, model={self.model_id!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "<redacted>") if self._api_key else text

    def _ask(self, prompts: list[str], deliver: Deliver):
        stop = threading.Event()   # set on the first failure: the other workers stop retrying
        pool = ThreadPoolExecutor(min(self.concurrency, len(prompts)), "judge")
        futures = {pool.submit(self._complete, p, stop): j for j, p in enumerate(prompts)}
        error: BaseException | None = None
        try:
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    if error is None:
                        error = future.exception()
                        stop.set()
                        for other in futures:
                            other.cancel()
                    continue
                deliver(futures[future], future.result())
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
        if error is not None:
            raise error

    def _complete(self, prompt: str, stop: threading.Event) -> str:
        body = json.dumps({"model": self.model_id, "temperature": 0,
                           "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body, headers)
            except _Transient as err:
                if attempt == self.max_retries:
                    raise JudgeError(f"judge endpoint {self.url}: gave up after "
                                     f"{attempt + 1} attempts; last error: {err}") from None
                wait = err.retry_after
                if wait is None:
                    wait = self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0)
                wait = min(wait, self.max_wait_s)
                log.warning("judge request failed (%s); retry %d/%d in %.2fs", err,
                            attempt + 1, self.max_retries, wait)
                if stop.wait(wait):
                    raise JudgeError("judge request abandoned: another request failed")
        raise AssertionError("unreachable")

    def _post(self, body: bytes, headers: dict[str, str]) -> str:
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            if err.code in (408, 429) or err.code >= 500:
                raise _Transient(f"HTTP {err.code}",
                                 _retry_after_seconds(err.headers.get("Retry-After"))) from None
            detail = self._redact(err.read(300).decode("utf-8", "replace"))
            raise JudgeError(f"judge endpoint {self.url} answered HTTP {err.code}: "
                             f"{detail!r}") from None
        except urllib.error.URLError as err:
            raise _Transient(f"cannot reach {self.url}: {err.reason}") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
            raise _Transient(f"{type(err).__name__}: {err}") from None
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Transient(f"reply is not a chat completion: {payload[:120]!r}") from None
        if not isinstance(content, str):
            raise _Transient(f"reply content is {type(content).__name__}, not text")
        return content


class RuleJudge:
    """`--judge none`: no model. Each answer scores 2 when the reward's matching rule
    (`reward.similarity` above `threshold`) matches a score-2 label, else 1 when it matches a
    hypernym, else 0."""

    def __init__(self, threshold: float = 0.8, matcher: str = "rapidfuzz"):
        self.threshold, self.matcher = threshold, matcher
        self.model_id = f"matching-rule({matcher}>{threshold})"

    def _score(self, answer: str, item: JudgeItem) -> int:
        if similarity(answer, item.score2_labels, self.matcher) > self.threshold:
            return 2
        if item.score1_labels and (similarity(answer, item.score1_labels, self.matcher)
                                   > self.threshold):
            return 1
        return 0

    def judge_many(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [Verdict(tuple(self._score(a, item) for a in item.answers)) for item in items]


def judged_rewards(responses: Sequence[str], labels: Sequence[Sequence[str]], judge: Judge, *,
                   score1_labels: Sequence[Sequence[str]] | None = None,
                   hypernym_score: float = 0.0, mode: str = "strict", format_score: float = 0.1,
                   score: float = 1.0, threshold: float = 0.8,
                   matcher: str = "rapidfuzz") -> tuple[list[float], int]:
    """An opt-in, synonym-aware variant of `reward.score_batch` (the matching rule stays the
    default reward). A response the rule already rewards, or one without an answer, keeps its
    rule reward and costs no judge call; every other answer is judged (through the judge's
    cache): score 2 earns `score`, score 1 `hypernym_score`, score 0 `format_score`. An unparsed
    verdict keeps the rule reward. Returns (rewards [B], number of unparsed verdicts)."""
    if len(responses) != len(labels):
        raise ValueError(f"{len(responses)} responses but {len(labels)} label lists")
    score1_labels = score1_labels or [()] * len(responses)
    rewards = [compute_score(r, lab, mode=mode, format_score=format_score, score=score,
                             threshold=threshold, matcher=matcher)
               for r, lab in zip(responses, labels)]
    answers = [extract_answer(r, mode) for r in responses]
    ask = [i for i, reward in enumerate(rewards) if answers[i] is not None and reward != score]
    items = [JudgeItem.make([answers[i]], labels[i], score1_labels[i]) for i in ask]
    unparsed = 0
    for i, verdict in zip(ask, judge.judge_many(items)):
        top = verdict.top(1)
        if top is None:
            unparsed += 1
        else:
            rewards[i] = score if top == 2 else hypernym_score if top == 1 else format_score
    return rewards, unparsed
