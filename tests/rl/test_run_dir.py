"""The run directory: same-run comparison, what --overwrite deletes, the lock, the identity
written only by a setup that succeeds, the data fingerprint, token ids, restarts."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from helpers import REPO
from jaxzero.config.files import load_config
from jaxzero.config.schema import DataConfig, ModelConfig, RunConfig, TrainerConfig
from jaxzero.errors import CheckpointError, ConfigError, DataError, JaxzeroError
from jaxzero.rl import run_dir as rd

DEMO = REPO / "configs" / "demo.yaml"


def _record(i, ids=None):
    row = {"id": f"case-{i}", "case_text": f"patient {i}", "prompt": f"patient {i}",
           "labels": [f"disease {i}"], "orpha_id": str(i), "diagnosis": f"disease {i}"}
    if ids is not None:
        row.update(prompt_text=f"patient {i}", prompt_token_ids=ids)
    return json.dumps(row)


def _data(tmp_path, *lines, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(run_dir, model_path, train_file, **trainer):
    return RunConfig(model=ModelConfig(path=str(model_path)),
                     data=DataConfig(train_file=str(train_file)),
                     trainer=TrainerConfig(run_dir=str(run_dir), **trainer))


def _start(cfg, train_file, *, overwrite=False):
    """What a setup that succeeds does to its run directory."""
    claim = rd.open_run_dir(cfg, resume=False, overwrite=overwrite, main=True)
    claim.commit(cfg, claim.check_data({"train": train_file, "test": None}))
    claim.close()


@pytest.fixture
def committed(tmp_path):
    """A run directory holding a committed run, its model dir and its data file."""
    model = tmp_path / "model"
    model.mkdir()
    train = _data(tmp_path, _record(0), _record(1))
    cfg = _cfg(tmp_path / "R", model, train)
    _start(cfg, train)
    return cfg, tmp_path / "R", model, train


# ---------------------------------------------------------------- the same run (item 1)

def test_same_run_spelled_or_placed_differently_continues(committed, tmp_path, monkeypatch):
    cfg, run, model, train = committed
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, tmp_path / "moved")
    for run_dir, model_path, train_file in ((f"{run}/", model, train), ("./R", "model", train),
                                            ("R", "./model/", "train.jsonl"),
                                            ("moved", model, train)):
        again = _cfg(run_dir, model_path, train_file, max_steps=7, export_hf="hf")
        claim = rd.open_run_dir(again, resume=True, overwrite=False, main=True)
        assert not claim.is_fresh
        claim.close()


def test_another_config_is_refused_without_suggesting_overwrite(committed, tmp_path):
    cfg, run, model, train = committed
    other = RunConfig(model=cfg.model, data=cfg.data, trainer=cfg.trainer,
                      optim=type(cfg.optim)(lr=0.5))
    with pytest.raises(ConfigError) as info:
        rd.open_run_dir(other, resume=False, overwrite=False, main=True)
    text = str(info.value)
    assert "optim.lr: 3e-07 in the run, 0.5 now" in text and "--overwrite" not in text
    assert str(run / "config.yaml") in text
    elsewhere = tmp_path / "model2"
    elsewhere.mkdir()
    with pytest.raises(ConfigError, match=f"model.path: {model} in the run, {elsewhere} now"):
        rd.open_run_dir(_cfg(run, elsewhere, train), resume=False, overwrite=False, main=True)


# ---------------------------------------------------------------- what --overwrite deletes (item 2)

def test_overwrite_never_deletes_what_jaxzero_did_not_write(committed, tmp_path):
    cfg, run, model, train = committed
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "docker-compose.yaml").write_text("services: {}\n")
    (project / "config.yaml").write_text("mine: true\n")
    for overwrite in (True, False):
        with pytest.raises(ConfigError, match=r"is not a jaxzero run directory .* it holds "
                                              r"config\.yaml, docker-compose\.yaml, src\."):
            rd.open_run_dir(_cfg(project, model, train), resume=False, overwrite=overwrite,
                            main=True)
    assert sorted(os.listdir(project)) == ["config.yaml", "docker-compose.yaml", "src"]
    assert (project / "src" / "main.py").read_text() == "print('mine')\n"

    # A user's file inside a jaxzero run: refused by name, and nothing at all is deleted.
    (run / "checkpoints").mkdir()
    (run / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match=r"--overwrite: .* holds files jaxzero did not "
                                          r"write: notes\.txt; nothing was deleted"):
        rd.open_run_dir(cfg, resume=False, overwrite=True, main=True)
    assert {"notes.txt", "checkpoints", "config.yaml", "run.json"} <= set(os.listdir(run))


def test_overwrite_clears_a_jaxzero_run(committed):
    cfg, run, model, train = committed
    for name in ("checkpoints/4", "tb", "tokenizer", "hf"):
        (run / name).mkdir(parents=True)
    (run / "model_config.json").write_text("{}")
    (run / "model_config.json.tmp").write_text("{")   # an atomic write that was killed
    exporting = _cfg(run, model, train, export_hf=str(run / "hf"))   # as the demo does
    claim = rd.open_run_dir(exporting, resume=False, overwrite=True, main=True)
    assert claim.is_fresh
    assert sorted(os.listdir(run)) == [rd.MARKER, rd.LOCK]
    claim.close()


def test_an_empty_or_new_directory_becomes_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new/nested"):
        claim = rd.open_run_dir(_cfg(tmp_path / name, "m", "t"), resume=False,
                                overwrite=False, main=True)
        assert claim.is_fresh
        assert json.loads((tmp_path / name / rd.MARKER).read_text())["created_by"] == "jaxzero"
        claim.close()
    for name in ("empty", "typo"):
        with pytest.raises(CheckpointError, match="--resume: .* holds no run to resume"):
            rd.open_run_dir(_cfg(tmp_path / name, "m", "t"), resume=True, overwrite=False,
                            main=True)
    assert not (tmp_path / "typo").exists()


# ---------------------------------------------------------------- the lock (item 12)

HOLDER = textwrap.dedent("""
    import sys, time
    from jaxzero.config.schema import ModelConfig, RunConfig, TrainerConfig, DataConfig
    from jaxzero.rl.run_dir import open_run_dir
    cfg = RunConfig(model=ModelConfig(path="m"), data=DataConfig(train_file="t"),
                    trainer=TrainerConfig(run_dir=sys.argv[1]))
    claim = open_run_dir(cfg, resume=False, overwrite=False, main=True)
    print("locked", flush=True)
    time.sleep(120)
""")


def test_one_run_per_directory_and_a_killed_holder_does_not_block(tmp_path):
    run = tmp_path / "R"
    cfg = _cfg(run, "m", "t")
    first = rd.open_run_dir(cfg, resume=False, overwrite=False, main=True)
    with pytest.raises(JaxzeroError, match=f"is in use by another run \\(host "
                                           f"{socket.gethostname()} pid {os.getpid()}\\)"):
        rd.open_run_dir(cfg, resume=False, overwrite=False, main=True)
    first.close()

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(JaxzeroError, match=f"pid {holder.pid}\\)"):
            rd.open_run_dir(cfg, resume=False, overwrite=False, main=True)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert f"pid {holder.pid}" in (run / rd.LOCK).read_text()   # the stale lock file stays
    claim = rd.open_run_dir(cfg, resume=False, overwrite=False, main=True)
    assert (run / rd.LOCK).read_text() == f"host {socket.gethostname()} pid {os.getpid()}\n"
    claim.close()


# ---------------------------------------------------------------- data (items 7, 8)

def test_resume_on_reordered_data_is_refused(committed):
    cfg, run, model, train = committed
    lines = train.read_text().splitlines()
    train.write_text("\n".join(reversed(lines)) + "\n")   # same size, other order
    claim = rd.open_run_dir(cfg, resume=True, overwrite=False, main=True)
    with pytest.raises(DataError) as info:
        claim.check_data({"train": train, "test": None})
    text = str(info.value)
    assert f"holds a run started on other data: train file {train} (" in text
    assert text.count(f"{train.stat().st_size} bytes") == 2
    claim.close()
    test = _data(train.parent, _record(5), name="test.jsonl")
    claim = rd.open_run_dir(cfg, resume=True, overwrite=False, main=True)
    with pytest.raises(DataError, match=r"test file .*test\.jsonl .* now, \(none\) when"):
        claim.check_data({"train": train, "test": test})
    claim.close()


def test_token_ids_outside_the_vocabulary_name_file_line_and_id(tmp_path):
    path = _data(tmp_path, _record(0, [1, 2]), "", _record(1, [3, 96]))
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    rd.check_token_ids(records, path, vocab_size=97)
    with pytest.raises(DataError, match=rf"^{path}:3: prompt token id 96 is outside the "
                                        r"model's vocabulary \(ids 0 to 95\)"):
        rd.check_token_ids(records, path, vocab_size=96)


# ---------------------------------------------------------------- setup_run's hooks (items 7, 8, 14)

def _demo_cfg(run_dir, *extra):
    return load_config(DEMO, [f"trainer.run_dir={run_dir}", "trainer.export_hf=null",
                              "demo.warmup_steps=0", "model.demo_layers=1",
                              "model.demo_hidden=16", "model.demo_heads=2",
                              "model.demo_kv_heads=1", "model.demo_intermediate=32",
                              "data.prompts_per_step=2", "rollout.n=2",
                              "rollout.max_new_tokens=8", "trainer.eval_every=0",
                              "grpo.micro_batches=1", *extra])


def _setup(cfg, **kwargs):
    """setup_run with the diagnosis task: (engine, files, state)."""
    from jaxzero.diagnosis.task import make_task
    from jaxzero.rl.setup import setup_run
    return setup_run(cfg, make_task, log=kwargs.pop("log", lambda *_: None), **kwargs)


def _close(run):
    from jaxzero.rl.setup import close_run
    engine, files, _ = run
    close_run(engine, files)


def _save(run, step):
    from jaxzero.rl.setup import save_checkpoint
    _, files, state = run
    save_checkpoint(files, dataclasses.replace(state, step=step), log=lambda *_: None)


def test_a_failed_setup_leaves_nothing_that_blocks_the_corrected_command(tmp_path):
    train = _data(tmp_path, _record(0))
    typo = _cfg(tmp_path / "R", tmp_path / "no-such-model", train)
    with pytest.raises(CheckpointError, match="no-such-model"):
        _setup(typo, resume=False, overwrite=False)
    assert not (tmp_path / "R" / "config.yaml").exists()
    assert not (tmp_path / "R" / "run.json").exists()
    model = tmp_path / "model"
    model.mkdir()
    claim = rd.open_run_dir(_cfg(tmp_path / "R", model, train), resume=False,
                            overwrite=False, main=True)   # not refused, and not locked
    assert claim.is_fresh
    claim.close()


def test_setup_checks_token_ids_and_the_data_fingerprint(tmp_path):
    train = _data(tmp_path, _record(0, [5, 6]), _record(1, [7, 10 ** 6]))
    with pytest.raises(DataError, match=rf"{train}:2: prompt token id 1000000 is outside"):
        _setup(_demo_cfg(tmp_path / "A", f"data.train_file={train}"), resume=False,
               overwrite=False)
    train = _data(tmp_path, _record(0), _record(1))
    cfg = _demo_cfg(tmp_path / "B", f"data.train_file={train}")
    _start(cfg, train)
    train.write_text("\n".join(reversed(train.read_text().splitlines())) + "\n")
    with pytest.raises(DataError, match=f"train file {train}"):
        _setup(cfg, resume=False, overwrite=False)


# ---------------------------------------------------------------- restarts (items 10, 11)

def test_restart_before_the_first_checkpoint_and_past_a_damaged_one(tmp_path):
    cfg = _demo_cfg(tmp_path)
    _close(_setup(cfg, resume=False, overwrite=False))
    # As if killed before its first checkpoint: the reference exists, no checkpoint does.
    run = _setup(cfg, resume=False, overwrite=False)
    assert run[2].step == 0
    _save(run, 2)
    _save(run, 4)
    _close(run)

    meta = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:10])   # torn
    lines = []
    run = _setup(cfg, resume=True, overwrite=False, log=lines.append)
    assert run[2].step == 2
    assert lines[0].startswith(f"skipped checkpoint {tmp_path / 'checkpoints' / '4'}: "
                               "meta/metadata is not valid JSON (a torn write?): ")
    assert lines[0].endswith(f"; moved it to {tmp_path / 'checkpoints' / '4.damaged'}")
    assert f"resuming from {tmp_path / 'checkpoints'}/2 (step 2)" in lines
    _save(run, 4)   # the set-aside step can be saved again
    assert run[1].store.all_steps() == [2, 4]
    _close(run)


# ---------------------------------------------------------------- storage elsewhere

def test_a_remote_run_dir_resumes_on_a_new_machine_and_serves_eval(tmp_path, monkeypatch):
    """gs:// run directory (a stand-in bucket, `helpers.fake_bucket`): the run works in a
    local mirror and copies its identity and logs up, checkpoints and the reference go to the
    bucket; a second machine (an empty mirror) resumes from the bucket alone; eval and convert
    read the bucket's run by its URL."""
    import numpy as np
    from flax import nnx

    from helpers import fake_bucket
    from jaxzero.io import storage
    from jaxzero.io.model_dir import checkpoints_of, load_params

    bucket = fake_bucket(tmp_path / "gcs", monkeypatch)
    url = "gs://b/runs/demo"
    remote = bucket / "b" / "runs" / "demo"
    run = _setup(_demo_cfg(url, f"trainer.local_dir={tmp_path / 'machine-1'}"),
                 resume=False, overwrite=False)
    _save(run, 2)
    params_2 = nnx.to_pure_dict(run[2].params)
    _close(run)
    for name in (rd.MARKER, rd.CONFIG, rd.IDENTITY, "model_config.json", "tokenizer", "data",
                 "checkpoints.url", "reference"):
        assert (remote / name).exists(), name
    assert (remote / "checkpoints" / "2").is_dir()
    assert any((remote / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "machine-1" / "config.yaml").is_file()
    assert (tmp_path / "machine-1" / "checkpoints.url").read_text() == f"{url}/checkpoints\n"
    assert not (tmp_path / "machine-1" / "checkpoints").exists()

    # A mirror left by another run at this URL: the bucket's identity replaces it.
    (tmp_path / "machine-2").mkdir()
    (tmp_path / "machine-2" / rd.MARKER).write_text("{}\n")
    (tmp_path / "machine-2" / "config.yaml").write_text("model: {demo_layers: 7}\n")
    lines = []
    run = _setup(_demo_cfg(url, f"trainer.local_dir={tmp_path / 'machine-2'}"), resume=True,
                 overwrite=False, log=lines.append)
    assert run[2].step == 2 and f"resuming from {remote / 'checkpoints'}/2 (step 2)" in lines
    _close(run)
    assert (tmp_path / "machine-2" / "run.json").read_text() == \
        (remote / "run.json").read_text()

    monkeypatch.setattr(storage, "MIRRORS", tmp_path / "eval-machine")
    assert checkpoints_of(url) == [(url, 2)]
    _, params = load_params(url, param_dtype="float32")
    for got, want in zip(jax.tree.leaves(nnx.to_pure_dict(params)), jax.tree.leaves(params_2)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    (remote / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"--overwrite: {url} holds files jaxzero did not "
                                          "write: notes.txt; nothing was deleted"):
        rd.open_run_dir(_demo_cfg(url, f"trainer.local_dir={tmp_path / 'machine-2'}"),
                        resume=False, overwrite=True, main=True)
    assert (remote / "checkpoints" / "2").is_dir()
    (remote / "notes.txt").unlink()
    claim = rd.open_run_dir(_demo_cfg(url, f"trainer.local_dir={tmp_path / 'machine-2'}"),
                            resume=False, overwrite=True, main=True)
    claim.close()
    assert sorted(p.name for p in remote.iterdir()) == [rd.MARKER]


def test_a_remote_run_dir_needs_its_filesystem_package(committed, monkeypatch):
    _, _, model, train = committed
    import importlib
    fsspec_registry = importlib.import_module("fsspec.registry")  # the module, not fsspec.registry
    monkeypatch.delitem(fsspec_registry._registry, "gs", raising=False)
    with pytest.raises(ConfigError, match=r"gs://bucket/r: reading and writing gs:// needs "
                                          r"the gcsfs package; pip install gcsfs"):
        rd.open_run_dir(_cfg("gs://bucket/r", model, train), resume=False, overwrite=False,
                        main=True)


def test_eval_finds_checkpoints_kept_outside_the_run_dir(tmp_path):
    """trainer.checkpoint_dir elsewhere: the run dir names them, so eval, generate and
    convert given the run dir read them."""
    from jaxzero.io.model_dir import checkpoints_of, load_params
    outside = tmp_path / "elsewhere"
    run = _setup(_demo_cfg(tmp_path / "R", f"trainer.checkpoint_dir={outside}"),
                 resume=False, overwrite=False)
    _save(run, 3)
    _close(run)
    assert (outside / "3").is_dir() and not (tmp_path / "R" / "checkpoints").exists()
    assert checkpoints_of(tmp_path / "R") == [(str(tmp_path / "R"), 3)]
    load_params(tmp_path / "R", param_dtype="float32")


def test_overwrite_refuses_checkpoints_kept_outside_the_run_dir(committed, tmp_path):
    _, run, model, train = committed
    outside = tmp_path / "elsewhere"
    cfg = _cfg(run, model, train, checkpoint_dir=str(outside))
    claim = rd.open_run_dir(cfg, resume=False, overwrite=True, main=True)  # none there yet
    claim.close()
    (outside / "2").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"--overwrite: trainer.checkpoint_dir={outside} "
                                          "holds checkpoints, which --overwrite does not "
                                          "delete"):
        rd.open_run_dir(cfg, resume=False, overwrite=True, main=True)
    assert (outside / "2").is_dir()
