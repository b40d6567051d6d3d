"""Evaluation report: numbers on hand-computed examples, file shapes, the top-5 protocol."""

import json

import pytest

from jaxzero.config.schema import RewardConfig
from jaxzero.diagnosis.report import (TOP5_TEMPLATE, CaseResult, ranked_answers, render_markdown,
                                 score_checkpoint, summarize_checkpoint, top5_prompt,
                                 write_report)
from jaxzero.diagnosis.hypernyms import load_hypernyms
from jaxzero.diagnosis.judge import JUDGE_PROMPT_VERSION, RuleJudge, Verdict
from jaxzero.diagnosis.rarearena import PLACEHOLDER
from jaxzero.diagnosis.analysis import analyze_response

OK = "<think>tall, lens dislocation</think>\n<answer>Marfan syndrome</answer>"
NO_THINK = "<answer>Marfan syndrome</answer>"
NO_ANSWER = "I am not sure."
MIXED = OK + "马凡综合征"


def _case(i, rule, verdict, response, length):
    return CaseResult(case_id=str(i), labels=("Marfan syndrome",), response=response,
                      answers=("x",), rule_score=rule, verdict=verdict,
                      analysis=analyze_response(response), length=length)


# rule match | judge top-1 | judge top-5 | format ok | think dropped | mixed (by hand):
CASES = [
    _case(0, 1.0, Verdict((2, 0, 0, 0, 0)), OK, 100),              # yes | 2 | 2 | y | n | n
    _case(1, 0.0, Verdict((1, 2, 0)), NO_THINK, 200),              # no  | 1 | 2 | n | y | n
    _case(2, 1.0, Verdict((0, 0, 0, 0, 1)), NO_ANSWER, 300),       # yes | 0 | 1 | n | n | n
    _case(3, 0.0, Verdict(None, "??", "no score lines"), OK, 400),  # unparsed   | y | n | n
    _case(4, 0.1, Verdict(()), MIXED, 500),                        # no  | 0 | 0 | y | n | y
]


def test_row_numbers_by_hand():
    row = summarize_checkpoint("run/step_500", CASES, step=500, judge="gpt-4o", top_k=5)
    assert row == {
        "checkpoint": "run/step_500", "step": 500, "n": 5,
        "judge": "gpt-4o", "judge_prompt_version": JUDGE_PROMPT_VERSION,
        "top1": {"score0": 0.5, "score1": 0.25, "score2": 0.25, "total": 0.5},
        "top5": {"score0": 0.25, "score1": 0.25, "score2": 0.5, "total": 0.75},
        "judged": 4, "unparsed": 1,
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
    assert (row["top1"], row["judged"], row["unparsed"]) == (None, 0, 1)
    with pytest.raises(ValueError, match="every case needs a verdict"):
        summarize_checkpoint("c", CASES, judge=None)
    with pytest.raises(ValueError, match="top_k"):
        summarize_checkpoint("c", CASES, judge="j", top_k=3)


def test_report_files(tmp_path):
    rows = [summarize_checkpoint("step_0", CASES, step=0, judge="gpt-4o", top_k=5),
            summarize_checkpoint("step_500", [_case(0, 1.0, None, OK, 7)],
                                 step=500)]
    md_path, json_path = write_report(tmp_path / "out", rows)
    assert json.loads(json_path.read_text()) == {"version": 1, "rows": rows}
    lines = md_path.read_text().splitlines()
    assert lines[0].startswith("| Checkpoint | Step | N | Judge | Top-1 S0 |")
    assert "Top-5 total" in lines[0] and lines[1].count("---") == lines[0].count("|") - 1
    assert lines[2] == ("| step_0 | 0 | 5 | gpt-4o | 50.0% | 25.0% | 25.0% | 50.0% | 25.0% | "
                        "25.0% | 50.0% | 75.0% | 1 | 40.0% | 75.0% | 50.0% | 60.0% | 20.0% | "
                        "20.0% | 300 |")
    assert lines[3] == ("| step_500 | 500 | 1 | - | - | - | - | - | - | - | - | - | 0 | 100.0% | "
                        "- | - | 100.0% | 0.0% | 0.0% | 7 |")
    assert "Top-5" not in render_markdown(rows[1:])


def test_top5_prompt_and_ranked_answers():
    assert TOP5_TEMPLATE.count(PLACEHOLDER) == 1
    prompt = top5_prompt("A 12-year-old boy with tall stature and lens dislocation")
    assert prompt.endswith("A 12-year-old boy with tall stature and lens dislocation")
    assert "<answer>" in prompt and "five" in prompt
    response = ("<think>Tall, ectopia lentis...</think>\n<answer>\n"
                "1. Marfan syndrome;\n2) Homocystinuria\n\n- Ehlers-Danlos syndrome.\n"
                "* Loeys-Dietz syndrome\n5. Stickler syndrome\n6. Weill-Marchesani syndrome\n"
                "</answer>")
    assert ranked_answers(response, 5) == ("marfan syndrome", "homocystinuria",
                                           "ehlers-danlos syndrome", "loeys-dietz syndrome",
                                           "stickler syndrome")
    # Top-1 grades the whole block, exactly what the matching rule reads.
    assert ranked_answers("<answer> Marfan syndrome\n(MFS) </answer>", 1) == (
        "marfan syndrome\n(mfs)",)
    assert ranked_answers("1. Marfan syndrome", 5) == ranked_answers("<answer>", 1) == ()
    assert ranked_answers("<answer>\n \n</answer>", 5) == ()
    # The block is chosen by the reward's mode.
    two = "<answer></answer> then <answer>1. Gaucher disease</answer>"
    assert ranked_answers(two, 5, "strict") == ()
    assert ranked_answers(two, 5, "flexible") == ("gaucher disease",)


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
