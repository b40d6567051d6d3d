"""RareArena reading, validation, prompt, split, prepare_data and read_prepared."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers import FIXTURES
from jaxzero.diagnosis import rarearena
from jaxzero.io.tokenizer import chat_text
from jaxzero.errors import ConfigError, DataError

RDC = FIXTURES / "rdc_sample.jsonl"
RDS = FIXTURES / "rds_sample.jsonl"

# The prompt, verbatim.
DIAGNOSIS_PROMPT = (
    "You are a medical assistant designed to assist users in providing medical diagnoses. "
    "When the user shares a case report, your task is to analyze the information, reason "
    "through the details, and deliver an accurate diagnosis.\n"
    "Based on the following case report, provide a diagnosis. Explain your reasoning process "
    "in the <think> </think> tags, and return the final diagnosis in the <answer> </answer> "
    "tags. For example, <answer> Migraine </answer>.\n"
    "The case report is: {case_text}.")

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer with a Qwen-like chat template (default system message)."""
    text = RDC.read_text() + RDS.read_text() + DIAGNOSIS_PROMPT + SYSTEM
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", text)))
    specials = ["[UNK]", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                   additional_special_tokens=specials[1:],
                                   chat_template=CHAT_TEMPLATE)


def _records(path=RDC):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- reading

def test_reads_rdc_json_lines():
    cases, stats = rarearena.read_records(RDC)
    raw = _records()
    assert stats.records == len(cases) == len(raw) == 12 and stats.bad_records == 0
    for case, record in zip(cases, raw):
        assert case.case_text == f"{record['case_report']} {record['test_results']}".strip()
        assert case.id == record["_id"] and case.diagnosis == record["diagnosis"]
    assert [c.line for c in cases] == list(range(1, 13))
    assert cases[3].orpha_id == "160"  # an integer Orpha_id is kept as its string


def test_labels_are_diagnosis_then_orpha_name_without_duplicates():
    cases = {c.diagnosis: c for c in rarearena.read_records(RDC)[0]}
    assert cases["Fabry disease"].labels == ["Fabry disease"]
    assert cases["Unicentric Castleman disease"].labels == ["Unicentric Castleman disease",
                                                            "Castleman disease"]
    assert cases["Kikuchi-Fujimoto disease"].labels == ["Kikuchi-Fujimoto disease",
                                                        "Histiocytic necrotizing lymphadenitis"]
    case = rarearena.Case("1", "x", "Takayasu arteritis ", "takayasu Arteritis", "3287", 1)
    assert case.labels == ["Takayasu arteritis"]


def test_reads_rds_without_test_results():
    cases, _ = rarearena.read_records(RDS)
    assert [c.case_text for c in cases] == [r["case_report"].strip() for r in _records(RDS)]


def test_reads_a_json_array_with_record_lines(tmp_path):
    records = _records()[:4]
    path = tmp_path / "rdc_array.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    cases, _ = rarearena.read_records(path)
    from_jsonl = rarearena.read_records(RDC)[0][:4]
    assert [dataclasses.replace(c, line=0) for c in cases] == \
        [dataclasses.replace(c, line=0) for c in from_jsonl]
    lines = path.read_text().splitlines()
    assert [lines[c.line - 1].strip() for c in cases] == ["{"] * 4
    assert all(f'"_id": "{c.id}"' in lines[c.line] for c in cases)
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ] \n")
    assert rarearena.read_records(empty)[0] == []


def _bad_file(tmp_path, bad_line, name="RDC.json"):
    """Four good records, a bad one as line 3, then two more good ones."""
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in _records()[:6]]
    lines.insert(2, bad_line if isinstance(bad_line, bytes) else bad_line.encode())
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _with(**changes):
    record = dict(_records()[4])
    for key, value in changes.items():
        if value is ...:
            del record[key]
        else:
            record[key] = value
    return json.dumps(record, ensure_ascii=False)


BAD_LINES = {
    "malformed": ('{"_id": "PMC1", "case_report": "Fever and rash", ', r"malformed JSON"),
    "not_object": ('["Fabry disease"]', r"expected a JSON object"),
    "missing_diagnosis": (_with(diagnosis=...), r"field 'diagnosis' is missing"),
    "missing_case_report": (_with(case_report=...), r"field 'case_report' is missing"),
    "missing_id": (_with(_id=...), r"field '_id' is missing"),
    "missing_orpha_name": (_with(Orpha_name=...), r"field 'Orpha_name' is missing"),
    "missing_orpha_id": (_with(Orpha_id=...), r"field 'Orpha_id' is missing"),
    "empty_diagnosis": (_with(diagnosis=""), r"field 'diagnosis' is empty"),
    "blank_diagnosis": (_with(diagnosis="  \n"), r"field 'diagnosis' is empty"),
    "empty_case": (_with(case_report=" "), r"field 'case_report' is empty"),
    "null_diagnosis": (_with(diagnosis=None), r"field 'diagnosis' should be a string"),
    "numeric_report": (_with(case_report=42), r"field 'case_report' should be a string"),
    "bool_orpha_id": (_with(Orpha_id=True), r"field 'Orpha_id' should be a string or"),
    "list_results": (_with(test_results=["CSF protein 1.8"]), r"field 'test_results'"),
    "surrogate": (_with(diagnosis="Guillain-Barr\ud800 syndrome").replace(
        "\ud800", "\\ud800"), r"field 'diagnosis' holds an unpaired surrogate"),
    "latin1_in_field": (_with(diagnosis="Guillain-Barr\u00e9 syndrome").encode().replace(
        "\u00e9".encode(), b"\xe9"), r"field 'diagnosis' is not UTF-8 text \(byte 0xE9"),
    "latin1_outside": (b"\xff" + _with().encode(), r"is not UTF-8 text \(byte 0xFF at column 1"),
}


@pytest.mark.parametrize("kind", BAD_LINES)
def test_bad_record_stops_with_file_line_and_field(tmp_path, kind):
    bad_line, message = BAD_LINES[kind]
    path = _bad_file(tmp_path, bad_line)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: .*{message}") as err:
        rarearena.read_records(path)
    assert "--skip-bad-records" in str(err.value)


@pytest.mark.parametrize("kind", BAD_LINES)
def test_bad_record_is_skipped_and_counted(tmp_path, kind):
    bad_line, message = BAD_LINES[kind]
    path = _bad_file(tmp_path, bad_line)
    cases, stats = rarearena.read_records(path, skip_bad_records=True)
    assert stats.records == len(cases) == 6 and stats.bad_records == 1
    assert re.search(message, stats.bad_messages[0]) and ":3: " in stats.bad_messages[0]
    assert [c.line for c in cases] == [1, 2, 4, 5, 6, 7]


def test_nothing_is_dropped_silently(tmp_path):
    lines = [json.dumps(r) for r in _records()]
    lines[2], lines[7] = "{oops", _with(diagnosis="")
    path = tmp_path / "RDC.json"
    path.write_text("\n".join(lines[:5]) + "\n\n   \n" + "\n".join(lines[5:]))
    cases, stats = rarearena.read_records(path, skip_bad_records=True)
    assert stats.records + stats.bad_records == len(lines) == 12
    assert stats.bad_records == 2 and [m.split(": ")[0][-2:] for m in stats.bad_messages] == \
        [":3", "10"]


def test_array_syntax_errors_stop_even_when_skipping(tmp_path):
    good = json.dumps(_records()[:2], indent=1)
    for text, message in [(good[:-3] + ",, ]", "malformed JSON"),
                          (good.replace("},", "}"), "expected ','"),
                          (good + "\n[]", "text after the closing"),
                          ]:
        path = tmp_path / "RDS.json"
        path.write_text(text)
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:\d+: {message}"):
            rarearena.read_records(path, skip_bad_records=True)
    path.write_bytes(good.encode().replace(b'"_id"', b'\xff"_id"', 1))
    with pytest.raises(DataError, match=r":3: not UTF-8 \(byte 0xFF\)"):
        rarearena.read_records(path, skip_bad_records=True)


def test_array_elements_are_validated_by_line(tmp_path):
    records = _records()[:3]
    records[1]["diagnosis"] = ""
    path = tmp_path / "RDC_array.json"
    path.write_text(json.dumps(records, indent=1))
    start_line = 2 + json.dumps(records[0], indent=1).count("\n") + 1
    with pytest.raises(DataError, match=rf":{start_line}: field 'diagnosis' is empty"):
        rarearena.read_records(path)
    assert rarearena.read_records(path, skip_bad_records=True)[1].bad_records == 1


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        rarearena.read_records(tmp_path / "RDC.json")


# ----------------------------------------------------------------------------- prompt, split

def test_default_template_is_the_seed_prompt_verbatim():
    assert rarearena.load_prompt_template() == DIAGNOSIS_PROMPT
    case = "A 31-year-old man with burning pain {in} his hands; α-Gal A 0.4 nmol/h/mL"
    assert rarearena.build_prompt_text(case, DIAGNOSIS_PROMPT) == \
        DIAGNOSIS_PROMPT.format(case_text=case)


def test_template_from_a_file_needs_one_placeholder(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("Diagnose this case: {case_text}\n")
    assert rarearena.load_prompt_template(path) == "Diagnose this case: {case_text}"
    path.write_text("Diagnose this case.")
    with pytest.raises(ConfigError, match="exactly once"):
        rarearena.load_prompt_template(path)


def test_split_is_the_first_share_in_file_order():
    cases, _ = rarearena.read_records(RDC)
    train, test = rarearena.split_cases(cases, 0.7)
    assert len(train) == int(12 * 0.7) == 8 and train + test == cases
    train, test = rarearena.split_cases(cases, 0.5)
    assert train == cases[:6] and test == cases[6:]
    assert rarearena.split_cases(cases, 1.0) == (cases, [])
    with pytest.raises(ConfigError):
        rarearena.split_cases(cases, 1.5)


def test_seeded_shuffle_split_is_deterministic():
    cases, _ = rarearena.read_records(RDC)
    train_a, test_a = rarearena.split_cases(cases, 0.7, shuffle_seed=3)
    train_b, test_b = rarearena.split_cases(cases, 0.7, shuffle_seed=3)
    assert train_a == train_b and test_a == test_b
    assert train_a != cases[:8] and sorted(c.id for c in train_a + test_a) == \
        sorted(c.id for c in cases)
    assert rarearena.split_cases(cases, 0.7, shuffle_seed=4)[0] != train_a


# ----------------------------------------------------------------------------- prepare_data

def _read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_prepare_without_tokenizer(tmp_path):
    stats = rarearena.prepare_data(RDC, tmp_path / "out")
    train, test = _read(tmp_path / "out/train.jsonl"), _read(tmp_path / "out/test.jsonl")
    raw = _records()
    assert (stats.records_read, stats.train_size, stats.test_size) == (12, 8, 4)
    assert [r["id"] for r in train + test] == [r["_id"] for r in raw]
    castleman = train[3]
    assert castleman == {
        "id": "PMC8830017_03",
        "case_text": f"{raw[3]['case_report']} {raw[3]['test_results']}",
        "prompt": DIAGNOSIS_PROMPT.replace("{case_text}",
                                           f"{raw[3]['case_report']} {raw[3]['test_results']}"),
        "labels": ["Unicentric Castleman disease", "Castleman disease"],
        "orpha_id": "160", "diagnosis": "Unicentric Castleman disease"}
    saved = json.loads((tmp_path / "out/prepare_stats.json").read_text())
    assert saved["train_size"] == 8 and saved["settings"]["train_ratio"] == 0.7
    text = stats.format()
    assert "read 12 records" in text and "0 bad" in text and "not tokenized" in text
    assert "train: 8 records" in text and "test: 4 records" in text
    assert rarearena.read_prepared(tmp_path / "out/train.jsonl") == train


def test_prepare_with_tokenizer_applies_the_chat_template(tmp_path, tokenizer):
    stats = rarearena.prepare_data(RDC, tmp_path, tokenizer=tokenizer, max_prompt_length=4096)
    rows = rarearena.read_prepared(tmp_path / "train.jsonl")
    assert stats.dropped_too_long == stats.truncated == 0 and len(rows) == 8
    for row in rows:
        assert row["prompt_text"] == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>"
                                      f"user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n")
        assert row["prompt_token_ids"] == tokenizer.encode(row["prompt_text"],
                                                           add_special_tokens=False)
    assert stats.longest_prompt == max(len(r["prompt_token_ids"]) for r in
                                       rows + rarearena.read_prepared(tmp_path / "test.jsonl"))


def _lengths(tokenizer):
    cases, _ = rarearena.read_records(RDC)
    template = rarearena.load_prompt_template()
    return [len(tokenizer.encode(chat_text(
        tokenizer, rarearena.build_prompt_text(c.case_text, template)),
        add_special_tokens=False)) for c in cases]


def test_long_prompts_are_dropped_and_counted_after_the_split(tmp_path, tokenizer):
    lengths = _lengths(tokenizer)
    limit = sorted(lengths)[6]
    stats = rarearena.prepare_data(RDC, tmp_path, tokenizer=tokenizer, max_prompt_length=limit)
    over = [n > limit for n in lengths]
    assert stats.dropped_too_long == sum(over) > 0 and stats.truncated == 0
    assert stats.train_size == 8 - sum(over[:8]) and stats.test_size == 4 - sum(over[8:])
    kept = [r["id"] for r in _read(tmp_path / "train.jsonl") + _read(tmp_path / "test.jsonl")]
    assert kept == [c.id for c, o in zip(rarearena.read_records(RDC)[0], over) if not o]
    assert f"{sum(over)} dropped" in stats.format()


def test_long_prompts_can_be_truncated_from_the_left(tmp_path, tokenizer):
    lengths = _lengths(tokenizer)
    limit = sorted(lengths)[3]
    stats = rarearena.prepare_data(RDC, tmp_path, tokenizer=tokenizer, max_prompt_length=limit,
                                   long_prompt_policy="truncate_left")
    rows = _read(tmp_path / "train.jsonl") + _read(tmp_path / "test.jsonl")
    assert len(rows) == 12 and stats.dropped_too_long == 0
    assert stats.truncated == sum(n > limit for n in lengths) > 0
    for row, n in zip(rows, lengths):
        assert len(row["prompt_token_ids"]) <= limit
        shown = row["prompt"].split("The case report is: ")[1][:-1]
        if n > limit:
            assert row["case_text"].endswith(shown) and len(shown) < len(row["case_text"])
            assert len(row["prompt_token_ids"]) >= limit - 3  # cut no more than needed
        else:
            assert shown == row["case_text"]


def test_a_template_longer_than_the_limit_is_a_config_error(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="template alone"):
        rarearena.prepare_data(RDC, tmp_path, tokenizer=tokenizer, max_prompt_length=40,
                               long_prompt_policy="truncate_left")
    with pytest.raises(ConfigError, match="long_prompt_policy"):
        rarearena.prepare_data(RDC, tmp_path, long_prompt_policy="truncate_right")


def test_prepare_counts_skipped_records_and_shuffles_on_request(tmp_path):
    path = _bad_file(tmp_path, _with(diagnosis=""))
    with pytest.raises(DataError, match=":3: field 'diagnosis' is empty"):
        rarearena.prepare_data(path, tmp_path / "out")
    stats = rarearena.prepare_data(path, tmp_path / "out", skip_bad_records=True,
                                   train_ratio=0.5, shuffle_seed=0)
    assert (stats.records_read, stats.bad_records, stats.train_size, stats.test_size) == \
        (6, 1, 3, 3)
    assert "1 bad" in stats.format() and ":3: field 'diagnosis' is empty" in stats.format()
    empty = tmp_path / "RDS.json"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no valid records"):
        rarearena.prepare_data(empty, tmp_path / "out", force=True)


def test_a_file_concatenated_with_itself_is_deduplicated_and_counted(tmp_path):
    path = tmp_path / "RDC.json"
    path.write_text(RDC.read_text() * 2, encoding="utf-8")
    cases, read = rarearena.read_records(path)
    assert [c.id for c in cases] == [r["_id"] for r in _records()]
    assert [c.line for c in cases] == list(range(1, 13))
    assert read.duplicates == 12 and read.records == 12
    assert read.duplicate_messages[0] == f"{path}:13: repeats line 1 (_id 'PMC7751203_01')"
    assert len(read.duplicate_messages) == rarearena.MAX_REPORTED
    stats = rarearena.prepare_data(path, tmp_path / "out")
    train = {r["id"] for r in _read(tmp_path / "out/train.jsonl")}
    test = {r["id"] for r in _read(tmp_path / "out/test.jsonl")}
    assert (stats.train_size, stats.test_size, stats.duplicates) == (8, 4, 12)
    assert not train & test  # no test case is also a training case
    text = stats.format()
    assert "read 24 records" in text and "12 valid, 0 bad, 12 duplicates" in text
    assert "dropped duplicate records (first 10):" in text and ":13: repeats line 1" in text
    saved = json.loads((tmp_path / "out/prepare_stats.json").read_text())
    assert saved["duplicates"] == 12


def test_an_id_reused_with_other_content_is_refused_naming_both_lines(tmp_path):
    records = _records()[:5]
    other = dict(records[1], diagnosis="Anderson-Fabry disease")
    path = _write_jsonl(tmp_path / "RDC.json", records + [other])
    for skip in (False, True):  # skipping cannot choose between the two versions
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:6: _id "
                           rf"'{re.escape(records[1]['_id'])}' is also the id of line 2, "
                           r"whose record differs \(in 'diagnosis'\)"):
            rarearena.read_records(path, skip_bad_records=skip)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError):
        rarearena.prepare_data(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_directory_is_refused_unless_forced(tmp_path):
    out = tmp_path / "out"
    rarearena.prepare_data(RDC, out, train_ratio=0.5)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=rf"output directory {re.escape(str(out))} is not "
                       r"empty \(it holds prepare_stats.json, test.jsonl, train.jsonl\); "
                       r"pass --force"):
        rarearena.prepare_data(RDC, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    stats = rarearena.prepare_data(RDC, out, force=True)
    assert stats.train_size == 8 and len(_read(out / "train.jsonl")) == 8
    (tmp_path / "empty").mkdir()
    rarearena.prepare_data(RDC, tmp_path / "empty")  # an empty directory is fine


def test_an_output_path_that_is_a_file_is_one_line(tmp_path):
    target = tmp_path / "out"
    target.write_text("my notes\n")
    for force in (False, True):
        with pytest.raises(DataError, match=rf"^output directory {re.escape(str(target))} "
                           "exists and is not a directory$"):
            rarearena.prepare_data(RDC, target, force=force)
    assert target.read_text() == "my notes\n"


def test_cli_output_and_tokenizer_faults_are_one_line_and_create_nothing(tmp_path, capsys):
    from jaxzero.cli.main import main
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["prepare-data", str(RDC), str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not a directory" in err
    (tmp_path / "no_tokenizer").mkdir()
    out = tmp_path / "out"
    assert main(["prepare-data", str(RDC), str(out), "--tokenizer",
                 str(tmp_path / "no_tokenizer")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable tokenizer" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["prepare-data", str(RDC), str(out)]) == 0
    assert main(["prepare-data", str(RDC), str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["prepare-data", str(RDC), str(out), "--force"]) == 0


def test_the_trainer_drops_long_untokenized_prompts_instead_of_keeping_their_end(
        tmp_path, tokenizer):
    """Prepared without --tokenizer, then tokenized at start-up: a prompt over the limit is
    dropped and counted (as DiagnosisZero's filter drops it), never cut to its last tokens."""
    from jaxzero.diagnosis.task import with_token_ids as _with_token_ids
    rarearena.prepare_data(RDC, tmp_path)
    lengths = _lengths(tokenizer)[:8]
    limit = sorted(lengths)[4]
    rows, dropped = rarearena.with_prompt_ids(rarearena.read_prepared(tmp_path / "train.jsonl"),
                                              tokenizer, limit)
    assert dropped == sum(n > limit for n in lengths) > 0 and len(rows) == 8 - dropped
    assert [r["id"] for r in rows] == [r["id"] for r, n in zip(
        _read(tmp_path / "train.jsonl"), lengths) if n <= limit]
    for row in rows:  # whole prompts, system header first
        text = chat_text(tokenizer, row["prompt"])
        assert row["prompt_token_ids"] == tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(row["prompt_token_ids"][:2]).startswith("<|im_start|>")
    assert [r["id"] for r in _with_token_ids(tmp_path / "train.jsonl", tokenizer, limit)] == \
        [r["id"] for r in rows]
    with pytest.raises(DataError, match=r"train.jsonl: every prompt is over max_prompt_length"):
        rarearena.with_prompt_ids(rarearena.read_prepared(tmp_path / "train.jsonl"), tokenizer,
                                  5, source=tmp_path / "train.jsonl")


# ----------------------------------------------------------------------------- read_prepared

@pytest.mark.parametrize("change,message", [
    (lambda r: r.pop("labels"), "field 'labels' is missing"),
    (lambda r: r.update(labels=[]), "field 'labels' should be a non-empty list"),
    (lambda r: r.update(labels="Fabry disease"), "field 'labels' should be a list"),
    (lambda r: r.update(prompt=" "), "field 'prompt' is empty"),
    (lambda r: r.update(prompt_token_ids=[1, -2]), "field 'prompt_token_ids'"),
    (lambda r: r.update(prompt_token_ids=[1, True]), "field 'prompt_token_ids'"),
    (lambda r: r.pop("prompt_text"), "field 'prompt_text' is missing"),
    (lambda r: r.update(orpha_id=324), "field 'orpha_id' should be a str"),
])
def test_read_prepared_names_file_line_and_field(tmp_path, tokenizer, change, message):
    rarearena.prepare_data(RDC, tmp_path, tokenizer=tokenizer, max_prompt_length=4096)
    rows = _read(tmp_path / "train.jsonl")
    change(rows[4])
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:5: {re.escape(message)}"):
        rarearena.read_prepared(path)


def test_read_prepared_reports_malformed_and_non_utf8_lines(tmp_path):
    rarearena.prepare_data(RDC, tmp_path)
    path = tmp_path / "test.jsonl"
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:2] + [lines[2][:-5]] + lines[3:]))
    with pytest.raises(DataError, match=r"test.jsonl:3: malformed JSON"):
        rarearena.read_prepared(path)
    lines[1] = lines[1].replace(b"angioedema", b"angio\xe4dema")
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"test.jsonl:2: not UTF-8"):
        rarearena.read_prepared(path)
