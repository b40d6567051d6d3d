"""`jaxzero generate` and `jaxzero eval` end to end on a tiny random HF model with the real
Qwen2.5 tokenizer, the local judge included."""

import contextlib
import io
import json

import pytest
import torch
from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM

from helpers import FIXTURES
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


def _cli(*args):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(list(args))
    assert code == 0, buffer.getvalue()[-3000:]
    return buffer.getvalue()


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
            "--hypernyms", str(hypernyms), "--out", str(out),
            "--dtype", "float32"]
    _cli(*args)
    report = json.loads((out / "report.json").read_text())
    assert report["version"] == 1 and len(report["rows"]) == 1
    row = report["rows"][0]
    assert row["n"] == 3 and row["judge"] == f"local:{tiny_hf}"
    assert row["judged"] + row["unparsed"] == 3
    assert "| " in (out / "report.md").read_text()


def test_local_judge_runs_through_the_sampler(tiny_hf, tmp_path):
    """The local judge generates with jaxzero's sampler; a random model's replies cannot be
    parsed, so each verdict is an explicit "unparsed", cached, and free on a re-run."""
    from argparse import Namespace

    from jaxzero.config.schema import RewardConfig
    from jaxzero.cli.eval import _make_judge
    from jaxzero.diagnosis.judge import JudgeItem
    args = Namespace(judge="local", judge_model=str(tiny_hf), judge_url=None,
                     judge_api_key_env="OPENAI_API_KEY", dtype="float32", batch_size=2,
                     judge_max_new_tokens=8)
    items = [JudgeItem.make(("fabry disease",), ["Fabry disease"], ["Sphingolipidosis"]),
             JudgeItem.make(("wilson disease",), ["Wilson disease"], ())]
    verdicts = _make_judge(args, tmp_path, RewardConfig()).judge_many(items)
    assert [v.status for v in verdicts] == ["unparsed", "unparsed"]
    cached = (tmp_path / "judge_cache.jsonl").read_text().splitlines()
    assert len(cached) == 2
    again = _make_judge(args, tmp_path, RewardConfig()).judge_many(items)
    assert [v.reply for v in again] == [v.reply for v in verdicts]
    assert (tmp_path / "judge_cache.jsonl").read_text().splitlines() == cached
