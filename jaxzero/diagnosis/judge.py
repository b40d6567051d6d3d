"""LLM-judge backends: grade each case's ranked diagnoses 2 (synonym), 1 (hypernym) or 0.

One judge request covers one case: its answer text goes into one prompt, rendered by a
`protocols.JudgeProtocol` (RareArena's two, or jaxzero's rewrite), and the judge returns one
numbered score line per answer, as RareArena does. One request per case keeps the cost at one
call per case and lets the judge see the whole list, as RareArena's table was produced.

Backends share one interface, `judge_many(items) -> list[Verdict]`:
- `OpenAIJudge`: any OpenAI-compatible `/v1/chat/completions` endpoint, stdlib HTTP only,
  with the protocol's temperature and max_tokens;
- `LocalJudge`: a caller-supplied batched greedy generate function (jaxzero's own sampler);
- `RuleJudge`: no model, the reward's string-matching rule per answer (`--judge none`).
The two model backends keep an append-only JSON-lines cache keyed by everything that decides a
reply, written as each reply arrives, so an interrupted run resumes where it stopped. A cached
reply that does not parse is asked again by default (`retry_unparsed`): a judge that was
misconfigured or down must not leave its failures behind for good.
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
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol, Sequence

from tqdm import tqdm

from jaxzero.io.jsonl import complete_lines
from jaxzero.errors import DataError, JaxzeroError
from jaxzero.diagnosis.protocols import JudgeItem, JudgeProtocol, Verdict, jaxzero_protocol
from jaxzero.diagnosis.reward import compute_score, extract_answer, similarity

log = logging.getLogger(__name__)


class JudgeError(JaxzeroError):
    """The judge endpoint failed for good (4xx, or every retry used up)."""


def cache_key(prompt: str, model_id: str, settings: Sequence) -> str:
    """Hash of everything that decides a reply: the rendered prompt (the protocol's text, the
    answer and both sets), the judge model and its sampling settings."""
    blob = json.dumps([prompt, model_id, list(settings)], ensure_ascii=False)
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
        for lineno, line in complete_lines(self.path, "judge cache"):
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

    def put(self, key: str, model_id: str, protocol: str, item: JudgeItem, reply: str):
        record = {"key": key, "model": model_id, "protocol": protocol,
                  "item": dataclasses.asdict(item), "reply": reply}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._replies[key] = reply   # a later line for a key (a retried reply) wins on load


class Judge(Protocol):
    model_id: str
    protocol: JudgeProtocol   # builds each case's item; the model backends render its prompt

    def judge_many(self, items: Sequence[JudgeItem]) -> list[Verdict]: ...


Deliver = Callable[[int, str], None]


class _ModelJudge:
    """Shared by the model backends: skip empty and cached items, ask once per distinct key,
    cache and parse each reply as it is delivered. Subclasses set the attributes and
    implement `_ask` and `settings` (the sampling settings that are part of the cache key)."""

    model_id: str
    protocol: JudgeProtocol
    cache: JudgeCache | None
    retry_unparsed: bool

    @property
    def settings(self) -> tuple:
        raise NotImplementedError

    def _ask(self, prompts: list[str], deliver: Deliver):
        raise NotImplementedError

    def judge_many(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(items)
        waiting: dict[str, list[int]] = {}
        prompts: dict[str, str] = {}
        retried = 0
        for i, item in enumerate(items):
            if not item.answers:
                verdicts[i] = Verdict.of_scores(())
                continue
            prompt = self.protocol.render(item)
            key = cache_key(prompt, self.model_id, self.settings)
            reply = self.cache.get(key) if self.cache is not None else None
            if reply is not None:
                verdicts[i] = self.protocol.parse(reply, item)
                if verdicts[i].scores is not None or not self.retry_unparsed:
                    continue
                retried += key not in prompts
            waiting.setdefault(key, []).append(i)
            prompts[key] = prompt
        keys = list(waiting)
        if retried:
            log.info("judge: asking again for %d cached replies that did not parse", retried)
        bar = tqdm(total=len(keys), desc="judging", unit="case", file=sys.stderr,
                   disable=not keys or not sys.stderr.isatty(), leave=False)

        def deliver(j: int, reply: str):
            first = items[waiting[keys[j]][0]]
            if self.cache is not None:
                self.cache.put(keys[j], self.model_id, self.protocol.version, first, reply)
            for i in waiting[keys[j]]:
                verdicts[i] = self.protocol.parse(reply, items[i])
            bar.update()

        try:
            if keys:
                self._ask([prompts[k] for k in keys], deliver)
        finally:
            bar.close()
        return verdicts


class LocalJudge(_ModelJudge):
    """A judge model run by jaxzero. `generate_fn(prompts) -> replies` gets the user messages
    (plain text; it applies the model's chat template) and must decode greedily, up to
    `max_new_tokens` (part of the cache key)."""

    def __init__(self, generate_fn: Callable[[list[str]], list[str]], model_id: str,
                 protocol: JudgeProtocol, *, max_new_tokens: int, batch_size: int = 32,
                 cache: JudgeCache | None = None, retry_unparsed: bool = True):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, "
                             f"{max_new_tokens}")
        self.generate_fn, self.model_id, self.protocol = generate_fn, model_id, protocol
        self.max_new_tokens, self.batch_size, self.cache = max_new_tokens, batch_size, cache
        self.retry_unparsed = retry_unparsed

    @property
    def settings(self) -> tuple:
        return ("greedy", self.max_new_tokens)

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
    Each request sends the protocol's temperature and max_tokens, and waits at most `timeout_s`
    on the socket. Timeouts, connection errors, HTTP 408, 429 and 5xx are retried up to
    `max_retries` times with exponential backoff and jitter (or the server's Retry-After, capped
    at `max_wait_s`); other 4xx fail at once. So a request is bounded by `max_retries + 1`
    attempts, and the first request that gives up stops the others.
    """

    def __init__(self, base_url: str, model: str, protocol: JudgeProtocol, *,
                 api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout_s: float = 60.0, max_retries: int = 5, backoff_s: float = 1.0,
                 max_wait_s: float = 120.0, cache: JudgeCache | None = None,
                 retry_unparsed: bool = True):
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError(f"need concurrency >= 1, max_retries >= 0, timeout_s > 0; got "
                             f"{concurrency}, {max_retries}, {timeout_s}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_id, self.protocol = model, protocol
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.backoff_s, self.max_wait_s = backoff_s, max_wait_s
        self.cache, self.retry_unparsed = cache, retry_unparsed
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None:
            log.info("judge: $%s is not set; sending requests without an API key", api_key_env)

    def __repr__(self) -> str:
        return f"OpenAIJudge(url={self.url!r}, model={self.model_id!r})"

    @property
    def settings(self) -> tuple:
        return (self.protocol.temperature, self.protocol.max_tokens)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "<redacted>") if self._api_key else text

    def _ask(self, prompts: list[str], deliver: Deliver):
        stop = threading.Event()   # set on the first failure: the other workers stop retrying
        pool = ThreadPoolExecutor(min(self.concurrency, len(prompts)), "judge")
        futures = {pool.submit(self._complete, p, stop): j for j, p in enumerate(prompts)}
        error: BaseException | None = None
        try:
            # After the first failure the queued requests are cancelled and the running ones
            # stop at their next retry, so this waits at most one more socket timeout.
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
        body = json.dumps({"model": self.model_id, "temperature": self.protocol.temperature,
                           "max_tokens": self.protocol.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body, headers)
            except _Transient as err:
                if attempt == self.max_retries:
                    raise JudgeError(
                        f"judge endpoint {self.url}: gave up after {attempt + 1} attempts "
                        f"(timeout {self.timeout_s:g} s each, {self.max_retries} retries; "
                        f"see --judge-timeout and --judge-retries); last error: {err}"
                    ) from None
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
    hypernym, else 0; the labels are the jaxzero protocol's sets."""

    protocol = jaxzero_protocol()   # only its reference sets: no prompt is sent

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
        return [Verdict.of_scores([self._score(a, item) for a in item.answers])
                for item in items]


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
