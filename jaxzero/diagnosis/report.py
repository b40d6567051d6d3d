"""RareArena-style evaluation report over checkpoints: `report.md` and `report.json`.

`report.json` is `{"version": 1, "rows": [row, ...]}`, one row per checkpoint, each with:
- `checkpoint` (str), `step` (int or null), `n` (cases);
- `judge` (the judge's `model_id`; `RuleJudge`'s for `--judge none`; null without verdicts)
  and `judge_prompt_version` (meaningful for model judges);
- `top1`, `top5`: `{"score0", "score1", "score2", "total"}` fractions of the judged cases whose
  best score among the first k answers is 0, 1 or 2, and `total` = score1 + score2 (RareArena's
  "Total" recall); `top5` is null for a top-1 run, both are null without a judge;
- `judged` (cases with a parsed verdict: the denominator of `top1`, `top5` and `agreement`) and
  `unparsed` (cases whose judge reply could not be parsed: counted, never read as score 0);
- `rule_accuracy`: fraction of all cases whose matching-rule reward is >= `match_score`;
- `agreement`: `{"score2", "total"}` fraction of judged cases where the rule's match agrees
  with the judge's top-1 score == 2 (resp. >= 1), and `confusion`: counts `{"both",
  "rule_only", "judge_only", "neither"}` of rule match vs judge top-1 score == 2; null without
  a judge;
- `format_ok`, `think_dropped`, `mixed_language` (fractions of all cases) and
  `response_length_mean` (tokens).

`score_checkpoint` turns one checkpoint's responses into per-case results and its row. The
top-5 protocol also lives here: `TOP5_TEMPLATE` asks the policy for five ranked diagnoses, one
per line inside <answer>, and `ranked_answers` reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import re
from importlib import resources
from pathlib import Path
from typing import Sequence

from jaxzero.config.schema import RewardConfig
from jaxzero.diagnosis.hypernyms import HypernymTable
from jaxzero.diagnosis.judge import JUDGE_PROMPT_VERSION, Judge, JudgeItem, Verdict
from jaxzero.diagnosis.rarearena import build_prompt_text
from jaxzero.diagnosis.analysis import ResponseAnalysis, analyze_response
from jaxzero.diagnosis.reward import compute_score, extract_answer

REPORT_VERSION = 1

# The user turn for top-5 runs, a drop-in for the diagnosis prompt (one `{case_text}`):
# reasoning inside <think>, then inside <answer> five disease names, one per line, numbered
# 1 to 5, most likely first. `rarearena.prepare_data(..., template=TOP5_TEMPLATE)` uses it.
TOP5_TEMPLATE = resources.files("jaxzero.diagnosis").joinpath("templates/top5_prompt.txt").read_text(
    encoding="utf-8").removesuffix("\n")

_RANK_PREFIX = re.compile(r"^(?:\d+\s*[.):]|[-*\u2022])\s*")


def top5_prompt(case_text: str) -> str:
    """The top-5 user turn for one case."""
    return build_prompt_text(case_text, TOP5_TEMPLATE)


def ranked_answers(response: str, top_k: int, mode: str = "strict") -> tuple[str, ...]:
    """The answers the judge grades, from the answer block the reward reads (same `mode`,
    lowercased as the reward sees it). Top-1: the whole block, one answer. Top-5: its first
    five non-blank lines, with list markers ("1.", "2)", "-", "*") and a trailing ';' or '.'
    removed. () without an answer block."""
    block = extract_answer(response, mode)
    if block is None:
        return ()
    if top_k == 1:
        return (block,)
    names = (_RANK_PREFIX.sub("", line.strip()).rstrip(";.").strip()
             for line in block.splitlines())
    return tuple(name for name in names if name)[:top_k]


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """One case evaluated by one checkpoint."""

    case_id: str
    labels: tuple[str, ...]
    response: str
    answers: tuple[str, ...]      # what the judge graded (1 for top-1, <= 5 for top-5)
    rule_score: float             # jaxzero.diagnosis.reward.compute_score of the response
    verdict: Verdict | None       # None when no judge ran
    analysis: ResponseAnalysis
    length: int                   # response tokens


def _split(scores: list[int]) -> dict[str, float]:
    n = len(scores)
    frac = {f"score{s}": sum(x == s for x in scores) / n for s in (0, 1, 2)}
    frac["total"] = frac["score1"] + frac["score2"]
    return frac


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def summarize_checkpoint(checkpoint: str, cases: Sequence[CaseResult], *,
                         step: int | None = None, judge: str | None = None, top_k: int = 1,
                         match_score: float = 1.0) -> dict:
    """One report row (fields in the module docstring). `judge` names the judge that produced
    the verdicts; `match_score` is the reward at or above which the rule counts a match."""
    if top_k not in (1, 5):
        raise ValueError(f"top_k must be 1 or 5, got {top_k}")
    if any((c.verdict is None) != (judge is None) for c in cases):
        raise ValueError("every case needs a verdict when a judge is named, and none otherwise")
    rule = [c.rule_score >= match_score for c in cases]
    row = {
        "checkpoint": checkpoint, "step": step, "n": len(cases),
        "judge": judge, "judge_prompt_version": JUDGE_PROMPT_VERSION if judge else None,
        "top1": None, "top5": None, "judged": 0, "unparsed": 0,
        "rule_accuracy": _mean(rule), "agreement": None, "confusion": None,
        "format_ok": _mean(c.analysis.format_ok for c in cases),
        "think_dropped": _mean(c.analysis.think_dropped for c in cases),
        "mixed_language": _mean(c.analysis.mixed_language for c in cases),
        "response_length_mean": _mean(c.length for c in cases),
    }
    if judge is None:
        return row
    judged = [(c.verdict, r) for c, r in zip(cases, rule) if c.verdict.scores is not None]
    row["judged"], row["unparsed"] = len(judged), len(cases) - len(judged)
    if not judged:
        return row
    row["top1"] = _split([v.top(1) for v, _ in judged])
    if top_k == 5:
        row["top5"] = _split([v.top(5) for v, _ in judged])
    pairs = [(r, v.top(1)) for v, r in judged]
    row["agreement"] = {"score2": _mean(r == (s == 2) for r, s in pairs),
                        "total": _mean(r == (s >= 1) for r, s in pairs)}
    row["confusion"] = {"both": sum(r and s == 2 for r, s in pairs),
                        "rule_only": sum(r and s != 2 for r, s in pairs),
                        "judge_only": sum(not r and s == 2 for r, s in pairs),
                        "neither": sum(not r and s != 2 for r, s in pairs)}
    return row


def score_checkpoint(checkpoint: str, records: Sequence[dict], responses: Sequence[str],
                     lengths: Sequence[int], *, judge: Judge | None,
                     hypernyms: HypernymTable | None, reward_cfg: RewardConfig,
                     top_k: int = 1, step: int | None = None) -> tuple[dict, list[CaseResult]]:
    """Score one checkpoint's responses to prepared records (`id`, `labels`, `orpha_id`,
    `diagnosis`): matching rule, response analysis and, with a judge, one verdict per case
    against the score-2 labels and the case's hypernyms. Returns (report row, per-case results).
    """
    if not len(records) == len(responses) == len(lengths):
        raise ValueError(f"{len(records)} records, {len(responses)} responses, "
                         f"{len(lengths)} lengths")
    answers = [ranked_answers(r, top_k, reward_cfg.mode) for r in responses]
    verdicts: list[Verdict | None] = [None] * len(records)
    if judge is not None:
        items = [JudgeItem.make(a, rec["labels"], hypernyms.hypernyms(
            rec["orpha_id"], name=rec["diagnosis"]) if hypernyms else ())
            for a, rec in zip(answers, records)]
        verdicts = judge.judge_many(items)
    cases = [CaseResult(rec["id"], tuple(rec["labels"]), resp, ans,
                        compute_score(resp, rec["labels"], **dataclasses.asdict(reward_cfg)),
                        verdict, analyze_response(resp), int(n))
             for rec, resp, ans, verdict, n in zip(records, responses, answers, verdicts, lengths)]
    row = summarize_checkpoint(checkpoint, cases, step=step,
                               judge=judge.model_id if judge else None, top_k=top_k,
                               match_score=reward_cfg.score)
    return row, cases


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_markdown(rows: Sequence[dict]) -> str:
    """A table with one row per checkpoint; top-5 columns only when some row has them."""
    with_top5 = any(r["top5"] for r in rows)
    head = ["Checkpoint", "Step", "N", "Judge",
            "Top-1 S0", "Top-1 S1", "Top-1 S2", "Top-1 total"]
    if with_top5:
        head += ["Top-5 S0", "Top-5 S1", "Top-5 S2", "Top-5 total"]
    head += ["Unparsed", "Rule acc", "Agree S2", "Agree 1+2", "Format ok", "Think dropped",
             "Mixed lang", "Mean len"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["checkpoint"], "-" if r["step"] is None else str(r["step"]), str(r["n"]),
                 r["judge"] or "-"]
        for key in ("top1", "top5") if with_top5 else ("top1",):
            split = r[key] or {}
            cells += [_pct(split.get(s)) for s in ("score0", "score1", "score2", "total")]
        agree = r["agreement"] or {}
        cells += [str(r["unparsed"]), _pct(r["rule_accuracy"]), _pct(agree.get("score2")),
                  _pct(agree.get("total")), _pct(r["format_ok"]), _pct(r["think_dropped"]),
                  _pct(r["mixed_language"]), f"{r['response_length_mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nTop-k: fraction of judged cases whose best score among the first k answers is "
            "0 (missing), 1 (hypernym) or 2 (synonym); total = 1 + 2. Unparsed judge replies "
            "are excluded from those fractions and counted. Rule acc: matching-rule reward "
            "over all cases. Agree: rule match vs judge top-1 score 2 (resp. 1 or 2). "
            f"Judge prompt: {JUDGE_PROMPT_VERSION}.\n")
    return "\n".join(lines) + "\n" + note


def write_report(out_dir: str | Path, rows: Sequence[dict]) -> tuple[Path, Path]:
    """Write report.md and report.json into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    md.write_text(render_markdown(rows), encoding="utf-8")
    js.write_text(json.dumps({"version": REPORT_VERSION, "rows": list(rows)}, indent=2,
                             ensure_ascii=False) + "\n", encoding="utf-8")
    return md, js
