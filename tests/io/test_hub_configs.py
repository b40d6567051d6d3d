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
FAST = {"DeepSeek-R1-Distill-Qwen-1.5B", "transformers-5.x-save"}
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
