"""`jaxzero generate` and `jaxzero eval` end to end on a tiny random HF model with the real
Qwen2.5 tokenizer, the local judge included."""

import contextlib
import io
import json
import shutil
import time

import pytest
import torch
from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM

from helpers import FIXTURES, judge_server
from jaxzero.cli.main import main
from jaxzero.io.tokenizer import demo_tokenizer_dir, load_tokenizer

HYPERNYMS = [
    {"Orphanetid": "35687", "name": "Erdheim-Chester disease", "type": "Disease",
     "parents": [{"parent": "Non-Langerhans cell histiocytosis", "parent_child_count": 6,
                  "parent_disease_count": 8},
                 {"parent": "Rare histiocytic disease", "parent_child_count": 40,
                  "parent_disease_count": 60}]},
    {"Orphanetid": "324", "name": "Fabry disease", "type": "Disease",
     "parents": [{"parent": "Sphingolipidosis", "parent_child_count": 9,
                  "parent_disease_count": 9}]},
]


RAREARENA = FIXTURES / "rarearena"


def _run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _cli(*args):
    code, out, err = _run(*args)
    assert code == 0, (out + err)[-3000:]
    return out


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_hf")
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=151936, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                   tie_word_embeddings=True, eos_token_id=151645, bos_token_id=151643)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    load_tokenizer(demo_tokenizer_dir()).save_pretrained(out)
    return out


def test_generate_json_lines(tiny_hf):
    out = _cli("generate", str(tiny_hf), "--prompt", "Fever and a rash.", "--prompt",
               "Kayser-Fleischer rings.", "--chat", "--n", "2", "--max-new-tokens", "6",
               "--temperature", "1.0", "--top-k", "50", "--json", "--dtype", "float32")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == \
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:
        assert set(r) == {"prompt_index", "sample_index", "text", "token_ids", "logprobs",
                          "finish_reason"}
        assert len(r["token_ids"]) == len(r["logprobs"]) <= 6
        assert r["finish_reason"] in ("stop", "length")
        assert all(lp <= 0 for lp in r["logprobs"])


def test_eval_with_local_judge_and_hypernyms(tiny_hf, tmp_path):
    data = tmp_path / "data"
    _cli("prepare-data", str(FIXTURES / "rdc_sample.jsonl"), str(data), "--tokenizer",
         str(tiny_hf), "--train-ratio", "0.5")
    hypernyms = tmp_path / "orphanet_hypernym.json"
    hypernyms.write_text(json.dumps(HYPERNYMS))
    out = tmp_path / "eval"
    args = ["eval", str(tiny_hf), "--data", str(data / "test.jsonl"), "--limit", "3",
            "--max-new-tokens", "8", "--batch-size", "2", "--judge", "local",
            "--judge-model", str(tiny_hf), "--judge-max-new-tokens", "8",
            "--judge-protocol", "jaxzero", "--hypernyms", str(hypernyms), "--out", str(out),
            "--dtype", "float32"]
    _cli(*args)
    report = json.loads((out / "report.json").read_text())
    assert report["version"] == 2 and len(report["rows"]) == 1
    row = report["rows"][0]
    assert row["n"] == 3 and row["judge"] == f"local:{tiny_hf}"
    assert row["judge_protocol"].startswith("jaxzero:")
    assert row["judged"] + row["unparsed"] == 3
    assert "| " in (out / "report.md").read_text()


def test_local_judge_runs_through_the_sampler(tiny_hf, tmp_path):
    """The local judge generates with jaxzero's sampler; a random model's replies cannot be
    parsed, so each verdict is an explicit "unparsed", cached, asked again on a re-run unless
    --keep-unparsed."""
    from argparse import Namespace

    from jaxzero.cli.eval import _make_judge
    from jaxzero.diagnosis.protocols import JudgeItem, jaxzero_protocol
    args = Namespace(judge="local", judge_model=str(tiny_hf), judge_url=None,
                     judge_api_key_env="OPENAI_API_KEY", dtype="float32", batch_size=2,
                     judge_max_new_tokens=8, keep_unparsed=True)
    items = [JudgeItem.make(("fabry disease",), ["Fabry disease"], ["Sphingolipidosis"]),
             JudgeItem.make(("wilson disease",), ["Wilson disease"], ())]
    verdicts = _make_judge(args, tmp_path, jaxzero_protocol()).judge_many(items)
    assert [v.status for v in verdicts] == ["unparsed", "unparsed"]
    cached = (tmp_path / "judge_cache.jsonl").read_text().splitlines()
    assert len(cached) == 2
    again = _make_judge(args, tmp_path, jaxzero_protocol()).judge_many(items)
    assert [v.reply for v in again] == [v.reply for v in verdicts]
    assert (tmp_path / "judge_cache.jsonl").read_text().splitlines() == cached
    args.keep_unparsed = False
    _make_judge(args, tmp_path, jaxzero_protocol()).judge_many(items)
    assert len((tmp_path / "judge_cache.jsonl").read_text().splitlines()) == 4


@pytest.fixture(scope="module")
def test_file(tiny_hf, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    _cli("prepare-data", str(FIXTURES / "rdc_sample.jsonl"), str(data), "--tokenizer",
         str(tiny_hf), "--train-ratio", "0.5")
    return data / "test.jsonl"


def _last_line_error(err: str) -> str:
    """The command's error: one line, the last (progress bars of loading may precede it)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert sum("error" in line for line in lines) == 1, err
    assert lines[-1].startswith("jaxzero eval: error: "), err
    return lines[-1]


def test_hung_judge_fails_in_one_line_and_a_rerun_only_judges(tiny_hf, test_file, tmp_path,
                                                               monkeypatch):
    from jaxzero.io.loaded import LoadedModel
    out = tmp_path / "eval"
    # A random model writes no answer block, and the judge would get nothing to grade.
    canned = ["<think>x</think><answer>Fabry disease</answer>",
              "<think>y</think><answer>Erdheim-Chester Disease</answer>"]
    monkeypatch.setattr(LoadedModel, "greedy_texts", lambda self, ids, **k: (
        [canned[i % 2] for i in range(len(ids))], [5] * len(ids)))
    with judge_server() as server:
        args = ["eval", str(tiny_hf), "--data", str(test_file), "--limit", "3",
                "--max-new-tokens", "8", "--batch-size", "2", "--judge", "openai",
                "--judge-url", server.base_url, "--judge-model", "gpt-4o",
                "--rarearena-dir", str(RAREARENA), "--out", str(out), "--dtype", "float32"]
        server.hang_s = 20.0
        start = time.monotonic()
        code, _, err = _run(*args, "--judge-timeout", "0.3", "--judge-retries", "1")
        judging = time.monotonic() - start
        assert code == 2
        assert "gave up after 2 attempts (timeout 0.3 s each, 1 retries" in _last_line_error(err)
        assert judging < 20   # model loading included; the judge gave up within ~1.5 s
        [kept] = (out / "generations").glob("*.jsonl")
        assert kept.name.startswith(tiny_hf.name)
        assert [json.loads(x)["response"] for x in kept.read_text().splitlines()] == canned[:2] \
            + canned[:1]

        def no_generation(*a, **k):
            raise AssertionError("generated again")
        monkeypatch.setattr(LoadedModel, "greedy_texts", no_generation)
        server.hang_s, server.requests = 0.0, []
        _cli(*args)
        body = server.requests[0]["body"]
        assert (body["temperature"], body["max_tokens"]) == (0.1, 4096)
        assert "[fixture prompt" in body["messages"][0]["content"]
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["judge_protocol"].startswith("rarearena:") and row["n"] == 3
    assert row["top1"] is not None and row["judged"] + row["unparsed"] == 3


def test_raw_rarearena_file_says_to_prepare_it(tiny_hf, tmp_path):
    code, _, err = _run("eval", str(tiny_hf), "--data", str(FIXTURES / "rdc_sample.jsonl"),
                        "--out", str(tmp_path))
    line = _last_line_error(err)
    assert code == 2 and "jaxzero prepare-data" in line and "raw RareArena file" in line


def test_judge_protocol_needs_its_checkout(tiny_hf, test_file, tmp_path):
    code, _, err = _run("eval", str(tiny_hf), "--data", str(test_file), "--judge", "openai",
                        "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "gpt-4o",
                        "--out", str(tmp_path))
    assert code == 2 and "--rarearena-dir" in _last_line_error(err)


def test_run_dir_uses_its_reward_and_names_a_corrupted_checkpoint(tiny_hf, test_file,
                                                                  tmp_path):
    from jaxzero.config.files import save_config
    from jaxzero.config.schema import DataConfig, ModelConfig, RewardConfig, RunConfig
    run = tmp_path / "run"
    _cli("convert", "hf-to-jax", str(tiny_hf), str(run), "--dtype", "float32")
    shutil.copytree(run / "checkpoints" / "0", run / "checkpoints" / "7")
    for f in (run / "checkpoints" / "7").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 3)   # every file of step 7 torn
    save_config(RunConfig(model=ModelConfig(path=str(tiny_hf)),
                          data=DataConfig(train_file=str(test_file)),
                          reward=RewardConfig(mode="flexible", matcher="difflib")),
                run / "config.yaml")
    out = tmp_path / "eval"
    code, stdout, err = _run("eval", str(run), "--data", str(test_file), "--limit", "2",
                             "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out),
                             "--dtype", "float32")
    assert code == 0, err
    assert err.count("skipping") == 1 and f"{run}@7: cannot load it" in err
    report = json.loads((out / "report.json").read_text())
    [row] = report["rows"]
    assert row["step"] == 0
    assert (row["reward"]["mode"], row["reward"]["matcher"]) == ("flexible", "difflib")
    assert row["judge"] == "matching-rule(difflib>0.8)"
    assert [s["checkpoint"] for s in report["skipped"]] == [f"{run}@7"]
    assert f"{run}@7" in (out / "report.md").read_text()
    # Flags override the run's settings.
    from argparse import Namespace

    from jaxzero.cli.eval import _reward_config
    cfg, source = _reward_config(str(run), Namespace(reward_mode=None, matcher="rapidfuzz"))
    assert (cfg.mode, cfg.matcher) == ("flexible", "rapidfuzz")
    assert source == f"{run / 'config.yaml'} with matcher=rapidfuzz"
    cfg, source = _reward_config(str(tiny_hf), Namespace(reward_mode=None, matcher=None))
    assert (cfg, source) == (RewardConfig(), "defaults")
