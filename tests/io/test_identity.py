"""One model identity: the config-key rule, model_config.json, stop and pad ids, sources."""

import json
import shutil

import pytest

from helpers import FIXTURES
from jaxzero.errors import CheckpointError, JaxzeroError
from jaxzero.io import identity
from jaxzero.io.tokenizer import build_qwen25_tokenizer, encode_prompts
from jaxzero.model.config import PRESETS, Qwen2Config

RELEASE = json.loads((FIXTURES / "hub_configs" / "Qwen2.5-7B-Instruct" / "config.json")
                     .read_text())


def _read(**changes):
    hf = {k: v for k, v in dict(RELEASE, **changes).items() if v is not ...}
    return Qwen2Config.from_hf_dict(hf, source="x/config.json")


@pytest.mark.parametrize("changes", [
    {"_model_name_or_path": "Qwen/Qwen2.5-1.5B-Instruct-GGUF", "_name_or_path": "a/b",
     "_commit_hash": None},
    {"eos_token_id": [242, 240]},
    {"sliding_window": 4096, "use_sliding_window": False},
    {"use_mrope": False},
    {"layer_types": ["full_attention", "full_attention"]},
    {"torch_dtype": ..., "dtype": "bfloat16"},
    {"rope_theta": ..., "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    {"rope_scaling": None},
    {"temperature": 0.7, "top_p": 0.8, "do_sample": True, "max_length": 32768},
    {"pad_token_id": 240, "transformers_version": "5.0.0", "initializer_range": 0.01},
])
def test_metadata_and_generation_keys_are_ignored(changes):
    config = _read(**changes)
    hash(config)
    assert config.num_hidden_layers == 2 and config.hidden_size == 32
    if "rope_parameters" in changes:
        assert config.rope_theta == 5e5
    if "eos_token_id" in changes:
        assert config.eos_token_id == (242, 240)


@pytest.mark.parametrize("changes,named", [
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, "rope_scaling="),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling="),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0}},
     "rope_parameters="),
    ({"use_sliding_window": True}, "use_sliding_window=true"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types="),
    ({"hidden_act": "gelu"}, 'hidden_act="gelu"'),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config="),
    ({"use_mrope": True}, "use_mrope=true"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({"architectures": ["Qwen2ForSequenceClassification"]}, "architectures="),
    ({"num_experts": 8}, "num_experts=8"),
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"eos_token_id": "151645"}, "eos_token_id is '151645'"),
])
def test_keys_that_change_the_computation_are_refused_by_name_and_value(changes, named):
    with pytest.raises(CheckpointError, match="x/config.json: ") as err:
        _read(**changes)
    assert named in str(err.value)
    value = next(iter(changes.values()))
    if isinstance(value, dict):
        assert json.dumps(value) in str(err.value)


def test_model_config_json_has_one_writer_and_a_strict_reader(tmp_path):
    config = Qwen2Config.from_hf_dict(RELEASE)
    identity.write_model_config(tmp_path, config, "bfloat16")
    assert identity.read_model_config(tmp_path) == (config, "bfloat16")
    assert json.loads((tmp_path / "model_config.json").read_text())["eos_token_id"] == [242]
    assert [p.name for p in tmp_path.iterdir()] == ["model_config.json"]  # no temp file left
    fields = json.loads((tmp_path / "model_config.json").read_text())
    # Written before eos ids were tuples: an int still reads, as a tuple.
    (tmp_path / "model_config.json").write_text(json.dumps(dict(fields, eos_token_id=242)))
    assert identity.read_model_config(tmp_path)[0] == config
    (tmp_path / "model_config.json").write_text(json.dumps(dict(fields, rope="yarn")))
    with pytest.raises(CheckpointError, match=r"model_config.json: unknown fields \['rope'\]"):
        identity.read_model_config(tmp_path)
    (tmp_path / "model_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="model_config.json: not valid JSON"):
        identity.read_model_config(tmp_path)


@pytest.fixture(scope="module")
def real_vocab_dir(tmp_path_factory):
    """An HF dir of the Qwen2.5-7B-Instruct layout at the real vocabulary: config files and
    the Qwen2.5 tokenizer, no weights (an identity reads none)."""
    path = tmp_path_factory.mktemp("instruct")
    real = {k: (151645 if v == 242 else 151643 if v == 240 else v)
            for k, v in RELEASE.items()}
    (path / "config.json").write_text(json.dumps(dict(real, vocab_size=152064)))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
         "do_sample": True, "top_k": 20}))
    build_qwen25_tokenizer(path)
    return path


def test_stop_ids_are_the_sorted_union_of_config_generation_config_and_tokenizer(
        real_vocab_dir, tmp_path):
    found = identity.identify(real_vocab_dir)
    assert found.source.kind == "hf" and found.config.eos_token_id == (151645,)
    assert found.stop_ids == (151643, 151645)
    assert found.pad_id == 151643  # the tokenizer's <|endoftext|>
    assert found.encode(["Fever?"], chat=True) == encode_prompts(found.tokenizer, ["Fever?"],
                                                                  chat=True)
    # An extra eos id in generation_config.json joins the union.
    other = tmp_path / "other"
    shutil.copytree(real_vocab_dir, other)
    (other / "generation_config.json").write_text('{"eos_token_id": [151645, 151664]}')
    assert identity.identify(other).stop_ids == (151643, 151645, 151664)
    (other / "generation_config.json").write_text('{"eos_token_id": [999999]}')
    with pytest.raises(CheckpointError, match=r"stop ids \[999999\] are outside"):
        identity.identify(other)


def test_a_tokenizer_override_is_read_instead_of_the_dirs(real_vocab_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(real_vocab_dir / name, bare / name)
    with pytest.raises(JaxzeroError, match="missing tokenizer.json"):
        identity.identify(bare)
    assert identity.identify(bare, tokenizer=real_vocab_dir).stop_ids == (151643, 151645)


def test_architecture_of_a_hub_id_needs_no_download(tmp_path, monkeypatch, real_vocab_dir):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert identity.architecture("Qwen/Qwen2.5-3B-Instruct") == PRESETS["qwen2.5-3b"]
    with pytest.raises(CheckpointError, match="not a known Qwen2.5 hub id"):
        identity.architecture("someone/llama-7b")
    # A cached config.json beats the preset.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copyfile(real_vocab_dir / "config.json", repo / "snapshots" / commit / "config.json")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert identity.architecture("Qwen/Qwen2.5-7B-Instruct").hidden_size == 32


def test_the_demo_architecture_is_the_real_vocabulary():
    from jaxzero.config.schema import ModelConfig
    config = identity.run_architecture(ModelConfig(demo=True))
    assert config.vocab_size == 151936 and config.tie_word_embeddings
    assert config.eos_token_id == (151645,) and config.bos_token_id == 151643
