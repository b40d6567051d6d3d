"""Hypernym table: loading a fixture in RareArena's schema, the <= 10 rule, and errors."""

import json

import pytest

from jaxzero.errors import DataError
from jaxzero.diagnosis.hypernyms import load_hypernyms, normalize_orpha_id


def _parent(name, disease_count, child_count=None):
    return {"parent": name, "parent_child_count": child_count or disease_count,
            "parent_disease_count": disease_count}


FIXTURE = [
    {"Orphanetid": "5", "name": "Long chain 3-hydroxyacyl-CoA dehydrogenase deficiency",
     "type": "Disease",
     "parents": [_parent("3-hydroxyacyl-CoA dehydrogenase deficiency", 2),
                 _parent("Rare hereditary metabolic disease with peripheral neuropathy", 54, 33),
                 _parent("Syndrome with hypoparathyroidism", 9)]},
    {"Orphanetid": "6", "name": "3-methylcrotonyl-CoA carboxylase deficiency", "type": "Disease",
     "parents": [_parent("Classic organic aciduria", 25, 14)]},
    {"Orphanetid": "7", "name": "3C syndrome", "type": "Malformation syndrome",
     "parents": [_parent("Syndrome with a Dandy-Walker malformation as a major feature", 11),
                 _parent("Genetic syndrome with a Dandy-Walker malformation", 8)]},
    {"Orphanetid": "8", "name": "Edge case disease", "type": "Clinical subtype",
     "parents": [_parent("Group of exactly ten", 10), _parent("Group of eleven", 11),
                 _parent("Group of exactly ten", 10)]},
    {"Orphanetid": "9", "name": "Orphan without parents", "type": "Disease", "parents": []},
    {"Orphanetid": "10", "name": "Marfan syndrome", "type": "Disease",
     "parents": [_parent("Syndrome with aortic dilatation", 7)]},
]


@pytest.fixture
def table_path(tmp_path):
    path = tmp_path / "orphanet_hypernym.json"
    path.write_text(json.dumps(FIXTURE))
    return path


def test_parents_at_most_ten_diseases_are_hypernyms(table_path):
    table = load_hypernyms(table_path)
    assert len(table.by_id) == 6
    assert table.hypernyms("5") == ("3-hydroxyacyl-CoA dehydrogenase deficiency",
                                    "Syndrome with hypoparathyroidism")
    assert table.hypernyms("6") == ()
    assert table.hypernyms("7") == ("Genetic syndrome with a Dandy-Walker malformation",)
    # 10 is in, 11 is out, a repeated parent appears once.
    assert table.hypernyms("8") == ("Group of exactly ten",)
    assert table.hypernyms("9") == ()


def test_lookup_by_id_forms_and_by_name(table_path):
    table = load_hypernyms(table_path)
    expected = ("Syndrome with aortic dilatation",)
    assert table.hypernyms(10) == table.hypernyms("ORPHA:10") == expected
    assert table.hypernyms(" 10 ") == expected
    assert table.hypernyms(name="marfan SYNDROME ") == expected
    # The id wins; the name is the fallback for an unknown or missing id.
    assert table.hypernyms("7", name="Marfan syndrome")[0].startswith("Genetic syndrome")
    assert table.hypernyms("424242", name="Marfan syndrome") == expected
    assert table.hypernyms("424242") == table.hypernyms(name="Unknown") == ()
    assert table.find("10").name == "Marfan syndrome"


def test_cut_off_is_configurable(table_path):
    assert load_hypernyms(table_path, max_disease_count=2).hypernyms("5") == (
        "3-hydroxyacyl-CoA dehydrogenase deficiency",)
    assert load_hypernyms(table_path, max_disease_count=54).hypernyms("6") == (
        "Classic organic aciduria",)
    with pytest.raises(ValueError):
        load_hypernyms(table_path, max_disease_count=0)


def test_orpha_id_forms():
    assert normalize_orpha_id("ORPHA:0042") == "42"
    for bad in ("abc", "5.0", True, None, 1.5):
        with pytest.raises(DataError):
            normalize_orpha_id(bad)


def _broken(entry_index, **change):
    rows = json.loads(json.dumps(FIXTURE))
    for key, value in change.items():
        if key.startswith("parent0_"):
            target, key = rows[entry_index]["parents"][0], key[len("parent0_"):]
        else:
            target = rows[entry_index]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
    return rows


@pytest.mark.parametrize("rows, message", [
    (_broken(2, Orphanetid=KeyError), r"entry 2: missing field 'Orphanetid'"),
    (_broken(1, Orphanetid="ORPHA-6"), r"entry 1: field 'Orphanetid'"),
    (_broken(3, name=7), r"entry 3: field 'name' should be str, got int"),
    (_broken(0, parents={"parent": "x"}), r"entry 0: field 'parents' should be list"),
    (_broken(0, parent0_parent_disease_count="2"),
     r"entry 0 parents\[0\]: field 'parent_disease_count' should be int, got str"),
    (_broken(0, parent0_parent_disease_count=True), r"parent_disease_count' should be int"),
    (_broken(5, parent0_parent=KeyError), r"entry 5 parents\[0\]: missing field 'parent'"),
    (_broken(4, type=KeyError), r"entry 4: missing field 'type'"),
    (FIXTURE + [FIXTURE[0]], r"entry 6: field 'Orphanetid': duplicate id 5"),
    (FIXTURE[:2] + ["not an object"], r"entry 2: should be an object"),
    ({"entries": FIXTURE}, r"should be a JSON array"),
])
def test_malformed_file_names_file_entry_and_field(tmp_path, rows, message):
    path = tmp_path / "bad_hypernyms.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=message) as err:
        load_hypernyms(path)
    assert "bad_hypernyms.json" in str(err.value)


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "truncated.json"
    path.write_text('[\n  {"Orphanetid": "5",\n')
    with pytest.raises(DataError, match=r"truncated.json: not valid JSON \(line 3"):
        load_hypernyms(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.json: cannot read"):
        load_hypernyms(tmp_path / "nowhere.json")


def test_rarearena_sets_follow_eval_updated(tmp_path):
    """eval_updated.py's lookups: the table's name for the id joins score 2 when it differs
    (ignoring case); score 1 is looked up by that name, last entry of a name wins, repeats
    kept; an unknown id falls back to the diagnosis as the name."""
    rows = FIXTURE + [{"Orphanetid": "11", "name": "Marfan syndrome", "type": "Disease",
                       "parents": [_parent("Fibrillinopathy", 3), _parent("Broad group", 40)]}]
    path = tmp_path / "orphanet_hypernym.json"
    path.write_text(json.dumps(rows))
    table = load_hypernyms(path)
    assert table.rarearena_sets("8", "Edge case disease") == (
        ("Edge case disease",), ("Group of exactly ten", "Group of exactly ten"))
    assert table.rarearena_sets("5", "LCHAD deficiency") == (
        ("LCHAD deficiency", "Long chain 3-hydroxyacyl-CoA dehydrogenase deficiency"),
        ("3-hydroxyacyl-CoA dehydrogenase deficiency", "Syndrome with hypoparathyroidism"))
    assert table.rarearena_sets("5", "long CHAIN 3-hydroxyacyl-CoA dehydrogenase deficiency")[0] \
        == ("long CHAIN 3-hydroxyacyl-CoA dehydrogenase deficiency",)
    # id 10 is named "Marfan syndrome", whose last entry (id 11) supplies the parents.
    assert table.rarearena_sets("10", "MFS") == (("MFS", "Marfan syndrome"), ("Fibrillinopathy",))
    assert table.rarearena_sets("99999", "3C syndrome") == (
        ("3C syndrome",), ("Genetic syndrome with a Dandy-Walker malformation",))
    assert table.rarearena_sets("99999", "3c syndrome") == (("3c syndrome",), ())
    assert table.rarearena_sets("", "Unknown") == (("Unknown",), ())
