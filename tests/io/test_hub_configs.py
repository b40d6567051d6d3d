"""Directories laid out as the real releases are load, decode as transformers does, and train.

Each fixture under tests/fixtures/hub_configs/ carries a release's config.json key set (see
its README); a tiny random transformers model of that shape is saved beside the fixture's
files, as they are, and read back by jaxzero.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from helpers import FIXTURES, grpo_batch
from jaxzero.io import identity
from jaxzero.io.model_dir import load_params
from jaxzero.model.config import Qwen2Config
from jaxzero.model.qwen2 import abstract_model
from jaxzero.model.sampler import Sampler, pad_prompts
from jaxzero.parallel.sharding import make_mesh
from jaxzero.rl import grpo
from jaxzero.rl.train_step import build_step_functions, init_opt_state, make_optimizer

HUB = FIXTURES / "hub_configs"
RELEASES = sorted(p.name for p in HUB.iterdir() if p.is_dir())
# One of each kind runs the compiled checks in the fast suite; the rest are marked slow.
FAST = {"DeepSeek-R1-Distill-Qwen-32B", "transformers-5.1-save"}
PROMPTS = [[5, 17, 3, 90, 41], [8, 2, 77]]
NEW = 6


def _maybe_slow(names):
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


def _files(name):
    return sorted(p.name for p in (HUB / name).iterdir())


@pytest.fixture(scope="module")
def release_dirs(tmp_path_factory):
    """{name: (HF dir holding the fixture's files verbatim, the transformers model)}."""
    root = tmp_path_factory.mktemp("hub")
    cache = {}

    def make(name):
        if name not in cache:
            src = HUB / name
            config = transformers.AutoConfig.from_pretrained(src)
            config._attn_implementation = "eager"
            torch.manual_seed(len(cache))
            model = transformers.Qwen2ForCausalLM(config).eval()
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if pname.endswith("norm.weight"):
                        p.copy_(1.0 + 0.3 * torch.randn_like(p))
                    else:
                        p.copy_(0.3 * torch.randn_like(p))
            out = root / name
            model.save_pretrained(out)
            for f in _files(name):  # the release's own files, not transformers' rewrite
                shutil.copyfile(src / f, out / f)
            cache[name] = (out, model)
        return cache[name]
    return make


def test_every_release_has_its_files():
    assert len(RELEASES) >= 20
    for name in RELEASES:
        assert "config.json" in _files(name), name


@pytest.mark.parametrize("name", RELEASES)
def test_release_config_reads_with_hashable_ids(name):
    file = HUB / name / "config.json"
    hf = json.loads(file.read_text())
    config = Qwen2Config.from_hf_dir(HUB / name)
    hash(config)  # a static jit argument
    eos = hf["eos_token_id"]
    assert config.eos_token_id == tuple(eos if isinstance(eos, list) else [eos])
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta"))
    assert config.rope_theta == float(theta) and config.num_hidden_layers == 2
    assert config.tie_word_embeddings == hf["tie_word_embeddings"]
    gen = HUB / name / "generation_config.json"
    gen_eos = identity.generation_eos_ids(gen if gen.is_file() else None)
    assert set(gen_eos) <= {240, 242}


@pytest.mark.parametrize("name", RELEASES)
def test_release_config_reads_as_transformers_reads_it(name):
    ours = Qwen2Config.from_hf_dir(HUB / name)
    theirs = transformers.AutoConfig.from_pretrained(HUB / name)
    eos = theirs.eos_token_id
    assert ours.eos_token_id == tuple(eos if isinstance(eos, list) else [eos])
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    # Full attention in every layer, whatever max_window_layers and sliding_window say.
    assert theirs.layer_types == ["full_attention"] * ours.num_hidden_layers
    gen = HUB / name / "generation_config.json"
    theirs_gen = transformers.GenerationConfig.from_pretrained(HUB / name)
    gen_eos = theirs_gen.eos_token_id
    assert identity.generation_eos_ids(gen) == tuple(
        gen_eos if isinstance(gen_eos, list) else [gen_eos])


def _hf(name, file="config.json"):
    return json.loads((HUB / name / file).read_text())


def test_the_fixtures_carry_the_released_values_that_differ_from_the_defaults():
    """The values of the real files that tripped the earlier, reconstructed fixtures."""
    for name in ("Qwen2.5-14B", "Qwen2.5-32B", "DeepSeek-R1-Distill-Qwen-32B"):
        assert _hf(name)["rms_norm_eps"] == 1e-05, name
    # Instruct files carry max_window_layers past their real layer count (70 > 64 for 32B).
    for name in ("Qwen2.5-3B-Instruct", "Qwen2.5-14B-Instruct", "Qwen2.5-32B-Instruct",
                 "Qwen2.5-72B-Instruct"):
        assert _hf(name)["max_window_layers"] == 70, name
    assert _hf("Qwen2.5-0.5B")["max_window_layers"] == 24
    assert _hf("Qwen2.5-7B")["use_mrope"] is False
    distill = _hf("DeepSeek-R1-Distill-Qwen-32B")
    assert "_name_or_path" not in distill and "use_mrope" not in distill
    assert distill["sliding_window"] == 131072 and distill["use_sliding_window"] is False
    save = _hf("transformers-5.1-save")
    assert "_model_name_or_path" not in save and save["pad_token_id"] is None
    assert "rope_theta" not in save and save["rope_parameters"]["rope_type"] == "default"
    gen = _hf("transformers-5.1-save", "generation_config.json")
    assert {"do_sample", "temperature", "top_p", "top_k", "repetition_penalty"} <= set(gen)


def test_a_transformers_5_save_reads_its_generation_defaults_as_transformers_does():
    path = HUB / "transformers-5.1-save"
    ours = Qwen2Config.from_hf_dir(path)
    theirs = transformers.AutoConfig.from_pretrained(path)
    assert theirs.pad_token_id is None  # jaxzero pads with the tokenizer's pad token instead
    assert ours.eos_token_id == (242,) == (theirs.eos_token_id,)
    gen = transformers.GenerationConfig.from_pretrained(path)
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty) == (
        True, 0.7, 0.8, 20, 1.1)
    assert identity.generation_eos_ids(path / "generation_config.json") == (242, 240)
    stops = set(ours.eos_token_id) | set(identity.generation_eos_ids(
        identity.resolve_source(path).generation_config))
    assert stops == {242, 240}


@pytest.mark.parametrize("name", RELEASES)
def test_release_loads_and_gives_transformers_logits(release_dirs, name):
    path, hf = release_dirs(name)
    config, state = load_params(path, param_dtype="float32")
    graphdef, _ = abstract_model(config)
    tokens = np.array([[5, 17, 3, 90, 41, 8, 8, 2]])
    ours, _ = nnx.merge(graphdef, state)(jnp.asarray(tokens))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4, rtol=0)


def _hf_greedy(hf, stop_ids, pad):
    tokens, valid = pad_prompts(PROMPTS, max(map(len, PROMPTS)), pad)
    out = hf.generate(torch.tensor(tokens, dtype=torch.long),
                      attention_mask=torch.tensor(valid, dtype=torch.long), do_sample=False,
                      max_new_tokens=NEW, min_new_tokens=0, eos_token_id=list(stop_ids),
                      pad_token_id=pad, repetition_penalty=1.0, temperature=None, top_p=None,
                      top_k=None)
    gen = out[:, tokens.shape[1]:].numpy()
    return np.pad(gen, ((0, 0), (0, NEW - gen.shape[1])), constant_values=pad)


@pytest.mark.parametrize("name", _maybe_slow(RELEASES))
def test_release_greedy_decodes_as_transformers_and_trains_one_step(release_dirs, name):
    path, hf = release_dirs(name)
    source = identity.resolve_source(path)
    stops = tuple(sorted(set(source.config.eos_token_id)
                         | set(identity.generation_eos_ids(source.generation_config))))
    pad = 240
    config, state = load_params(path, param_dtype="float32")
    graphdef, abstract = abstract_model(config)
    out = Sampler(graphdef, config, max_new_tokens=NEW, stop_ids=stops, pad_id=pad,
                  buckets=(8,)).generate(state, PROMPTS, key=jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), _hf_greedy(hf, stops, pad))

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    optimizer = make_optimizer(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                               grad_clip=1.0)
    fns = build_step_functions(graphdef, abstract, optimizer, grpo.LossConfig(), mesh,
                               response_len=6)
    params = jax.device_put(state, fns.param_shardings)
    before = jax.device_get(jax.tree.leaves(params))
    opt_state = init_opt_state(optimizer, params, fns.opt_shardings)
    new_params, _, metrics = fns.update(params, opt_state, grpo_batch())
    assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0.0
    after = jax.device_get(jax.tree.leaves(new_params))
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
