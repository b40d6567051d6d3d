"""Format and language checks of a response, for the behaviours DiagnosisZero reported.

DiagnosisZero saw the 1.5B model drop its <think> block, the 7B model break the format more
often, and the 7B model append text in another script (Japanese, Chinese) after </answer>.
`analyze_response` measures each of these on one response; `summarize` turns a batch into rates.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from jaxzero.diagnosis.reward import CLOSE as ANSWER_CLOSE
from jaxzero.diagnosis.reward import OPEN as ANSWER_OPEN
from jaxzero.diagnosis.reward import answer_spans

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REGIONS = ("think", "answer", "after_answer", "other")

# Scripts that do not belong in an English answer. Greek is left out on purpose: alpha-, beta-
# and gamma- are ordinary in disease names (beta-thalassemia) and lab values, as are Latin
# letters with diacritics (Guillain-Barré, Sjögren) and symbols such as µ, ° or ±.
_FOREIGN_SCRIPT = re.compile(
    "["
    "\u0400-\u052f"   # Cyrillic and its supplement
    "\u0590-\u05ff"   # Hebrew
    "\u0600-\u06ff"   # Arabic
    "\u0900-\u097f"   # Devanagari
    "\u0e00-\u0e7f"   # Thai
    "\u1100-\u11ff"   # Hangul Jamo
    "\u2e80-\u2fdf"   # CJK radicals, Kangxi radicals
    "\u3000-\u30ff"   # CJK symbols and punctuation, Hiragana, Katakana
    "\u3100-\u31ff"   # Bopomofo, Hangul compatibility Jamo, Katakana extension
    "\u3400-\u4dbf"   # CJK extension A
    "\u4e00-\u9fff"   # CJK unified ideographs
    "\uac00-\ud7af"   # Hangul syllables
    "\uf900-\ufaff"   # CJK compatibility ideographs
    "\uff00-\uffef"   # half- and full-width forms (full-width punctuation, half-width kana)
    "\U00020000-\U0003134f"  # CJK extensions B to G
    "]")


@dataclasses.dataclass(frozen=True)
class ResponseAnalysis:
    """What one response does with the requested `<think>...</think><answer>...</answer>`."""

    has_think: bool          # a complete think block
    has_answer: bool         # a complete answer block
    format_ok: bool          # a think block, then an answer block after it
    think_dropped: bool      # an answer and no <think> tag at all (the 1.5B model's failure)
    text_after_answer: bool  # non-space text after the last </answer>
    mixed_language: bool     # characters of a foreign script anywhere
    mixed_language_where: tuple[str, ...]  # which of REGIONS hold them, in REGIONS order


def _think_span(text: str) -> tuple[int, int] | None:
    start = text.find(THINK_OPEN)
    if start < 0:
        return None
    end = text.find(THINK_CLOSE, start + len(THINK_OPEN))
    return None if end < 0 else (start + len(THINK_OPEN), end)


def _regions(text: str, think: tuple[int, int] | None,
             answers: list[tuple[int, int]]) -> dict[str, list[str]]:
    """The pieces of text in each of REGIONS. "other" is what is left once the think block,
    the answer blocks and the text after the last answer are cut out: a preamble, text between
    blocks, the tags themselves."""
    after = answers[-1][1] + len(ANSWER_CLOSE) if answers else len(text)
    blocks = [(start, end, "answer") for start, end in answers]
    if think is not None and think[1] <= after:  # a think block after the answer is "after"
        blocks.append((*think, "think"))
    regions = {name: [] for name in REGIONS}
    regions["after_answer"].append(text[after:])
    pos = 0
    for start, end, name in sorted(blocks):
        if start < pos:  # an answer block written inside the think block
            continue
        regions["other"].append(text[pos:start])
        regions[name].append(text[start:end])
        pos = end
    regions["other"].append(text[pos:after])
    return regions


def analyze_response(text: str) -> ResponseAnalysis:
    """Format and language findings for one decoded response (special tokens removed)."""
    think = _think_span(text)
    answers = list(answer_spans(text))
    format_ok = think is not None and any(
        start - len(ANSWER_OPEN) >= think[1] + len(THINK_CLOSE) for start, _ in answers)
    regions = _regions(text, think, answers)
    where = tuple(name for name in REGIONS
                  if any(_FOREIGN_SCRIPT.search(part) for part in regions[name]))
    return ResponseAnalysis(
        has_think=think is not None,
        has_answer=bool(answers),
        format_ok=format_ok,
        think_dropped=bool(answers) and THINK_OPEN not in text,
        text_after_answer=bool(answers) and bool(regions["after_answer"][0].strip()),
        mixed_language=bool(where),
        mixed_language_where=where,
    )


def summarize(analyses: Sequence[ResponseAnalysis]) -> dict[str, float]:
    """Rates over a batch, for logging: the fraction of responses with each finding, and
    `mixed_language_<region>` for each region. Empty input gives an empty dict."""
    n = len(analyses)
    if n == 0:
        return {}
    flags = ("has_think", "has_answer", "format_ok", "think_dropped", "text_after_answer",
             "mixed_language")
    out = {flag: sum(getattr(a, flag) for a in analyses) / n for flag in flags}
    for region in REGIONS:
        out[f"mixed_language_{region}"] = sum(region in a.mixed_language_where
                                              for a in analyses) / n
    return out
