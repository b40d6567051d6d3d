"""Evaluation report: numbers on hand-computed examples, file shapes, the top-5 protocol."""

import json

import pytest

from jaxzero.config.schema import RewardConfig
from jaxzero.diagnosis.reward import answer_block
from jaxzero.diagnosis.report import (TOP5_TEMPLATE, CaseResult, ranked_answers, render_markdown, score_checkpoint, summarize_checkpoint, top5_prompt, write_report)
from jaxzero.diagnosis.hypernyms import load_hypernyms
from jaxzero.diagnosis.judge import RuleJudge
from jaxzero.diagnosis.protocols import Verdict
from jaxzero.diagnosis.rarearena import PLACEHOLDER
from jaxzero.diagnosis.analysis import analyze_response
from jaxzero.diagnosis.reward import extract_answer

OK = "<think>tall, lens dislocation</think>\n<answer>Marfan syndrome</answer>"
NO_THINK = "<answer>Marfan syndrome</answer>"
NO_ANSWER = "I am not sure."
MIXED = OK + "马凡综合征"
REWARD = {"mode": "strict", "matcher": "rapidfuzz", "format_score": 0.1, "score": 1.0,
          "threshold": 0.8}


def _case(i, rule, verdict, response, length, answers=("x",)):
    return CaseResult(case_id=str(i), labels=("Marfan syndrome",), response=response,
                      answers=answers, rule_score=rule, verdict=verdict,
                      analysis=analyze_response(response), length=length)


# rule match | loose top-1, top-5 | strict top-1, top-5 | format ok | think dropped | mixed:
CASES = [
    _case(0, 1.0, Verdict.of_scores((2, 0, 0, 0, 0)), OK, 100),    # y | 2 2 | 2 2 | y n n
    _case(1, 0.0, Verdict.of_scores((1, 2, 0)), NO_THINK, 200),    # n | 1 2 | 1 2 | n y n
    _case(2, 1.0, Verdict.of_scores((0, 0, 0, 0, 1)), NO_ANSWER, 300),  # y | 0 1 | 0 1 | n n n
    _case(3, 0.0, Verdict(None, (2,), "1) x - score 2", "unreadable"), OK, 400),  # n | 2 2 | - -
    _case(4, 0.1, Verdict.of_scores(()), MIXED, 500, answers=()),  # n | 0 0 | 0 0 | y n y
]


def test_row_numbers_by_hand():
    row = summarize_checkpoint("run/step_500", CASES, step=500, judge="gpt-4o",
                               protocol="rarearena:abc", top_k=5)
    assert row == {
        "checkpoint": "run/step_500", "step": 500, "n": 5,
        "judge": "gpt-4o", "judge_protocol": "rarearena:abc", "reward": REWARD,
        # RareArena's columns: the loose scores over all five cases.
        "top1": {"score0": 0.4, "score1": 0.2, "score2": 0.4, "total": pytest.approx(0.6)},
        "top5": {"score0": 0.2, "score1": 0.2, "score2": 0.6, "total": 0.8},
        # Beyond RareArena: the strict parse over the four judged cases.
        "strict_top1": {"score0": 0.5, "score1": 0.25, "score2": 0.25, "total": 0.5},
        "strict_top5": {"score0": 0.25, "score1": 0.25, "score2": 0.5, "total": 0.75},
        "judged": 4, "unparsed": 1, "no_score": 0,
        "rule_accuracy": 0.4,
        "agreement": {"score2": 0.75, "total": 0.5},
        "confusion": {"both": 1, "rule_only": 1, "judge_only": 0, "neither": 2},
        "format_ok": 0.6, "think_dropped": 0.2, "mixed_language": 0.2,
        "response_length_mean": 300.0,
    }
    assert summarize_checkpoint("a", CASES, judge="j")["top5"] is None


def test_row_without_judge_and_with_only_unparsed():
    plain = [_case(i, c.rule_score, None, OK, 10) for i, c in enumerate(CASES)]
    row = summarize_checkpoint("base", plain)
    assert (row["top1"], row["agreement"], row["judge"], row["judged"], row["unparsed"]) == (
        None, None, None, 0, 0)
    assert row["rule_accuracy"] == 0.4
    row = summarize_checkpoint("b", CASES[3:4], judge="j")
    assert (row["strict_top1"], row["judged"], row["unparsed"]) == (None, 0, 1)
    assert row["top1"] == {"score0": 0.0, "score1": 0.0, "score2": 1.0, "total": 1.0}
    # A reply without any `score N` is 0 in RareArena's columns, and counted.
    silent = _case(5, 0.0, Verdict(None, (), "I cannot say", "no score lines"), OK, 10)
    row = summarize_checkpoint("c", [silent, CASES[0]], judge="j")
    assert (row["no_score"], row["unparsed"], row["top1"]["score0"], row["top1"]["score2"]) \
        == (1, 1, 0.5, 0.5)
    with pytest.raises(ValueError, match="every case needs a verdict"):
        summarize_checkpoint("c", CASES, judge=None)
    with pytest.raises(ValueError, match="top_k"):
        summarize_checkpoint("c", CASES, judge="j", top_k=3)


def test_report_files(tmp_path):
    rows = [summarize_checkpoint("step_0", CASES, step=0, judge="gpt-4o", protocol="p:1",
                                 top_k=5),
            summarize_checkpoint("step_500", [_case(0, 1.0, None, OK, 7)],
                                 step=500)]
    skipped = [{"checkpoint": "run@900", "error": "CheckpointError: torn"}]
    md_path, json_path = write_report(tmp_path / "out", rows, skipped)
    assert json.loads(json_path.read_text()) == {"version": 2, "rows": rows,
                                                 "skipped": skipped}
    text = md_path.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("| Checkpoint | Step | N | Judge | Protocol | Reward | "
                               "Top-1 synonym (S2) | Top-1 S1+S2 | Top-1 S1 | Top-1 S0 |")
    assert "Strict top-5 S1+S2" in lines[0] and lines[1].count("---") == lines[0].count("|") - 1
    assert lines[2] == ("| step_0 | 0 | 5 | gpt-4o | p:1 | strict/rapidfuzz>0.8 | 40.0% | "
                        "60.0% | 20.0% | 40.0% | 60.0% | 80.0% | 20.0% | 20.0% | 25.0% | "
                        "50.0% | 50.0% | 75.0% | 4 | 1 | 0 | 40.0% | 75.0% | 50.0% | 60.0% | "
                        "20.0% | 20.0% | 300 |")
    assert lines[3] == ("| step_500 | 500 | 1 | - | - | strict/rapidfuzz>0.8 | - | - | - | - | "
                        "- | - | - | - | - | - | - | - | 0 | 0 | 0 | 100.0% | - | - | 100.0% | "
                        "0.0% | 0.0% | 7 |")
    assert "DiagnosisZero" in text and "- run@900: CheckpointError: torn" in text
    assert "Top-5" not in render_markdown(rows[1:])


def test_json_report_has_no_nan(tmp_path):
    row = summarize_checkpoint("s", [_case(0, 1.0, None, OK, 7)])
    row["response_length_mean"] = float("nan")
    _, js = write_report(tmp_path, [row])
    assert "NaN" not in js.read_text()
    assert json.loads(js.read_text())["rows"][0]["response_length_mean"] is None


def test_top5_prompt_and_ranked_answers():
    assert TOP5_TEMPLATE.count(PLACEHOLDER) == 1
    prompt = top5_prompt("A 12-year-old boy with tall stature and lens dislocation")
    assert prompt.endswith("A 12-year-old boy with tall stature and lens dislocation")
    assert "<answer>" in prompt and "five" in prompt
    response = ("<think>Tall, ectopia lentis...</think>\n<answer>\n"
                "1. Marfan syndrome;\n2) Homocystinuria\n\n- Ehlers-Danlos syndrome.\n"
                "* Loeys-Dietz syndrome\n5. Stickler syndrome\n6. Weill-Marchesani syndrome\n"
                "</answer>")
    assert ranked_answers(response, 5) == ("Marfan syndrome", "Homocystinuria",
                                           "Ehlers-Danlos syndrome", "Loeys-Dietz syndrome",
                                           "Stickler syndrome")
    # Top-1 grades the whole block, what the matching rule reads, as written.
    assert ranked_answers("<answer> Marfan syndrome\n(MFS) </answer>", 1) == (
        "Marfan syndrome\n(MFS)",)
    for text in (response, "<answer> A\n(B) </answer>", "x", "<answer></answer><answer>C.</answer>"):
        for mode in ("strict", "flexible"):
            block = answer_block(text, mode)
            assert (block and block.lower()) == (extract_answer(text, mode) and
                                                 extract_answer(text, mode))
    assert ranked_answers("1. Marfan syndrome", 5) == ranked_answers("<answer>", 1) == ()
    assert ranked_answers("<answer>\n \n</answer>", 5) == ()
    # The block is chosen by the reward's mode.
    two = "<answer></answer> then <answer>1. Gaucher disease</answer>"
    assert ranked_answers(two, 5, "strict") == ()
    assert ranked_answers(two, 5, "flexible") == ("Gaucher disease",)


def test_score_checkpoint_end_to_end_with_the_rule_judge(tmp_path):
    table_path = tmp_path / "hypernyms.json"
    table_path.write_text(json.dumps([
        {"Orphanetid": "558", "name": "Marfan syndrome", "type": "Disease",
         "parents": [{"parent": "Syndrome with aortic dilatation", "parent_child_count": 7,
                      "parent_disease_count": 7},
                     {"parent": "Rare connective tissue disease", "parent_child_count": 90,
                      "parent_disease_count": 300}]}]))
    records = [
        {"id": "a", "labels": ["Marfan syndrome"], "orpha_id": "558", "diagnosis": "MFS"},
        {"id": "b", "labels": ["Erdheim-Chester disease"], "orpha_id": "35687",
         "diagnosis": "Erdheim-Chester disease"},
        {"id": "c", "labels": ["Gaucher disease"], "orpha_id": "355", "diagnosis": "Gaucher"},
    ]
    responses = [
        "<think>x</think><answer>\n1. Loeys-Dietz syndrome\n2. Syndrome with aortic dilatation\n"
        "</answer>",
        "<answer>Erdheim-Chester disease</answer>",
        "<think>I do not know",
    ]
    seen = []

    class Recording(RuleJudge):
        def judge_many(self, items):
            seen.extend(items)
            return super().judge_many(items)

    row, cases = score_checkpoint("step_0", records, responses, [10, 20, 30],
                                  judge=Recording(), hypernyms=load_hypernyms(table_path),
                                  reward_cfg=RewardConfig(), top_k=5, step=0)
    assert seen[0].score1_labels == ("Syndrome with aortic dilatation",)
    assert seen[1].score1_labels == () and seen[2].answers == ()
    # answers (top-1, top-5): a = (0, 1), b = (2, 2), c = no answer (0, 0);
    # rule: a 0.1 (the whole two-line block), b 1.0, c 0.0.
    assert [c.rule_score for c in cases] == [0.1, 1.0, 0.0]
    assert [c.verdict.scores for c in cases] == [(0, 1), (2,), ()]
    assert row["judge"] == "matching-rule(rapidfuzz>0.8)" and (row["judged"], row["n"]) == (3, 3)
    third = pytest.approx(1 / 3)
    assert row["top1"] == {"score0": pytest.approx(2 / 3), "score1": 0.0, "score2": third,
                           "total": third}
    assert row["top5"] == {"score0": third, "score1": third, "score2": third,
                           "total": pytest.approx(2 / 3)}
    assert row["rule_accuracy"] == third
    assert row["agreement"] == {"score2": 1.0, "total": 1.0}
    assert row["confusion"] == {"both": 1, "rule_only": 0, "judge_only": 0, "neither": 2}
    assert (row["format_ok"], row["think_dropped"], row["mixed_language"]) == (third, third, 0)
    assert row["response_length_mean"] == 20.0

    row, cases = score_checkpoint("step_0", records, responses, [10, 20, 30], judge=None,
                                  hypernyms=None, reward_cfg=RewardConfig(), top_k=1)
    assert row["top1"] is None and [c.verdict for c in cases] == [None] * 3
    with pytest.raises(ValueError, match="3 records, 2 responses"):
        score_checkpoint("x", records, responses[:2], [1, 2], judge=None, hypernyms=None,
                         reward_cfg=RewardConfig())
