"""The jaxzero model directory: conversion both ways, params-only restores, sources, errors."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxzero.io import hf as hf_io
from jaxzero.io import model_dir as model_store
from jaxzero.io.identity import read_model_config
from jaxzero.io.checkpoint import CheckpointStore
from jaxzero.errors import CheckpointError, JaxzeroError
from jaxzero.parallel.sharding import make_mesh, param_shardings
from helpers import FAKE_TOKENIZER, assert_same_tensors, hf_tensors, make_hf_model, save_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = save_hf(make_hf_model(tie=False), tmp_path_factory.mktemp("hf") / "hf")
    (path / "generation_config.json").write_text('{"eos_token_id": [95, 94], "top_k": 20}')
    return path


@pytest.fixture(scope="module")
def jz_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("jz") / "model"
    model_store.convert_hf_to_jax(hf_dir, out, dtype="float32")
    return out


def leaves_equal(a, b):
    fa = hf_io.flatten_pure(hf_io.pure_params(a))
    fb = hf_io.flatten_pure(hf_io.pure_params(b))
    assert sorted(fa, key=str) == sorted(fb, key=str)
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), str(path))


def test_converted_dir_layout(jz_dir, hf_dir):
    assert model_store.is_jaxzero_dir(jz_dir) and not model_store.is_jaxzero_dir(hf_dir)
    config, dtype = read_model_config(jz_dir)
    assert dtype == "float32" and config.hidden_size == 32 and not config.tie_word_embeddings
    for name, text in FAKE_TOKENIZER.items():
        assert (jz_dir / "tokenizer" / name).read_text() == text
    assert json.loads((jz_dir / "generation_config.json").read_text())["top_k"] == 20
    assert CheckpointStore(jz_dir / "checkpoints").all_steps() == [0]


def test_load_params_equals_the_hf_import_with_layers_stacked(jz_dir, hf_dir):
    config, state = model_store.load_params(jz_dir, param_dtype="float32")
    _, direct = hf_io.load_hf_checkpoint(hf_dir, param_dtype="float32")
    assert isinstance(state, nnx.State)
    assert nnx.to_pure_dict(state)["layers"]["attn"]["q_DNH"].shape[0] == 2
    leaves_equal(state, direct)


@pytest.mark.parametrize("dtype,torch_dtype", [("float32", torch.float32),
                                               ("bfloat16", torch.bfloat16)])
def test_hf_to_jaxzero_to_hf_is_bit_exact(tmp_path, dtype, torch_dtype):
    src = save_hf(make_hf_model(tie=True, seed=3), tmp_path / "hf", dtype=torch_dtype)
    model_store.convert_hf_to_jax(src, tmp_path / "jz", dtype=dtype)
    summary = model_store.convert_jax_to_hf(tmp_path / "jz", tmp_path / "out", dtype=dtype)
    assert summary.dtype == dtype
    assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "out"))
    for name, text in FAKE_TOKENIZER.items():
        assert (tmp_path / "out" / name).read_text() == text


def test_load_params_casts_to_the_requested_dtype(jz_dir):
    _, f32 = model_store.load_params(jz_dir, param_dtype="float32")
    _, bf16 = model_store.load_params(jz_dir, param_dtype="bfloat16")
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32)
    leaves_equal(bf16, cast)


def test_load_params_onto_shardings(jz_dir):
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    model = model_store.load_model(jz_dir, param_dtype="float32", compute_dtype="float32",
                                   shardings_fn=lambda s: param_shardings(s, mesh))
    q = model.layers.attn.q_DNH[...]
    assert q.sharding.spec[:2] == (None, "fsdp") and len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (2, 4, 4, 8)
    _, host = model_store.load_params(jz_dir, param_dtype="float32")
    leaves_equal(nnx.state(model, nnx.Param), host)


def _fake_run_dir(jz_dir, tmp_path):
    """A trainer-like run dir: same layout, steps 1 and 2 with an optimizer state too."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model_config.json", "generation_config.json"):
        (run / name).write_bytes((jz_dir / name).read_bytes())
    config, state = model_store.load_params(jz_dir, param_dtype="float32")
    params = nnx.to_pure_dict(state)
    store = CheckpointStore(run / "checkpoints")
    for step in (1, 2):
        bumped = jax.tree.map(lambda x, s=step: x + s, params)
        store.save(step, {"params": bumped, "opt_state": jax.tree.map(jnp.zeros_like, params)},
                   {"step": step, "model_config": config.to_dict()})
    store.wait()
    store.close()
    return run, params


def test_run_dir_restores_only_params_of_the_chosen_step(jz_dir, tmp_path, capsys):
    run, params = _fake_run_dir(jz_dir, tmp_path)
    _, latest = model_store.load_params(run, param_dtype="float32")
    leaves_equal(latest, jax.tree.map(lambda x: x + 2, params))
    _, first = model_store.load_params(run, step=1, param_dtype="float32")
    leaves_equal(first, jax.tree.map(lambda x: x + 1, params))
    with pytest.raises(CheckpointError, match="no checkpoint for step 7.*steps 1, 2"):
        model_store.load_params(run, step=7, param_dtype="float32")
    model_store.convert_jax_to_hf(run, tmp_path / "out", step=1, dtype="float32")
    assert "has no tokenizer/" in capsys.readouterr().out
    exported = hf_tensors(tmp_path / "out")
    np.testing.assert_array_equal(exported["model.norm.weight"], np.asarray(params["norm_D"]) + 1)
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # the run had no tokenizer files


def test_load_model_from_hf_dir_jaxzero_dir_and_hub_cache(jz_dir, hf_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--qwen"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / commit).symlink_to(hf_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    models = [model_store.load_model(src, param_dtype="bfloat16", compute_dtype="float32")
              for src in (hf_dir, jz_dir, "tiny/qwen")]
    assert all(m.options.compute_dtype == jnp.float32 for m in models)
    leaves_equal(nnx.state(models[0], nnx.Param), nnx.state(models[1], nnx.Param))
    leaves_equal(nnx.state(models[0], nnx.Param), nnx.state(models[2], nnx.Param))
    assert models[0].embed_VD[...].dtype == jnp.bfloat16


def test_unknown_hub_id_says_how_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="hf download Qwen/Qwen2.5-0.5B-Instruct"):
        model_store.load_params("Qwen/Qwen2.5-0.5B-Instruct", param_dtype="bfloat16")
    with pytest.raises(CheckpointError, match="no such model directory"):
        model_store.load_params(tmp_path / "nowhere" / "at" / "all", param_dtype="bfloat16")


def test_errors_name_the_problem(jz_dir, hf_dir, tmp_path):
    with pytest.raises(CheckpointError, match="already holds a jaxzero model"):
        model_store.convert_hf_to_jax(hf_dir, jz_dir)
    with pytest.raises(CheckpointError, match="is one checkpoint step; pass the model directory"):
        model_store.load_params(jz_dir / "checkpoints" / "0", param_dtype="float32")
    with pytest.raises(CheckpointError, match="it has no steps"):
        model_store.load_params(hf_dir, step=1, param_dtype="float32")
    with pytest.raises(CheckpointError, match="an HF model dir, not a jaxzero one"):
        model_store.convert_jax_to_hf(hf_dir, tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((jz_dir / "model_config.json").read_text())
    (other / "model_config.json").write_text(json.dumps(dict(cfg, intermediate_size=64)))
    (other / "checkpoints").symlink_to(jz_dir / "checkpoints")
    with pytest.raises(CheckpointError, match="model_config differs"):
        model_store.load_params(other, param_dtype="float32")
    (other / "model_config.json").write_text(json.dumps(dict(cfg, rope="yarn")))
    with pytest.raises(CheckpointError, match=r"unknown fields \['rope'\]"):
        model_store.load_params(other, param_dtype="float32")


def test_an_interrupted_hf_to_jax_leaves_nothing_and_can_be_run_again(hf_dir, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "jz"

    def crash(*_, **__):
        raise KeyboardInterrupt  # as a Ctrl-C during the checkpoint write
    monkeypatch.setattr(CheckpointStore, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        model_store.convert_hf_to_jax(hf_dir, out, dtype="float32")
    assert not out.exists()  # nothing half-written under the name, no torn tokenizer.json
    monkeypatch.undo()
    model_store.convert_hf_to_jax(hf_dir, out, dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jz"]  # the leftover is gone
    for name, text in FAKE_TOKENIZER.items():
        assert (out / "tokenizer" / name).read_text() == text
    leaves_equal(model_store.load_params(out, param_dtype="float32")[1],
                 hf_io.load_hf_checkpoint(hf_dir, param_dtype="float32")[1])


def test_hf_to_jax_refuses_a_source_without_tokenizer_files(tmp_path):
    src = save_hf(make_hf_model(), tmp_path / "hf", tokenizer=False)
    with pytest.raises(JaxzeroError, match="missing tokenizer.json .* and tokenizer_config"):
        model_store.convert_hf_to_jax(src, tmp_path / "jz")
    assert not (tmp_path / "jz").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="full exists and is not empty"):
        model_store.convert_hf_to_jax(save_hf(make_hf_model(), tmp_path / "hf2"),
                                      tmp_path / "full")
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def _cli(*argv):
    code = "import sys; from jaxzero.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True,
                          text=True, timeout=120)


def test_jax_to_hf_refuses_an_existing_model_dir_unless_forced(jz_dir, hf_dir, tmp_path):
    target = tmp_path / "existing"
    target.mkdir()
    for p in hf_dir.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    proc = _cli("convert", "jax-to-hf", jz_dir, target)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "exists and is not empty" in proc.stderr and "--force" in proc.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    proc = _cli("convert", "jax-to-hf", jz_dir, target, "--force", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_tensors(hf_tensors(hf_dir), hf_tensors(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_cli_converts_both_ways(hf_dir, tmp_path):
    code = ("import sys; from jaxzero.cli.main import main; a, b, c = sys.argv[1:]; "
            "sys.exit(main(['convert', 'hf-to-jax', a, b]) or "
            "main(['convert', 'jax-to-hf', b, c, '--dtype', 'float32']))")
    proc = subprocess.run([sys.executable, "-c", code, str(hf_dir), str(tmp_path / "jz"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"-> {tmp_path / 'jz'}: model_config.json" in proc.stdout
    assert "wrote 27 tensors" in proc.stdout
    assert read_model_config(tmp_path / "jz")[1] == "bfloat16"
    exported = hf_tensors(tmp_path / "out")
    source = hf_tensors(hf_dir)
    np.testing.assert_array_equal(  # float32 -> bfloat16 -> float32
        exported["model.norm.weight"],
        source["model.norm.weight"].astype(jnp.bfloat16).astype(np.float32))


_TWO_PROCESS_WORKER = """
import os, sys
pid, port, src, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
os.environ.update(JAXZERO_COORDINATOR=f"127.0.0.1:{port}", JAXZERO_NUM_PROCESSES="2",
                  JAXZERO_PROCESS_ID=str(pid))
from jaxzero.parallel import distributed
distributed.initialize()
from jaxzero.io import hf as hf_io
from jaxzero.io import model_dir as model_store
from jaxzero.model.qwen2 import abstract_model
from jaxzero.model.config import Qwen2Config
from jaxzero.parallel.sharding import make_mesh, param_shardings
shardings = param_shardings(abstract_model(Qwen2Config.from_hf_dir(src))[1], make_mesh(1, -1, 1))
config, state = hf_io.load_hf_checkpoint(src, param_dtype="float32", shardings=shardings)
assert not state["embed_VD"].value.is_fully_addressable
hf_io.export_hf(state, config, out + "/hf", dtype="float32", max_shard_bytes=20_000)
model_store.save_converted(out + "/jz", state, config, src)
_, state = model_store.load_params(out + "/jz", param_dtype="float32", shardings=shardings)
hf_io.export_hf(state, config, out + "/hf2", dtype="float32")
"""


@pytest.mark.slow
def test_two_processes_import_save_restore_and_export(hf_dir, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_WORKER, str(i), port,
                               str(hf_dir), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    for out in ("hf", "hf2"):
        assert_same_tensors(hf_tensors(hf_dir), hf_tensors(tmp_path / out))
