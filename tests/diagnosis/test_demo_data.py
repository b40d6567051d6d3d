"""The demo cases: RareArena's RDC schema, 8 diseases x 12, interleaved, short."""

import collections
import datetime
import json
import math
import re

import pytest

from jaxzero.diagnosis.demo_data import demo_cases_path

SCHEMA = {"_id": str, "case_report": str, "test_results": str, "diagnosis": str,
          "Orpha_name": str, "Orpha_id": int, "age": str, "gender": str, "pub_date": str}

# Orphanet numbers, checked against several independent disease-code tables.
ORPHA_IDS = {"Fabry disease": 324, "Wilson disease": 905, "Takayasu arteritis": 3287,
             "Erdheim-Chester disease": 35687, "Gaucher disease": 355, "Acromegaly": 963,
             "Myasthenia gravis": 589, "Granulomatosis with polyangiitis": 900}

# Words that would give the answer away if a case's own text used them.
GIVEAWAYS = ("fabry", "wilson", "takayasu", "erdheim", "chester", "gaucher", "acromegal",
             "myasthen", "granulomatosis", "polyangiitis", "wegener")


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
    assert len(records) == 96
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


def test_eight_real_diseases_twelve_cases_each(records):
    counts = collections.Counter((r["Orpha_name"], r["Orpha_id"]) for r in records)
    assert counts == {(name, i): 12 for name, i in ORPHA_IDS.items()}


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
        assert 40 <= n <= 70, (r["_id"], n)
    assert len({r["case_report"] for r in records}) == len(records)
    assert len({r["test_results"] for r in records}) == len(records)


@pytest.mark.parametrize("cut", [math.floor, round, math.ceil])
def test_both_70_30_splits_cover_all_diseases(records, cut):
    n_train = cut(0.7 * len(records))
    train, test = records[:n_train], records[n_train:]
    assert {r["Orpha_name"] for r in train} == set(ORPHA_IDS)
    assert {r["Orpha_name"] for r in test} == set(ORPHA_IDS)
