"""Judge protocols: RareArena's prompts read from a checkout without running it, the sets and
the prompt they fill, and the loose (metric.py) and strict reads of a reply."""

import shutil

import pytest

from helpers import FIXTURES
from jaxzero.diagnosis.hypernyms import load_hypernyms
from jaxzero.diagnosis.protocols import (JudgeItem, Verdict, jaxzero_protocol, load_protocol,
                                         parse_reply)
from jaxzero.errors import DataError

RA = FIXTURES / "rarearena"
TABLE = load_hypernyms(RA / "benchmark_data" / "orphanet_hypernym.json")
MARFAN = {"id": "a", "labels": ["MFS", "Marfan syndrome"], "orpha_id": "558",
          "diagnosis": "MFS"}
ODD = {"id": "b", "labels": ["Odd disease"], "orpha_id": "999999", "diagnosis": "Odd disease"}


def test_prompts_are_read_from_the_checkout_without_running_it():
    # The fixture scripts raise SystemExit on their first line: importing them would stop here.
    protocol = load_protocol("rarearena", RA)
    assert protocol.source == str(RA / "eval" / "eval_updated.py")
    assert protocol.text("eval_prompt1").startswith("\n[fixture prompt 1]")
    assert "{score1_set}" in protocol.text("eval_prompt2")
    assert (protocol.temperature, protocol.max_tokens) == (0.1, 4096)
    old = load_protocol("rarearena-2025", RA)
    assert "[fixture prompt 2025]" in old.text("eval_prompt")
    assert protocol.version.startswith("rarearena:") and old.version.startswith("rarearena-2025:")
    assert jaxzero_protocol().version.startswith("jaxzero:")
    assert (jaxzero_protocol().temperature, jaxzero_protocol().max_tokens) == (0.0, 512)


def test_a_missing_prompt_or_checkout_is_one_line(tmp_path):
    shutil.copytree(RA, tmp_path / "ra")
    script = tmp_path / "ra" / "eval" / "eval_updated.py"
    script.write_text(script.read_text().replace("eval_prompt2 =", "other_prompt ="))
    with pytest.raises(DataError, match=r"eval_updated.py: no module-level string assignment "
                                        r"`eval_prompt2`"):
        load_protocol("rarearena", tmp_path / "ra")
    script.write_text('eval_prompt1 = "{answer}"\neval_prompt2 = "{answer} {score2_set}"\n')
    with pytest.raises(DataError, match=r"`eval_prompt1` has format fields \['answer'\], "
                                        r"expected \['answer', 'score2_set'\]"):
        load_protocol("rarearena", tmp_path / "ra")
    with pytest.raises(DataError, match=r"eval\.py: cannot read .*RareArena"):
        load_protocol("rarearena-2025", tmp_path)
    with pytest.raises(DataError, match="pass --rarearena-dir"):
        load_protocol("rarearena", None)
    script.write_text("eval_prompt1 = (\n")
    with pytest.raises(DataError, match="eval_updated.py:1: not valid Python"):
        load_protocol("rarearena", tmp_path / "ra")


def test_rarearena_fills_its_prompts_with_lists_and_the_answer_as_written():
    protocol = load_protocol("rarearena", RA)
    answer = "\n1. MARFAN Syndrome;\n2. Loeys-Dietz syndrome;\n"
    item = protocol.item(MARFAN, answer, ("MARFAN Syndrome", "Loeys-Dietz syndrome"), TABLE)
    assert item == JudgeItem("1. MARFAN Syndrome;\n2. Loeys-Dietz syndrome;",
                             ("MARFAN Syndrome", "Loeys-Dietz syndrome"),
                             ("MFS", "Marfan syndrome"), ("Syndrome with aortic dilatation",))
    prompt = protocol.render(item)
    assert prompt == protocol.text("eval_prompt2").format(
        answer="1. MARFAN Syndrome;\n2. Loeys-Dietz syndrome;",
        score2_set=["MFS", "Marfan syndrome"], score1_set=["Syndrome with aortic dilatation"])
    assert "Synonym list: ['MFS', 'Marfan syndrome']\n" in prompt
    assert "Parent list: ['Syndrome with aortic dilatation']\n" in prompt
    # No hypernyms: eval_prompt1, where score 1 is not allowed.
    odd = protocol.item(ODD, "Odd disease", ("Odd disease",), TABLE)
    assert protocol.render(odd).startswith("\n[fixture prompt 1]")
    assert "Synonym list: ['Odd disease']\n" in protocol.render(odd)
    assert protocol.parse("1. x: score 1;", odd).status == "unparsed"
    assert protocol.parse("1. x: score 1;", odd).loose == (1,)
    with pytest.raises(DataError, match="needs the Orphanet hypernym table"):
        protocol.item(MARFAN, answer, ("x",), None)


def test_rarearena_2025_grades_against_the_diagnosis_alone():
    protocol = load_protocol("rarearena-2025", RA)
    item = protocol.item(MARFAN, " Marfan syndrome ", ("Marfan syndrome",), TABLE)
    assert (item.score2_labels, item.score1_labels) == (("MFS",), ())
    prompt = protocol.render(item)
    assert "Reference: MFS\n" in prompt and "Answer:\nMarfan syndrome\n" in prompt
    assert protocol.parse("1. x: score 1;", item).scores == (1,)


def test_loose_read_is_metric_py_and_strict_read_is_separate():
    item = JudgeItem.as_written("a\nb\nc", ("a", "b", "c"), ("A",), ("B",))
    allowed = frozenset({0, 1, 2})
    # metric.py's `score (\d+)`: lower case, one space; preamble and stray scores count.
    reply = "I give score 0 overall.\n1. a: Score 2;\n2. b: score 1;\n3. c: score 2;"
    verdict = parse_reply(reply, item, allowed)
    assert verdict.loose == (0, 1, 2) and verdict.scores is None
    assert (verdict.loose_top(1), verdict.loose_top(5)) == (0, 2)
    good = parse_reply("1. a: score 0;\n2. b: score 1;\n3. c: score 2;", item, allowed)
    assert good.scores == good.loose == (0, 1, 2)
    assert (good.top(1), good.top(5), good.loose_top(1), good.loose_top(5)) == (0, 2, 0, 2)
    six = parse_reply(" ".join(f"score {s}" for s in (0, 0, 0, 0, 0, 2)), item, allowed)
    assert six.loose_top(5) == 0 and six.scores is None
    none = parse_reply("no idea", item, allowed)
    assert (none.loose, none.loose_top(1), none.top(1)) == ((), 0, None)
    assert Verdict.of_scores(()).loose_top(5) == 0
