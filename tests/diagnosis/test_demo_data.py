"""The demo cases: RareArena's RDC schema, 10 diseases x 24, interleaved, short, each with a
learnable cue for its disease, and exactly what scripts/make_demo_cases.py writes."""

import collections
import datetime
import json
import math
import re
import subprocess
import sys

import pytest

from helpers import REPO
from jaxzero.diagnosis.demo_data import demo_cases_path

SCHEMA = {"_id": str, "case_report": str, "test_results": str, "diagnosis": str,
          "Orpha_name": str, "Orpha_id": int, "age": str, "gender": str, "pub_date": str}

# Orphanet numbers, checked against independent disease-code tables (RareArena's Orphanet table
# among them).
ORPHA_IDS = {"Fabry disease": 324, "Wilson disease": 905, "Takayasu arteritis": 3287,
             "Erdheim-Chester disease": 35687, "Gaucher disease": 355, "Acromegaly": 963,
             "Myasthenia gravis": 589, "Granulomatosis with polyangiitis": 900,
             "Marfan syndrome": 558, "Paroxysmal nocturnal hemoglobinuria": 447}

# Words that would give the answer away if a case's own text used them.
GIVEAWAYS = ("fabry", "wilson", "takayasu", "erdheim", "chester", "gaucher", "acromegal",
             "myasthen", "granulomatosis", "polyangiitis", "wegener", "marfan", "paroxysmal",
             "hemoglobinuria", "haemoglobinuria")


@pytest.fixture(scope="module")
def records():
    lines = demo_cases_path().read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _words(text):
    return set(re.findall(r"\w+", text.lower()))


def test_path_is_packaged_file():
    path = demo_cases_path()
    assert path.name == "cases.jsonl" and path.is_file()


def test_schema_fields_and_types(records):
    assert len(records) == 240
    for r in records:
        assert set(r) == set(SCHEMA), r["_id"]
        for field, typ in SCHEMA.items():
            assert type(r[field]) is typ, (r["_id"], field)
            if typ is str:
                assert r[field].strip() == r[field] and r[field], (r["_id"], field)
        assert r["gender"] in ("Male", "Female")
        assert r["age"].isdigit() and 1 <= int(r["age"]) <= 90
        assert datetime.date.fromisoformat(r["pub_date"]).isoformat() == r["pub_date"]
        assert f"{r['age']}-year-old" in r["case_report"]
    assert len({r["_id"] for r in records}) == len(records)


def test_ten_real_diseases_24_cases_each(records):
    counts = collections.Counter((r["Orpha_name"], r["Orpha_id"]) for r in records)
    assert counts == {(name, i): 24 for name, i in ORPHA_IDS.items()}


def test_diagnosis_names_the_orphanet_disease(records):
    for r in records:
        assert _words(r["Orpha_name"]) <= _words(r["diagnosis"]), r["_id"]
    by_disease = collections.defaultdict(set)
    for r in records:
        by_disease[r["Orpha_name"]].add(r["diagnosis"])
    assert sum(len(v) > 1 for v in by_disease.values()) >= 6  # written as case reports vary


def test_case_text_does_not_name_the_disease(records):
    for r in records:
        text = (r["case_report"] + " " + r["test_results"]).lower()
        assert not any(word in text for word in GIVEAWAYS), r["_id"]


def test_cases_are_short_and_distinct(records):
    for r in records:
        n = len((r["case_report"] + " " + r["test_results"]).split())
        assert 25 <= n <= 50, (r["_id"], n)
    assert len({r["case_report"] for r in records}) == len(records)
    assert len({r["test_results"] for r in records}) == len(records)


@pytest.mark.parametrize("cut", [math.floor, round, math.ceil])
def test_both_70_30_splits_cover_all_diseases(records, cut):
    n_train = cut(0.7 * len(records))
    train, test = records[:n_train], records[n_train:]
    assert {r["Orpha_name"] for r in train} == set(ORPHA_IDS)
    assert {r["Orpha_name"] for r in test} == set(ORPHA_IDS)


def test_packaged_file_is_the_generators_output(tmp_path):
    out = tmp_path / "cases.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_cases.py"), "--out",
                    str(out)], check=True, capture_output=True)
    assert out.read_bytes() == demo_cases_path().read_bytes()


def _keywords(records):
    """Per disease, the words that every one of its cases holds and no other disease's case."""
    shared, anywhere = {}, collections.defaultdict(set)
    for r in records:
        words = _words(r["case_report"] + " " + r["test_results"])
        d = r["Orpha_name"]
        shared[d] = shared[d] & words if d in shared else words
        anywhere[d] |= words
    return {d: w - set().union(*(v for e, v in anywhere.items() if e != d))
            for d, w in shared.items()}


def test_every_disease_has_a_keyword_that_all_its_cases_hold(records):
    """The demo's task is learnable: each disease's cases all hold a word no other disease's
    case uses, and its cases share nothing else that sets them apart."""
    keywords = _keywords(records)
    assert all(keywords.values()), keywords
    assert all(len(k) <= 3 for k in keywords.values()), keywords  # a cue, not a template


def test_held_out_keywords_were_seen_in_training(records):
    """The test split's cases carry their disease's keyword as the training split has it, so
    held-out accuracy measures what was learnt from the training cases."""
    n_train = int(0.7 * len(records))
    train_keywords = _keywords(records[:n_train])
    for r in records[n_train:]:
        words = _words(r["case_report"] + " " + r["test_results"])
        assert words & train_keywords[r["Orpha_name"]], r["_id"]


def test_case_report_also_has_a_disease_specific_sign(records):
    """Beside the keyword, the report holds a sign no other disease's report has."""
    signs = collections.defaultdict(set)
    for r in records:
        signs[r["Orpha_name"]] |= _words(r["case_report"])
    for r in records:
        others = set().union(*(v for d, v in signs.items() if d != r["Orpha_name"]))
        assert _words(r["case_report"]) - others, r["_id"]
