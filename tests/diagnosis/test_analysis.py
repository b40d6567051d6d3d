"""Format, dropped-think, trailing-text and mixed-language findings on realistic responses."""

import time

import pytest

from jaxzero.diagnosis.analysis import ResponseAnalysis, analyze_response, summarize

THINK = ("<think>\nThe patient has ascending weakness two weeks after Campylobacter enteritis, "
         "areflexia and albuminocytological dissociation in the CSF.\n</think>\n")
GOOD = THINK + "<answer>\nGuillain-Barré Syndrome\n</answer>"

# DiagnosisZero's two examples of the 7B model at 1K steps: a second language after </answer>.
JAPANESE_AFTER = ("<think>\nCD20, CD10, BCL-2 and BCL-6 positive with a high Ki-67 index.\n"
                  "</think>\n<answer>\nDiffuse Large B-Cell Lymphoma\n</answer>"
                  "バルク細胞リンパ腫とは異なる診断を提示しており、免疫組織化学の結果から推測されます。")
CHINESE_AFTER = GOOD + "知情人士指出，这里的诊断指向需要考虑多种神经性疾病，最终诊断为Guillain-Barré综合症。"


def _flags(a: ResponseAnalysis):
    return (a.has_think, a.has_answer, a.format_ok, a.think_dropped, a.text_after_answer)


@pytest.mark.parametrize("text,flags", [
    (GOOD, (True, True, True, False, False)),
    (GOOD + "\n  \n", (True, True, True, False, False)),
    ("<answer>Erdheim-Chester disease</answer>", (False, True, False, True, False)),
    ("\n<answer> Fabry disease </answer>\nThis fits the angiokeratomas.",
     (False, True, False, True, True)),
    ("<answer>Takayasu arteritis</answer><think>young woman, pulse deficit</think>",
     (True, True, False, False, True)),
    ("<think>young woman, pulse deficit. <answer>Takayasu arteritis</answer>",
     (False, True, False, False, False)),
    (THINK + "The most likely diagnosis is Castleman disease.", (True, False, False, False, False)),
    ("I think it is Wilson disease.", (False, False, False, False, False)),
    ("", (False, False, False, False, False)),
])
def test_format_findings(text, flags):
    assert _flags(analyze_response(text)) == flags


def test_mixed_language_after_the_answer_as_in_the_seed():
    for text in (JAPANESE_AFTER, CHINESE_AFTER):
        a = analyze_response(text)
        assert a.format_ok and a.text_after_answer and a.mixed_language
        assert a.mixed_language_where == ("after_answer",)


@pytest.mark.parametrize("text,where", [
    ("<think>Сильная слабость в ногах, arreflexia.</think><answer>GBS</answer>", ("think",)),
    (THINK + "<answer>木村病</answer>", ("answer",)),
    (THINK + "<answer>기쿠치병</answer>", ("answer",)),
    ("진단: <think>fever</think><answer>Kikuchi disease</answer>", ("other",)),
    ("<think>発熱とリンパ節腫脹</think><answer>Kikuchi disease</answer>（菊池病）",
     ("think", "after_answer")),
    ("<think>ВИЧ-негативный</think>診断<answer>Castleman病</answer>", ("think", "answer",
                                                                      "other")),
])
def test_mixed_language_where(text, where):
    a = analyze_response(text)
    assert a.mixed_language and a.mixed_language_where == where


@pytest.mark.parametrize("text", [
    GOOD,
    THINK + "<answer>β-thalassemia major</answer>",
    THINK + "<answer>Sjögren syndrome</answer>",
    "<think>Oral and genital ulcers; pathergy positive.</think><answer>Behçet disease</answer>",
    "<think>Copper 420 µg/24 h, temperature 38.5 °C, ±2 SD, α-galactosidase ↓.</think>"
    "<answer>Wilson disease</answer> — “confirmed”.",
])
def test_latin_greek_and_symbols_are_not_mixed_language(text):
    a = analyze_response(text)
    assert not a.mixed_language and a.mixed_language_where == ()


def test_summarize_gives_rates():
    analyses = [analyze_response(t) for t in
                [GOOD, GOOD, JAPANESE_AFTER, "<answer>Fabry disease</answer>"]]
    rates = summarize(analyses)
    assert rates["format_ok"] == 0.75
    assert rates["think_dropped"] == 0.25
    assert rates["text_after_answer"] == 0.25
    assert rates["mixed_language"] == 0.25
    assert rates["mixed_language_after_answer"] == 0.25
    assert rates["mixed_language_think"] == 0.0
    assert rates["has_answer"] == 1.0
    assert summarize([]) == {}


def test_large_and_hostile_responses_are_fast():
    for text in ["<think>" * 10_000 + "漢" * 100_000, "<answer>x</answer>" * 10_000,
                 "<think>" + "cough " * 20_000 + "</think><answer>Sarcoidosis</answer>" * 3]:
        start = time.perf_counter()
        analyze_response(text)
        assert time.perf_counter() - start < 0.5


def test_think_after_the_answer_counts_as_after_the_answer():
    a = analyze_response("<answer>Kimura disease</answer><think>嗜酸性粒细胞增多</think>")
    assert a.mixed_language_where == ("after_answer",) and not a.format_ok
