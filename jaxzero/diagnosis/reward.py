"""DiagnosisZero's rule-based reward: extract the <answer> block, fuzzy-match it to the labels.

The rule, as published by DiagnosisZero:

* the answer is the text inside ``<answer>...</answer>``, stripped and lowercased;
* no answer scores 0.0; an answer whose similarity to some label is above the threshold (0.8)
  scores 1.0; any other answer scores the format score (0.1);
* similarity is 1.0 for an exact (lowercased, stripped) match, else the best over labels of
  ``0.8 * ratio + 0.2 * jaccard``, where ``ratio`` is a sequence-matching ratio and ``jaccard``
  compares the sets of ``\\w+`` words (0 when either set is empty).

Time is bounded for any input: the tags are paired with ``str.find`` in one forward pass (a
``<answer>(.*?)</answer>`` regex rescans to the end for every unclosed tag, which is quadratic),
and the extracted answer is cut to ``MAX_ANSWER_CHARS`` before matching.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from rapidfuzz.distance import Indel

OPEN, CLOSE = "<answer>", "</answer>"
MODES = ("strict", "flexible")

# Longer answers are cut to this many characters before matching. Passing the default
# threshold needs ratio > 0.75, hence len(answer) < 1.67 * len(label); so for labels under 600
# characters (Orphanet names are under 250) an answer this long fails both before and after
# the cut, and the cut never changes a score. It bounds the matchers' quadratic cost.
MAX_ANSWER_CHARS = 1000

_WORD = re.compile(r"\w+")


def _difflib_ratio(a: str, b: str) -> float:
    # DiagnosisZero's matcher (Ratcliff-Obershelp), argument order kept: prediction, label.
    return difflib.SequenceMatcher(None, a, b).ratio()


def _rapidfuzz_ratio(a: str, b: str) -> float:
    # 2 * LCS / (len a + len b): never below difflib's ratio, equal on most real pairs.
    return Indel.normalized_similarity(a, b)


MATCHERS: dict[str, Callable[[str, str], float]] = {
    "rapidfuzz": _rapidfuzz_ratio,
    "difflib": _difflib_ratio,
}


def answer_spans(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each answer block's content, as `re.finditer('<answer>(.*?)</answer>',
    re.DOTALL)` would pair them, in one linear pass."""
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            return
        end = text.find(CLOSE, start + len(OPEN))
        if end < 0:
            return
        yield start + len(OPEN), end
        pos = end + len(CLOSE)


def answer_block(response: str, mode: str = "strict") -> str | None:
    """The response's answer block, stripped but as written, or None if it has none.

    strict (DiagnosisZero's default): the first answer block of the response. The seed took the
    third match in prompt + response; its prompt holds two example tags.
    flexible: the last answer block whose content is neither empty nor ".".
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    found = None
    for start, end in answer_spans(response):
        content = response[start:end].strip()
        if mode == "strict":
            return content
        if content not in ("", "."):
            found = content
    return found


def extract_answer(response: str, mode: str = "strict") -> str | None:
    """The diagnosis the reward matches: `answer_block`, lowercased."""
    block = answer_block(response, mode)
    return None if block is None else block.lower()


def _jaccard(words_a: set[str], words_b: set[str]) -> float:
    if not words_a or not words_b:
        return 0.0
    return len(words_a & words_b) / len(words_a | words_b)


def _clean_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str):
        raise TypeError("labels must be a list of strings, not one string")
    cleaned = [label.strip().lower() for label in labels]
    cleaned = [label for label in cleaned if label]
    if not cleaned:
        raise ValueError(f"no non-empty label among {list(labels)!r}")
    return cleaned


def similarity(prediction: str, labels: Sequence[str], matcher: str = "rapidfuzz") -> float:
    """Best `0.8 * ratio + 0.2 * word-Jaccard` of the prediction against the labels, in [0, 1].

    An exact match after lowercasing and stripping is 1.0. Empty labels are ignored; at least
    one label must be non-empty. The prediction is cut to MAX_ANSWER_CHARS first.
    """
    if matcher not in MATCHERS:
        raise ValueError(f"matcher must be one of {tuple(MATCHERS)}, got {matcher!r}")
    ratio = MATCHERS[matcher]
    labels = _clean_labels(labels)
    prediction = prediction.strip().lower()[:MAX_ANSWER_CHARS].strip()
    if prediction in labels:
        return 1.0
    words = set(_WORD.findall(prediction))
    return max(0.8 * ratio(prediction, label) + 0.2 * _jaccard(words, set(_WORD.findall(label)))
               for label in labels)


def compute_score(response: str, labels: Sequence[str], *, mode: str = "strict",
                  format_score: float = 0.1, score: float = 1.0, threshold: float = 0.8,
                  matcher: str = "rapidfuzz") -> float:
    """DiagnosisZero's reward of one response: 0 without an answer, `score` when the answer's
    similarity is above `threshold`, otherwise `format_score`."""
    answer = extract_answer(response, mode)
    if answer is None:
        return 0.0
    return score if similarity(answer, labels, matcher) > threshold else format_score


def score_batch(responses: Sequence[str], labels: Sequence[Sequence[str]], *,
                mode: str = "strict", format_score: float = 0.1, score: float = 1.0,
                threshold: float = 0.8, matcher: str = "rapidfuzz") -> np.ndarray:
    """compute_score over a batch: responses[i] against labels[i]; float32 [B]."""
    if len(responses) != len(labels):
        raise ValueError(f"{len(responses)} responses but {len(labels)} label lists")
    return np.fromiter(
        (compute_score(r, lab, mode=mode, format_score=format_score, score=score,
                       threshold=threshold, matcher=matcher)
         for r, lab in zip(responses, labels)),
        dtype=np.float32, count=len(responses))
