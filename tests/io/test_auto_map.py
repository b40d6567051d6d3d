"""`auto_map` (transformers' remote-code pointers): ignored, never imported, in a
Qwen2ForCausalLM config, with one warning; refused with any other architecture."""

import json
import logging

import pytest

from helpers import make_hf_model, save_hf
from jaxzero.errors import CheckpointError
from jaxzero.io import hf as hf_io
from jaxzero.model.config import Qwen2Config

AUTO_MAP = {"AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
# What importing the custom code would do: leave a file beside it.
CODE = "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('ran')\n"


def test_auto_map_is_ignored_with_one_warning_and_its_code_never_runs(tmp_path, caplog):
    path = save_hf(make_hf_model(), tmp_path / "hf")
    hf = json.loads((path / "config.json").read_text())
    assert hf["architectures"] == ["Qwen2ForCausalLM"]
    (path / "config.json").write_text(json.dumps(dict(hf, auto_map=AUTO_MAP)))
    for module in ("configuration_custom.py", "modeling_custom.py"):
        (path / module).write_text(CODE)
    with caplog.at_level(logging.WARNING, logger="jaxzero"):
        config, _ = hf_io.load_hf_checkpoint(path, param_dtype="float32")
    assert config == Qwen2Config.from_hf_dict(hf)
    assert not (path / "IMPORTED").exists()
    lines = [r.getMessage() for r in caplog.records if "auto_map" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{path / 'config.json'}: ignoring auto_map")
    assert json.dumps(AUTO_MAP) in lines[0]


BASE = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "auto_map": AUTO_MAP}


@pytest.mark.parametrize("changes,named", [
    ({"architectures": ["CustomQwenForCausalLM"]}, "architectures="),
    ({"architectures": ["Qwen2ForCausalLM", "CustomQwenForCausalLM"]}, "architectures="),
    ({}, 'auto_map={"AutoConfig"'),  # no architectures: nothing says it is Qwen2's model
    ({"architectures": None}, "this one has null"),
])
def test_auto_map_with_another_architecture_is_refused(changes, named, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxzero"):
        with pytest.raises(CheckpointError, match="^x/config.json: ") as err:
            Qwen2Config.from_hf_dict(dict(BASE, **changes), source="x/config.json")
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not caplog.records  # refused, not ignored
