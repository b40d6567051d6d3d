"""HF safetensors import/export: bit-exact round trips, transformers reloads, shards, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from helpers import FAKE_TOKENIZER, assert_same_tensors, hf_tensors, make_hf_model, save_hf
from jaxzero.io import hf as hf_io
from jaxzero.errors import CheckpointError
from jaxzero.model.qwen2 import abstract_model
from jaxzero.model.config import Qwen2Config

@pytest.fixture(scope="module")
def untied_model():
    return make_hf_model(tie=False)


# ---------------------------------------------------------------- the table


@pytest.mark.parametrize("tie", [False, True])
def test_table_covers_the_model_exactly(tie):
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=12, tie_word_embeddings=tie)
    _, abstract = abstract_model(config)
    flat = {p: tuple(x.shape) for p, x in hf_io.flatten_pure(nnx.to_pure_dict(abstract)).items()}
    table = hf_io.tensor_table(config)
    assert hf_io.param_shapes(table, config) == flat
    layers = [t.layer for t in table if t.path == ("layers", "attn", "q_DNH")]
    assert layers == [0, 1, 2]  # one HF tensor per layer of the stacked parameter
    assert len({t.hf_name for t in table}) == len(table)
    assert sum(t.size for t in table) == config.num_params()
    x = np.arange(12 * 4 * 32).reshape(48, 32)  # q_proj [N*H, D]
    q = next(t for t in table if t.hf_name.endswith("q_proj.weight"))
    np.testing.assert_array_equal(q.to_ours(x)[:, 1, :], x[12:24].T)
    np.testing.assert_array_equal(q.to_hf(q.to_ours(x)), x)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype,torch_dtype", [("float32", torch.float32),
                                               ("bfloat16", torch.bfloat16)])
def test_round_trip_is_bit_exact(tmp_path, dtype, torch_dtype):
    src = save_hf(make_hf_model(tie=False), tmp_path / "hf", dtype=torch_dtype)
    config, state = hf_io.load_hf_checkpoint(src, param_dtype=dtype)
    leaves = jax.tree.leaves(state)
    assert all(x.dtype == jnp.dtype(dtype) for x in leaves)
    summary = hf_io.export_hf(state, config, tmp_path / "out", dtype=dtype, tokenizer_src=src)
    assert summary.weight_files == ("model.safetensors",) and summary.num_tensors == 27
    assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "out"))
    for name, text in FAKE_TOKENIZER.items():
        assert (tmp_path / "out" / name).read_text() == text


def test_tied_round_trip_writes_no_lm_head(tmp_path):
    src = save_hf(make_hf_model(tie=True), tmp_path / "hf")
    config, state = hf_io.load_hf_checkpoint(src, param_dtype="float32")
    assert config.tie_word_embeddings and "lm_head_VD" not in nnx.to_pure_dict(state)
    hf_io.export_hf(state, config, tmp_path / "out", dtype="float32")
    assert "lm_head.weight" not in hf_tensors(tmp_path / "out")
    assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "out"))


def test_tied_checkpoint_with_an_equal_lm_head_loads(tmp_path):
    src = save_hf(make_hf_model(tie=True), tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    hf_io.load_hf_checkpoint(src, param_dtype="float32")
    tensors["lm_head.weight"][3, 1] += 1.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        hf_io.load_hf_checkpoint(src, param_dtype="float32")


def test_transformers_loads_the_export_and_agrees(tmp_path, untied_model):
    src = save_hf(untied_model, tmp_path / "hf")
    config, state = hf_io.load_hf_checkpoint(src, param_dtype="float32")
    out = tmp_path / "out"
    hf_io.export_hf(state, config, out, dtype="float32", max_shard_bytes=20_000)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 27
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    tokens = np.array([[5, 17, 3, 90, 41, 8, 8, 2]])
    graphdef, _ = abstract_model(config)
    ours, _ = nnx.merge(graphdef, state)(jnp.asarray(tokens))
    with torch.no_grad():
        theirs = reloaded(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 94, "pad_token_id": 94, "eos_token_id": [95, 94]}


def test_hf_sharded_checkpoint_loads(tmp_path, untied_model):
    single = save_hf(untied_model, tmp_path / "single")
    sharded = save_hf(untied_model, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    _, a = hf_io.load_hf_checkpoint(single, param_dtype="float32")
    _, b = hf_io.load_hf_checkpoint(sharded, param_dtype="float32")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_reads_the_source_generation_config(tmp_path, untied_model):
    src = save_hf(untied_model, tmp_path / "hf")
    (src / "generation_config.json").write_text('{"eos_token_id": [1, 2], "top_p": 0.8}')
    config, state = hf_io.load_hf_checkpoint(src, param_dtype="float32")
    hf_io.export_hf(state, config, tmp_path / "out",
                    generation_config=src / "generation_config.json")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["top_p"] == 0.8


def test_export_refuses_a_non_empty_dir_and_replaces_it_only_when_asked(tmp_path,
                                                                        untied_model):
    src = save_hf(untied_model, tmp_path / "hf")
    config, state = hf_io.load_hf_checkpoint(src, param_dtype="float32")
    out = tmp_path / "out"
    hf_io.export_hf(state, config, out, dtype="float32", max_shard_bytes=20_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="exists and is not empty.*--force"):
        hf_io.export_hf(state, config, out, dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    hf_io.export_hf(state, config, out, dtype="bfloat16", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no staging left


def test_a_crash_mid_export_leaves_the_old_files(tmp_path, untied_model, monkeypatch):
    src = save_hf(untied_model, tmp_path / "hf")
    config, state = hf_io.load_hf_checkpoint(src, param_dtype="float32")
    out = tmp_path / "out"
    hf_io.export_hf(state, config, out, dtype="float32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def crash(self, name, x):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(hf_io._SafetensorsWriter, "write", crash)
    with pytest.raises(OSError, match="No space left"):
        hf_io.export_hf(state, config, out, dtype="bfloat16", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    hf_io.export_hf(state, config, out, dtype="bfloat16", overwrite=True)  # the leftover goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]
    assert hf_tensors(out)["model.norm.weight"].dtype == np.dtype(jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------- shardings


def test_loads_onto_shardings_and_exports_from_them(tmp_path, untied_model):
    src = save_hf(untied_model, tmp_path / "hf")
    config, host = hf_io.load_hf_checkpoint(src, param_dtype="float32")
    mesh = jax.make_mesh((8,), ("fsdp",))
    _, abstract = abstract_model(config)
    specs = {"embed_VD": P("fsdp", None), "lm_head_VD": P(None, "fsdp")}
    shardings = nnx.to_pure_dict(abstract)
    shardings = jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, specs.get(path[-1].key, P())), shardings)
    _, state = hf_io.load_hf_checkpoint(src, param_dtype="float32", shardings=shardings)
    pure, host_pure = nnx.to_pure_dict(state), nnx.to_pure_dict(host)
    assert pure["embed_VD"].sharding == NamedSharding(mesh, P("fsdp", None))
    assert len(pure["embed_VD"].addressable_shards) == 8
    assert pure["embed_VD"].addressable_shards[0].data.shape == (12, 32)
    assert pure["lm_head_VD"].sharding.spec == P(None, "fsdp")
    assert pure["norm_D"].sharding.is_fully_replicated
    for x, y in zip(jax.tree.leaves(pure), jax.tree.leaves(host_pure), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    hf_io.export_hf(state, config, tmp_path / "out", dtype="float32")
    assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "out"))


def test_shardings_must_match_the_parameters(tmp_path, untied_model):
    src = save_hf(untied_model, tmp_path / "hf")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match="missing layers.attn.k_DKH, .* and 4 more$"):
        hf_io.load_hf_checkpoint(src, param_dtype="float32", shardings={"embed_VD": device})


# ---------------------------------------------------------------- errors


@pytest.fixture
def hf_dir(tmp_path, untied_model):
    return save_hf(untied_model, tmp_path / "hf")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_wrong_architecture(hf_dir):
    _edit_config(hf_dir, model_type="llama")
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        hf_io.load_hf_checkpoint(hf_dir, param_dtype="float32")


def test_sliding_window_is_refused(hf_dir):
    _edit_config(hf_dir, use_sliding_window=True, sliding_window=16)
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        hf_io.load_hf_checkpoint(hf_dir, param_dtype="float32")


def test_missing_shard(tmp_path, untied_model):
    src = save_hf(untied_model, tmp_path / "hf", max_shard_size="20KB")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing from .*{victim.name}"):
        hf_io.load_hf_checkpoint(src, param_dtype="float32")


def test_shape_mismatch(hf_dir):
    name = "model.layers.1.mlp.up_proj.weight"
    _edit_tensors(hf_dir, lambda t: t.update({name: t[name][:40]}))
    with pytest.raises(CheckpointError,
                       match=rf"{name} has shape \[40, 32\], expected \[48, 32\]"):
        hf_io.load_hf_checkpoint(hf_dir, param_dtype="float32")


def test_missing_key(hf_dir):
    _edit_tensors(hf_dir, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError,
                       match=r"missing tensors: model.layers.0.self_attn.k_proj.bias$"):
        hf_io.load_hf_checkpoint(hf_dir, param_dtype="float32")


def test_unexpected_key(hf_dir):
    _edit_tensors(hf_dir, lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    with pytest.raises(CheckpointError,
                       match="unexpected tensors: model.layers.0.self_attn.rotary_emb.inv_freq"):
        hf_io.load_hf_checkpoint(hf_dir, param_dtype="float32")


def test_pickled_weights_are_refused(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin; jaxzero reads only safetensors"):
        hf_io.load_hf_checkpoint(hf_dir, param_dtype="float32")


def test_no_weights_at_all(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf_io.load_hf_checkpoint(hf_dir, param_dtype="float32")


def test_index_naming_an_absent_tensor(tmp_path, untied_model):
    src = save_hf(untied_model, tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = sorted(src.glob("model-*.safetensors"))[0].name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="do not contain: model.norm.weight"):
        hf_io.load_hf_checkpoint(src, param_dtype="float32")


def test_export_checks_the_state_against_the_config(tmp_path, hf_dir):
    config, state = hf_io.load_hf_checkpoint(hf_dir, param_dtype="float32")
    wider = Qwen2Config.from_dict(dict(config.to_dict(), intermediate_size=64))
    with pytest.raises(CheckpointError, match="gate_DF has shape"):
        hf_io.export_hf(state, wider, tmp_path / "out")
    tied = Qwen2Config.from_dict(dict(config.to_dict(), tie_word_embeddings=True))
    with pytest.raises(CheckpointError, match="unexpected lm_head_VD"):
        hf_io.export_hf(state, tied, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        hf_io.export_hf(state, config, tmp_path / "out", tokenizer_src=tmp_path)


# ---------------------------------------------------------------- damaged files: one line each


@pytest.mark.parametrize("damage", ["empty", "100 bytes", "truncated"])
def test_a_damaged_safetensors_file_is_one_error_naming_it(tmp_path, untied_model, damage):
    src = save_hf(untied_model, tmp_path / "hf")
    file = src / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"empty": b"", "100 bytes": data[:100],
                      "truncated": data[: len(data) // 2]}[damage])
    with pytest.raises(CheckpointError) as err:
        hf_io.load_hf_checkpoint(src, param_dtype="float32")
    message = str(err.value)
    assert f"{file}: not a readable safetensors file" in message and "\n" not in message


def test_a_malformed_config_json_is_one_error_naming_it(tmp_path, untied_model):
    src = save_hf(untied_model, tmp_path / "hf")
    (src / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 96,')
    with pytest.raises(CheckpointError, match=rf"{src / 'config.json'}: not valid JSON "
                                              r"\(Expecting property name .* line 1"):
        hf_io.load_hf_checkpoint(src, param_dtype="float32")
    (src / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object, found list"):
        hf_io.load_hf_checkpoint(src, param_dtype="float32")


@pytest.mark.parametrize("layers,held", [(3, r"2 \(model.layers.0 .. model.layers.1\)"),
                                         (1, r"2 \(model.layers.0 .. model.layers.1\)")])
def test_num_hidden_layers_that_disagrees_with_the_weights_is_named(tmp_path, untied_model,
                                                                     layers, held):
    src = save_hf(untied_model, tmp_path / "hf")
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(hf, num_hidden_layers=layers)))
    with pytest.raises(CheckpointError, match=rf"config.json: num_hidden_layers is {layers}, "
                                              rf"but the weights hold layers {held}"):
        hf_io.load_hf_checkpoint(src, param_dtype="float32")


def test_progress_bars_stay_off_a_pipe(tmp_path, untied_model, capfd):
    src = save_hf(untied_model, tmp_path / "hf")
    capfd.readouterr()
    config, state = hf_io.load_hf_checkpoint(src, param_dtype="float32")  # stderr: a pipe
    hf_io.export_hf(state, config, tmp_path / "out", dtype="float32")
    err = capfd.readouterr().err
    assert "reading hf" not in err and "writing out" not in err
