"""The diagnosis reward: extraction semantics, similarity against references, bounded time."""

import difflib
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxzero.diagnosis import reward
from jaxzero.diagnosis.rarearena import build_prompt_text, load_prompt_template

LABELS = {
    "ecd": ["Erdheim-Chester disease"],
    "fabry": ["Fabry disease"],
    "takayasu": ["Takayasu arteritis"],
    "castleman": ["Unicentric Castleman disease", "Castleman disease"],
    "gbs": ["Guillain-Barré syndrome"],
}

MULTI_TAG = ("<think>Peripheral neuropathy after diarrhoea suggests <answer>Guillain-Barré "
             "syndrome</answer> but the distribution is odd.</think>\n"
             "<answer> Chronic inflammatory demyelinating polyneuropathy </answer>\n"
             "<answer>Miller Fisher syndrome</answer>\n<answer> . </answer><answer>  </answer>")


# ----------------------------------------------------------------------------- extraction

def test_strict_takes_the_first_answer_block_flexible_the_last_valid_one():
    assert reward.extract_answer(MULTI_TAG) == "guillain-barré syndrome"
    assert reward.extract_answer(MULTI_TAG, "strict") == "guillain-barré syndrome"
    assert reward.extract_answer(MULTI_TAG, "flexible") == "miller fisher syndrome"


def test_extraction_strips_lowercases_and_spans_lines():
    response = "<think>x</think><answer>\n  Takayasu\nArteritis \n</answer>"
    assert reward.extract_answer(response) == "takayasu\narteritis"
    assert reward.extract_answer(response, "flexible") == "takayasu\narteritis"


def test_no_answer_block_gives_none_in_both_modes():
    for response in ["", "<think>Fabry disease</think> Fabry disease",
                     "<answer>Fabry disease", "Fabry disease</answer>",
                     "</answer>Fabry disease<answer>"]:
        assert reward.extract_answer(response, "strict") is None
        assert reward.extract_answer(response, "flexible") is None


def test_empty_first_block_is_an_answer_in_strict_mode_only():
    response = "<answer> </answer><answer>Castleman disease</answer>"
    assert reward.extract_answer(response, "strict") == ""
    assert reward.extract_answer(response, "flexible") == "castleman disease"
    assert reward.extract_answer("<answer>.</answer><answer> </answer>", "flexible") is None


def _seed_findall(text):
    return re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)


@pytest.mark.parametrize("response", [
    MULTI_TAG,
    "<think>Bilateral leg pain, xanthelasma.</think><answer>Erdheim-Chester disease</answer>",
    "<answer>Fabry disease</answer> and also <answer>Gaucher disease</answer>",
    "<answer></answer><answer>Wilson disease</answer>",
    "<answer><answer>Behçet disease</answer></answer>",
])
def test_strict_matches_the_seed_third_match_of_prompt_plus_response(response):
    """DiagnosisZero decoded prompt + response and took match 3; the prompt holds two tags."""
    prompt = build_prompt_text("A 23-year-old woman with arm claudication.",
                               load_prompt_template())
    decoded = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}"
    matches = _seed_findall(decoded)
    assert len(_seed_findall(prompt)) == 2
    assert reward.extract_answer(response, "strict") == matches[2].strip().lower()
    valid = [m.strip().lower() for m in _seed_findall(response)
             if m.strip() not in ("", ".")]
    assert reward.extract_answer(response, "flexible") == valid[-1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<answer>", "</answer>", "Fabry", " disease ", ".", "\n",
                                 "<answer", "answer>", "<think>"]), max_size=30))
def test_answer_spans_pair_tags_like_the_seed_regex(pieces):
    text = "".join(pieces)
    spans = [text[s:e] for s, e in reward.answer_spans(text)]
    assert spans == _seed_findall(text)


# ----------------------------------------------------------------------------- similarity

def _reference_similarity(prediction, labels, ratio):
    """An independent re-computation of the published rule."""
    prediction = prediction.lower().strip()
    labels = [label.lower().strip() for label in labels]
    if prediction in labels:
        return 1.0
    best = 0.0
    for label in labels:
        a, b = set(re.findall(r"\w+", prediction)), set(re.findall(r"\w+", label))
        jaccard = len(a & b) / len(a | b) if a and b else 0.0
        best = max(best, 0.8 * ratio(prediction, label) + 0.2 * jaccard)
    return best


def _lcs_ratio(a, b):
    """2·LCS / (|a| + |b|) by dynamic programming: what an Indel-based ratio computes."""
    if not a and not b:
        return 1.0
    row = [0] * (len(b) + 1)
    for ca in a:
        prev_diag, row[0] = 0, 0
        for j, cb in enumerate(b, start=1):
            prev_diag, row[j] = row[j], (prev_diag + 1 if ca == cb else max(row[j], row[j - 1]))
    return 2 * row[-1] / (len(a) + len(b))


PAIRS = [
    ("erdheim chester disease", LABELS["ecd"]),
    ("Erdheim-Chester", LABELS["ecd"]),
    ("fabry's disease", LABELS["fabry"]),
    ("anderson-fabry disease", LABELS["fabry"]),
    ("takayasu's arteritis", LABELS["takayasu"]),
    ("giant cell arteritis", LABELS["takayasu"]),
    ("multicentric castleman disease", LABELS["castleman"]),
    ("castleman", LABELS["castleman"]),
    ("guillain-barre syndrome", LABELS["gbs"]),
    ("acute inflammatory demyelinating polyneuropathy", LABELS["gbs"]),
    ("systemic lupus erythematosus", LABELS["takayasu"]),
    ("--", LABELS["fabry"]),
    ("", LABELS["fabry"]),
]


@pytest.mark.parametrize("prediction,labels", PAIRS)
def test_difflib_matcher_equals_an_independent_recomputation(prediction, labels):
    ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()  # noqa: E731
    expected = _reference_similarity(prediction, labels, ratio)
    assert reward.similarity(prediction, labels, "difflib") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("prediction,labels", PAIRS)
def test_rapidfuzz_matcher_equals_an_lcs_recomputation(prediction, labels):
    expected = _reference_similarity(prediction, labels, _lcs_ratio)
    assert reward.similarity(prediction, labels) == pytest.approx(expected, abs=1e-12)


def test_exact_match_ignores_case_and_outer_space():
    assert reward.similarity("  GUILLAIN-BARRÉ SYNDROME ", LABELS["gbs"]) == 1.0
    assert reward.similarity("castleman disease", LABELS["castleman"], "difflib") == 1.0


def test_word_sets_are_backslash_w_matches_and_empty_sets_give_zero_jaccard():
    # "fabry's" splits into "fabry" and "s": jaccard {fabry, disease} vs {fabry, s, disease}.
    ratio = difflib.SequenceMatcher(None, "fabry's disease", "fabry disease").ratio()
    assert reward.similarity("fabry's disease", ["Fabry disease"], "difflib") == \
        pytest.approx(0.8 * ratio + 0.2 * 2 / 3)
    assert reward.similarity("...", ["Fabry disease"], "difflib") == 0.0
    assert reward.similarity("a", ["ab"], "difflib") == pytest.approx(0.8 * 2 / 3)


def test_similarity_takes_the_best_label_and_ignores_blank_ones():
    best = reward.similarity("castleman disease", ["Unicentric Castleman disease", "  "])
    assert best == reward.similarity("castleman disease", ["Unicentric Castleman disease"])
    assert reward.similarity("castleman disease", ["Takayasu arteritis",
                                                   "Castleman disease"]) == 1.0


def test_similarity_rejects_bad_labels_and_matchers():
    with pytest.raises(TypeError):
        reward.similarity("fabry disease", "Fabry disease")
    with pytest.raises(ValueError, match="label"):
        reward.similarity("fabry disease", ["", " "])
    with pytest.raises(ValueError, match="matcher"):
        reward.similarity("fabry disease", ["Fabry disease"], matcher="levenshtein")
    with pytest.raises(ValueError, match="mode"):
        reward.extract_answer("<answer>x</answer>", mode="lenient")


# ----------------------------------------------------------------------------- score

def _respond(diagnosis):
    return f"<think>Considering the case.</think>\n<answer>{diagnosis}</answer>"


@pytest.mark.parametrize("matcher", ["rapidfuzz", "difflib"])
def test_score_rule(matcher):
    kw = dict(matcher=matcher)
    assert reward.compute_score("The diagnosis is Fabry disease.", LABELS["fabry"], **kw) == 0.0
    assert reward.compute_score(_respond("Fabry disease"), LABELS["fabry"], **kw) == 1.0
    assert reward.compute_score(_respond("Fabry diseas"), LABELS["fabry"], **kw) == 1.0
    assert reward.compute_score(_respond("Gaucher disease"), LABELS["fabry"], **kw) == 0.1
    assert reward.compute_score(_respond(""), LABELS["fabry"], **kw) == 0.1
    assert reward.compute_score(_respond("Castleman disease"), LABELS["castleman"], **kw) == 1.0
    assert reward.compute_score(_respond("Wilson disease"), LABELS["fabry"], score=2.0,
                                format_score=-0.5, **kw) == -0.5


def test_threshold_is_strictly_above():
    answer = "takayasu disease"
    sim = reward.similarity(answer, LABELS["takayasu"])
    assert 0.5 < sim < 1.0
    assert reward.compute_score(_respond(answer), LABELS["takayasu"], threshold=sim) == 0.1
    assert reward.compute_score(_respond(answer), LABELS["takayasu"],
                                threshold=sim - 1e-9) == 1.0


def test_modes_can_score_differently():
    labels = ["Miller Fisher syndrome"]
    assert reward.compute_score(MULTI_TAG, labels, mode="strict") == 0.1
    assert reward.compute_score(MULTI_TAG, labels, mode="flexible") == 1.0


def test_long_answers_are_capped_and_still_fail():
    long_answer = "Erdheim-Chester disease " + "with histiocytic infiltration " * 200
    assert len(long_answer) > reward.MAX_ANSWER_CHARS
    for matcher in reward.MATCHERS:
        start = time.perf_counter()
        assert reward.compute_score(_respond(long_answer), LABELS["ecd"],
                                    matcher=matcher) == 0.1
        assert time.perf_counter() - start < 0.5


def test_hostile_responses_score_quickly():
    cases = [
        ("<answer>" * 10_000 + "Fabry disease", 0.0),
        ("<answer>Fabry disease</answer>" * 10_000, 1.0),
        ("<think>" + "renal failure, angiokeratoma " * 3500 + "</think><answer>Fabry "
         "disease</answer>", 1.0),
        ("</answer>" * 5_000 + "<answer>x" * 5_000, 0.0),
        ("<answer>" + "\u0000\ud800漢字🧬" * 30_000 + "</answer>", 0.1),
    ]
    for response, expected in cases:
        for mode in reward.MODES:
            for matcher in reward.MATCHERS:
                start = time.perf_counter()
                got = reward.compute_score(response, LABELS["fabry"], mode=mode,
                                           matcher=matcher)
                assert time.perf_counter() - start < 0.5
                assert got == expected


@settings(max_examples=300, deadline=None)
@given(label=st.text(min_size=1, max_size=120).filter(
    lambda s: s.strip() and "</answer>" not in s and s.strip() != "."))
def test_exact_match_scores_one_under_both_matchers(label):
    response = _respond(label)
    for matcher in reward.MATCHERS:
        for mode in reward.MODES:
            assert reward.compute_score(response, [label], mode=mode, matcher=matcher) == 1.0


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=400), st.text(min_size=1, max_size=60).filter(str.strip))
def test_any_unicode_scores_within_the_reward_range(response, label):
    for matcher in reward.MATCHERS:
        assert reward.compute_score(response, [label], matcher=matcher) in (0.0, 0.1, 1.0)
        assert 0.0 <= reward.similarity(response, [label], matcher) <= 1.0


# ----------------------------------------------------------------------------- batch

def test_score_batch_matches_compute_score():
    names = ["Fabry disease", "Takayasu arteritis", "Castleman disease", "Sarcoidosis",
             "Erdheim Chester disease", "guillain barre syndrome"]
    keys = list(LABELS)
    responses = [_respond(names[i % len(names)]) if i % 7 else "no tags at all"
                 for i in range(64)]
    labels = [LABELS[keys[i % len(keys)]] for i in range(64)]
    for kwargs in [{}, dict(mode="flexible", matcher="difflib", format_score=0.0, score=2.0)]:
        scores = reward.score_batch(responses, labels, **kwargs)
        assert scores.dtype == np.float32 and scores.shape == (64,)
        expected = [reward.compute_score(r, lab, **kwargs) for r, lab in zip(responses, labels)]
        np.testing.assert_array_equal(scores, np.asarray(expected, np.float32))


def test_score_batch_of_1024_is_fast_and_checks_lengths():
    responses = [("<think>" + "The patient has angiokeratoma and acroparesthesia. " * 40 +
                  f"</think>\n<answer>Fabry disease type {i % 3}</answer>") for i in range(1024)]
    labels = [["Fabry disease"]] * 1024
    start = time.perf_counter()
    reward.score_batch(responses, labels)
    assert time.perf_counter() - start < 1.0  # the benchmark measures it; this catches blowups
    with pytest.raises(ValueError, match="label lists"):
        reward.score_batch(responses, labels[:10])
