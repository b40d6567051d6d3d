"""YaRN rotary scaling against transformers' static "yarn": frequencies, logits past the
original context, greedy decoding, the config keys, and the export."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from helpers import make_hf_model, save_hf
from jaxzero.errors import CheckpointError
from jaxzero.io import hf as hf_io
from jaxzero.model import rope
from jaxzero.model.config import Qwen2Config, YarnScaling
from jaxzero.model.qwen2 import abstract_model
from jaxzero.model.sampler import Sampler, pad_prompts

ORIGINAL, FACTOR, T = 16, 4.0, 40  # tokens past ORIGINAL are where YaRN changes the logits
SPELLINGS = {  # config.json keys, as users paste them (Qwen2.5's model card) or savers write
    "rope_scaling-type": {"rope_theta": 10000.0, "rope_scaling": {
        "factor": FACTOR, "original_max_position_embeddings": ORIGINAL, "type": "yarn"}},
    "rope_scaling-rope_type": {"rope_theta": 10000.0, "rope_scaling": {
        "rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL}},
    "rope_parameters": {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": FACTOR,
        "original_max_position_embeddings": ORIGINAL}},
}


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32)).max())


# ---------------------------------------------------------------- frequencies

ROPES = [
    None,
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 4096,
     "truncate": False},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
     "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
     "mscale": 0.707},  # mscale alone changes nothing, as in transformers
    {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 100,
     "attention_factor": 1.3, "beta_fast": 0},  # 0 means the default 32 there
    {"rope_type": "yarn", "factor": 4.0},  # original: max_position_embeddings
]


@pytest.mark.parametrize("theta", [10000.0, 1e6])
@pytest.mark.parametrize("head_dim", [24, 64, 128])
@pytest.mark.parametrize("scaling", ROPES, ids=range(len(ROPES)))
def test_frequencies_and_attention_factor_are_transformers(theta, head_dim, scaling):
    hf = dict(vocab_size=32, hidden_size=4 * head_dim, intermediate_size=8,
              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              rope_theta=theta, max_position_embeddings=1000)
    if scaling:
        hf["rope_scaling"] = dict(scaling)
    ours = Qwen2Config.from_hf_dict(dict(hf, model_type="qwen2"))
    theirs = transformers.Qwen2Config(**hf)
    init = (ROPE_INIT_FUNCTIONS["yarn"] if scaling else
            transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding
            .compute_default_rope_parameters)
    want_inv, want_scale = init(theirs)
    want_inv = want_inv.numpy()
    assert rope.attention_scaling(ours) == want_scale  # the same Python float
    got_inv = rope.inverse_frequencies(ours)
    assert got_inv.dtype == np.float32 and got_inv.shape == want_inv.shape
    # Everything but theta's powers is transformers' float32 arithmetic, bit for bit ...
    torch_powers = (theta ** (torch.arange(0, head_dim, 2).float() / head_dim)).numpy()
    np.testing.assert_array_equal(rope.frequencies_from_powers(torch_powers, theta, ours.yarn),
                                  want_inv)
    # ... and the powers are correctly rounded, an ulp from torch's at most.
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    exact = np.power(np.longdouble(theta), exponent.astype(np.longdouble)).astype(np.float32)
    np.testing.assert_array_equal(rope.powers(theta, head_dim), exact)
    assert _ulps(rope.powers(theta, head_dim), torch_powers) <= 1
    assert _ulps(got_inv, want_inv) <= 2


# ---------------------------------------------------------------- the model

@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_BT, valid_BT):
    return nnx.merge(graphdef, state)(tokens_BT, valid_BT)[0]


def _with_rope(src, dst, keys: dict):
    """The HF dir `src` (config.json rewritten with these rotary keys) at `dst`."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    hf = json.loads((src / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        hf.pop(key, None)
    hf.update(keys, max_position_embeddings=int(FACTOR * ORIGINAL))
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


def _hf_load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    return save_hf(make_hf_model(seed=3), tmp_path_factory.mktemp("default") / "hf")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    valid_BT = np.arange(T)[None, :] >= np.array([0, 5])[:, None]  # left padding
    return np.where(valid_BT, rng.integers(0, 96, (2, T)), 0), valid_BT


def _logits(model, tokens_BT, valid_BT):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens_BT), attention_mask=torch.tensor(valid_BT),
                     position_ids=torch.tensor(np.maximum(valid_BT.cumsum(1) - 1, 0))
                     ).logits.numpy()


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_logits_match_transformers_past_the_original_context(default_dir, batch, tmp_path,
                                                              spelling):
    path = _with_rope(default_dir, tmp_path / "yarn", SPELLINGS[spelling])
    theirs = _hf_load(path)
    assert theirs.model.rotary_emb.rope_type == "yarn"
    config, state = hf_io.load_hf_checkpoint(path, param_dtype="float32")
    assert config.yarn == YarnScaling(factor=FACTOR, original_max_position_embeddings=ORIGINAL,
                                      attention_factor=rope.yarn_mscale(FACTOR))
    graphdef, _ = abstract_model(config)
    tokens_BT, valid_BT = batch
    got_BTV = np.asarray(_forward(graphdef, state, jnp.asarray(tokens_BT),
                                  jnp.asarray(valid_BT)))
    want_BTV = _logits(theirs, tokens_BT, valid_BT)
    assert np.abs(want_BTV).max() > 1.0
    assert np.abs(got_BTV - want_BTV)[valid_BT].max() <= 1e-4
    # The scaling matters here: default rope is far off past the original context.
    plain_BTV = _logits(_hf_load(default_dir), tokens_BT, valid_BT)
    assert np.abs(plain_BTV - want_BTV)[:, ORIGINAL + 5:].max() > 0.1


def test_export_keeps_yarn_and_transformers_reloads_the_same_rope(default_dir, batch, tmp_path):
    path = _with_rope(default_dir, tmp_path / "yarn", SPELLINGS["rope_scaling-type"])
    config, state = hf_io.load_hf_checkpoint(path, param_dtype="float32")
    out = tmp_path / "out"
    hf_io.export_hf(state, config, out, dtype="float32")
    written = json.loads((out / "config.json").read_text())
    assert written["rope_scaling"]["rope_type"] == "yarn"
    assert Qwen2Config.from_hf_dir(out) == config
    source, reloaded = _hf_load(path), _hf_load(out)
    assert reloaded.model.rotary_emb.attention_scaling == source.model.rotary_emb.attention_scaling
    assert torch.equal(reloaded.model.rotary_emb.inv_freq, source.model.rotary_emb.inv_freq)
    tokens_BT, valid_BT = batch
    np.testing.assert_array_equal(_logits(reloaded, tokens_BT, valid_BT),
                                  _logits(source, tokens_BT, valid_BT))
    # model_config.json and checkpoint metas hold it too.
    assert Qwen2Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_greedy_decoding_matches_transformers_generate(default_dir, tmp_path):
    path = _with_rope(default_dir, tmp_path / "yarn", SPELLINGS["rope_parameters"])
    config, state = hf_io.load_hf_checkpoint(path, param_dtype="float32")
    graphdef, _ = abstract_model(config)
    prompts = [list(range(3, 23)), list(range(40, 54))]  # decoding runs past position 16
    new = 10
    out = Sampler(graphdef, config, max_new_tokens=new, stop_ids=(), pad_id=0,
                  buckets=(24,)).generate(state, prompts, key=jax.random.key(0),
                                          temperature=0.0)
    tokens, valid = pad_prompts(prompts, 20, 0)
    want = _hf_load(path).generate(
        torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(valid, dtype=torch.long),
        do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), want[:, 20:].numpy())


# ---------------------------------------------------------------- config keys

BASE = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 32,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _read(**keys):
    return Qwen2Config.from_hf_dict(dict(BASE, **keys), source="x/config.json")


def test_the_spellings_read_alike():
    configs = {_read(**keys) for keys in SPELLINGS.values()}
    assert len(configs) == 1 and next(iter(configs)).rope_theta == 10000.0


@pytest.mark.parametrize("keys,named", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "not 'linear'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "not 'dynamic'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6}}, "not 'longrope'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "not 'llama3'"),
    ({"rope_scaling": {"type": "yarn", "rope_type": "linear", "factor": 2.0}}, "disagree"),
    ({"rope_scaling": {"type": "yarn"}}, "has no factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": None}}, "has no factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "factor=0.5"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1.5}},
     "original_max_position_embeddings=1.5"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "truncate": "no"}}, "truncate="),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}},
     "unknown yarn rope keys ['partial_rotary_factor']"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "rope_theta": 1e6}},
     "unknown yarn rope keys ['rope_theta']"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0},
      "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "keep one of them"),
    ({"rope_scaling": "yarn"}, "expected an object"),
])
def test_other_rope_kinds_and_bad_yarn_keys_are_refused_in_one_line(keys, named):
    with pytest.raises(CheckpointError, match="^x/config.json: ") as err:
        _read(**keys)
    assert named in str(err.value) and "\n" not in str(err.value)
    if "not '" in named:
        assert "rope types default, yarn" in str(err.value)
