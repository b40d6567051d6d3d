"""The command line: one-line errors for wrong keys, types, files and meshes; plan; plot."""

import pytest

from helpers import REPO
from jaxzero.cli.main import build_parser, main

DEMO = "configs/demo.yaml"


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def test_unknown_key_names_the_closest(capsys, tmp_path):
    err = _error(capsys, ["train", DEMO, "rollout.temprature=0.5",
                          f"trainer.run_dir={tmp_path}"])
    assert "rollout.temprature" in err and "rollout.temperature" in err


def test_wrong_type_names_key_and_type(capsys, tmp_path):
    err = _error(capsys, ["train", DEMO, "rollout.n=many", f"trainer.run_dir={tmp_path}"])
    assert "rollout.n" in err and "int" in err and "many" in err


def test_missing_config_file(capsys):
    err = _error(capsys, ["train", "configs/nope.yaml"])
    assert "configs/nope.yaml" in err


def test_missing_data_file(capsys, tmp_path):
    err = _error(capsys, ["prepare-data", str(tmp_path / "RDC.json"), str(tmp_path / "out")])
    assert "RDC.json" in err


def test_missing_dependency_is_one_line(capsys, monkeypatch):
    import jaxzero.diagnosis.rarearena

    def missing(*_, **__):
        raise ImportError("apply_chat_template requires jinja2 to be installed")
    monkeypatch.setattr(jaxzero.diagnosis.rarearena, "prepare_data", missing)
    err = _error(capsys, ["prepare-data", "in.json", "out"])
    assert "a dependency is missing" in err and "jinja2" in err and "pip install" in err


def test_mesh_that_does_not_match_the_devices(capsys, tmp_path):
    err = _error(capsys, ["train", DEMO, "mesh.data=3", "mesh.fsdp=1",
                          f"trainer.run_dir={tmp_path}"])
    assert "3 devices, but 8 devices exist" in err
    assert not (tmp_path / "config.yaml").exists()
    err = _error(capsys, ["plan", DEMO, "--mesh", "data=2,fsdp=2,tensor=1"])
    assert "4 devices, but 8 devices exist" in err


def test_plan_targets_are_refused_in_one_line(capsys):
    assert "expected e.g. tpu:v5e:4x4" in _error(capsys, ["plan", DEMO, "--target", "v5e"])
    assert "not both" in _error(capsys, ["plan", DEMO, "--target", "cpu:8", "--devices", "8"])
    err = _error(capsys, ["plan", DEMO, "--target", "tpu:v5p:2x2x1", "--mesh",
                          "data=1,fsdp=8,tensor=1"])
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        assert "pip install 'jaxzero[tpu]'" in err
    else:
        assert "8 devices, but 4 devices exist" in err  # the topology's, not this machine's


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    for command in ("prepare-data", "convert", "train", "eval", "generate", "plan", "plot"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: jaxzero " + command in capsys.readouterr().out


def test_plan_prints_per_device_memory(capsys):
    assert main(["plan", DEMO, "rollout.max_new_tokens=16", "data.prompt_buckets=[256]"]) == 0
    out = capsys.readouterr().out
    for line in ("parameters", "optimizer state", "reference model", "KV cache", "update",
                 "log-prob pass", "prefill", "decode loop", "computed       XLA:CPU", "peak",
                 "fits: yes, every phase within 80 GiB"):
        assert line in out


def test_generate_json_lines_hold_no_bare_nan():
    import json
    import math

    from jaxzero.cli.generate import json_record
    line = json_record(0, 1, "text", [5, 6, 7], [-0.5, math.nan, -math.inf], "stop")
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line)["logprobs"] == [-0.5, None, None]
