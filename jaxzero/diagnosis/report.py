"""RareArena-style evaluation report over checkpoints: `report.md` and `report.json`.

`report.json` is `{"version": 2, "rows": [row, ...], "skipped": [{"checkpoint", "error"}]}`,
one row per checkpoint evaluated and one `skipped` entry per checkpoint that could not be
loaded. Each row has:
- `checkpoint` (str), `step` (int or null), `n` (cases);
- `judge` (the judge's `model_id`; `RuleJudge`'s for `--judge none`; null without verdicts)
  and `judge_protocol` (`protocols.JudgeProtocol.version`: name and prompt digest);
- `reward`: the reward settings the matching rule scored with (`RewardConfig` fields);
- `top1`, `top5`: RareArena's columns, as its `eval/metric.py` computes them: `{"score0",
  "score1", "score2", "total"}` fractions of all n cases whose loose score (top-1: the first
  `score N` of the reply; top-5: the largest of the first five) is 0, 1 or 2; a reply without
  any score counts as 0; `total` = score1 + score2. `score2` (synonym match) is the figure
  DiagnosisZero's table reports. `top5` is null for a top-1 run; both are null without a judge;
- beyond RareArena: `strict_top1`, `strict_top5` (the same split from jaxzero's strict parse,
  over the `judged` cases), `judged` (cases whose reply parsed strictly), `unparsed` (replies
  the strict parse rejects: counted, never read as score 0) and `no_score` (replies holding
  no `score N` at all, which the RareArena columns count as 0);
- `rule_accuracy`: fraction of all cases whose matching-rule reward is >= `reward.score`;
- `agreement`: `{"score2", "total"}` fraction of judged cases where the rule's match agrees
  with the strict top-1 score == 2 (resp. >= 1), and `confusion`: counts `{"both",
  "rule_only", "judge_only", "neither"}` of rule match vs strict top-1 score == 2; null without
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
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Sequence

from jaxzero.config.schema import RewardConfig
from jaxzero.diagnosis.hypernyms import HypernymTable
from jaxzero.diagnosis.judge import Judge
from jaxzero.diagnosis.protocols import Verdict
from jaxzero.diagnosis.rarearena import build_prompt_text
from jaxzero.diagnosis.analysis import ResponseAnalysis, analyze_response
from jaxzero.diagnosis.reward import answer_block, compute_score

REPORT_VERSION = 2

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
    """The ranked answers in the answer block, case kept. Top-1: the whole block, one answer.
    Top-5: its first five non-blank lines, with list markers ("1.", "2)", "-", "*") and a
    trailing ';' or '.' removed. () without an answer block."""
    block = answer_block(response, mode)
    if not block:
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
    answers: tuple[str, ...]      # the ranked answers (1 for top-1, <= 5 for top-5)
    rule_score: float             # jaxzero.diagnosis.reward.compute_score of the response
    verdict: Verdict | None       # None when no judge ran
    analysis: ResponseAnalysis
    length: int                   # response tokens


def _split(scores: list[int], n: int) -> dict[str, float]:
    frac = {f"score{s}": sum(x == s for x in scores) / n for s in (0, 1, 2)}
    frac["total"] = frac["score1"] + frac["score2"]
    return frac


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def summarize_checkpoint(checkpoint: str, cases: Sequence[CaseResult], *,
                         step: int | None = None, judge: str | None = None,
                         protocol: str | None = None, top_k: int = 1,
                         reward: RewardConfig = RewardConfig()) -> dict:
    """One report row (fields in the module docstring). `judge` names the judge that produced
    the verdicts and `protocol` its protocol version; `reward` is what the rule scored with
    (a rule score >= `reward.score` is a match)."""
    if top_k not in (1, 5):
        raise ValueError(f"top_k must be 1 or 5, got {top_k}")
    if any((c.verdict is None) != (judge is None) for c in cases):
        raise ValueError("every case needs a verdict when a judge is named, and none otherwise")
    rule = [c.rule_score >= reward.score for c in cases]
    row = {
        "checkpoint": checkpoint, "step": step, "n": len(cases),
        "judge": judge, "judge_protocol": protocol if judge else None,
        "reward": dataclasses.asdict(reward),
        "top1": None, "top5": None, "strict_top1": None, "strict_top5": None,
        "judged": 0, "unparsed": 0, "no_score": 0,
        "rule_accuracy": _mean(rule), "agreement": None, "confusion": None,
        "format_ok": _mean(c.analysis.format_ok for c in cases),
        "think_dropped": _mean(c.analysis.think_dropped for c in cases),
        "mixed_language": _mean(c.analysis.mixed_language for c in cases),
        "response_length_mean": _mean(c.length for c in cases),
    }
    if judge is None or not cases:
        return row
    n = len(cases)
    row["top1"] = _split([c.verdict.loose_top(1) for c in cases], n)
    if top_k == 5:
        row["top5"] = _split([c.verdict.loose_top(5) for c in cases], n)
    # A case without answers got no request, so no reply to read.
    row["no_score"] = sum(bool(c.answers) and not c.verdict.loose for c in cases)
    judged = [(c.verdict, r) for c, r in zip(cases, rule) if c.verdict.scores is not None]
    row["judged"], row["unparsed"] = len(judged), n - len(judged)
    if not judged:
        return row
    row["strict_top1"] = _split([v.top(1) for v, _ in judged], len(judged))
    if top_k == 5:
        row["strict_top5"] = _split([v.top(5) for v, _ in judged], len(judged))
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
    `diagnosis`): matching rule with `reward_cfg`, response analysis and, with a judge, one
    verdict per case, its item built by the judge's protocol (the answer block as written,
    the protocol's reference sets). Returns (report row, per-case results)."""
    if not len(records) == len(responses) == len(lengths):
        raise ValueError(f"{len(records)} records, {len(responses)} responses, "
                         f"{len(lengths)} lengths")
    answers = [ranked_answers(r, top_k, reward_cfg.mode) for r in responses]
    verdicts: list[Verdict | None] = [None] * len(records)
    if judge is not None:
        items = [judge.protocol.item(rec, answer_block(resp, reward_cfg.mode) or "", ans,
                                     hypernyms)
                 for rec, resp, ans in zip(records, responses, answers)]
        verdicts = judge.judge_many(items)
    cases = [CaseResult(rec["id"], tuple(rec["labels"]), resp, ans,
                        compute_score(resp, rec["labels"], **dataclasses.asdict(reward_cfg)),
                        verdict, analyze_response(resp), int(n))
             for rec, resp, ans, verdict, n in zip(records, responses, answers, verdicts, lengths)]
    row = summarize_checkpoint(checkpoint, cases, step=step,
                               judge=judge.model_id if judge else None,
                               protocol=judge.protocol.version if judge else None,
                               top_k=top_k, reward=reward_cfg)
    return row, cases


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _split_cells(split: dict | None) -> list[str]:
    split = split or {}
    return [_pct(split.get(s)) for s in ("score2", "total", "score1", "score0")]


def render_markdown(rows: Sequence[dict], skipped: Sequence[dict] = ()) -> str:
    """A table with one row per checkpoint, synonym match (score 2) first; top-5 columns only
    when some row has them; the checkpoints that could not be loaded listed below it."""
    with_top5 = any(r["top5"] for r in rows)
    ks = ("1", "5") if with_top5 else ("1",)
    head = ["Checkpoint", "Step", "N", "Judge", "Protocol", "Reward"]
    for k in ks:
        head += [f"Top-{k} synonym (S2)", f"Top-{k} S1+S2", f"Top-{k} S1", f"Top-{k} S0"]
    for k in ks:
        head += [f"Strict top-{k} S2", f"Strict top-{k} S1+S2"]
    head += ["Judged", "Unparsed", "No score", "Rule acc", "Agree S2", "Agree 1+2",
             "Format ok", "Think dropped", "Mixed lang", "Mean len"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        reward = r["reward"]
        cells = [r["checkpoint"], "-" if r["step"] is None else str(r["step"]), str(r["n"]),
                 r["judge"] or "-", r["judge_protocol"] or "-",
                 f"{reward['mode']}/{reward['matcher']}>{reward['threshold']:g}"]
        for k in ks:
            cells += _split_cells(r[f"top{k}"])
        for k in ks:
            cells += _split_cells(r[f"strict_top{k}"])[:2]
        agree = r["agreement"] or {}
        cells += [str(r["judged"]), str(r["unparsed"]), str(r["no_score"]),
                  _pct(r["rule_accuracy"]), _pct(agree.get("score2")),
                  _pct(agree.get("total")), _pct(r["format_ok"]), _pct(r["think_dropped"]),
                  _pct(r["mixed_language"]), f"{r['response_length_mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nTop-k S2 (synonym match) is the figure DiagnosisZero's table reports, and the "
            "one to set beside RareArena's score-2 columns; S1+S2 is RareArena's total "
            "(score 1: hypernym). The Top-k columns are RareArena's own arithmetic "
            "(eval/metric.py): the first `score N` of each judge reply for top-1, the largest "
            "of the first five for top-5, over all N cases, a reply without a score counting "
            "as 0. Beyond RareArena: Strict columns use jaxzero's strict parse (one numbered "
            "score line per answer) over the Judged cases; Unparsed counts the replies it "
            "rejects, No score the replies without any score. Rule acc: matching-rule reward "
            "over all cases, with the Reward settings shown. Agree: rule match vs strict top-1 "
            "score 2 (resp. 1 or 2).\n")
    if skipped:
        note += "\nNot evaluated (the checkpoint could not be loaded):\n" + "".join(
            f"- {s['checkpoint']}: {s['error']}\n" for s in skipped)
    return "\n".join(lines) + "\n" + note


def _finite(value):
    """JSON has no NaN: a NaN or infinite float is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(out_dir: str | Path, rows: Sequence[dict],
                 skipped: Sequence[dict] = ()) -> tuple[Path, Path]:
    """Write report.md and report.json into out_dir, each through a temporary file renamed
    into place (a killed run never leaves a torn report); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    payload = {"version": REPORT_VERSION, "rows": list(rows), "skipped": list(skipped)}
    for path, text in ((md, render_markdown(rows, skipped)),
                       (js, json.dumps(_finite(payload), indent=2, ensure_ascii=False,
                                       allow_nan=False) + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return md, js
