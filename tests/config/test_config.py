"""Typed run config: shipped YAMLs, defaults, overrides, strict errors, round trips."""

import dataclasses

import pytest
import yaml

from helpers import REPO
from jaxzero.config.schema import (SECTIONS, DataConfig, GRPOConfig, MeshConfig, ModelConfig,
                            RolloutConfig, RunConfig, config_from_dict, config_to_dict,
                            diff_configs, flatten)
from jaxzero.config.files import load_config, save_config
from jaxzero.errors import ConfigError
from jaxzero.parallel.sharding import resolve_mesh_shape

CONFIGS = REPO / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))
MINIMAL = {"model": {"path": "Qwen/Qwen2.5-1.5B-Instruct"},
           "data": {"train_file": "train.jsonl"}}


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _minimal(tmp_path):
    return _write(tmp_path, yaml.safe_dump(MINIMAL))


def _error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


def test_shipped_configs_load():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "qwen2.5-1.5b.yaml", "qwen2.5-3b.yaml", "qwen2.5-7b.yaml"} <= names
    for path in SHIPPED:
        assert isinstance(load_config(path), RunConfig)


@pytest.mark.parametrize("size,mesh", [("1.5B", (1, 8, 1)), ("3B", (1, 8, 1)), ("7B", (1, 4, 2))])
def test_qwen_configs_reproduce_diagnosiszero(size, mesh):
    cfg = load_config(CONFIGS / f"qwen2.5-{size.lower()}.yaml")
    assert cfg.model.path == f"Qwen/Qwen2.5-{size}-Instruct" and not cfg.model.demo
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == mesh
    assert _resolve(cfg.mesh) == mesh
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.weight_decay, cfg.optim.grad_clip) == \
        (3e-7, "constant", 0.01, 1.0)
    assert (cfg.data.prompts_per_step, cfg.rollout.n, cfg.grpo.updates_per_step) == (8, 16, 1)
    assert (cfg.grpo.use_kl_loss, cfg.grpo.kl_kind, cfg.grpo.kl_coef) == (True, "low_var_kl", 0.001)
    assert (cfg.grpo.clip_low, cfg.grpo.clip_high, cfg.grpo.entropy_coeff) == (0.2, 0.2, 0.001)
    assert (cfg.rollout.temperature, cfg.rollout.top_p) == (1.0, 1.0)
    assert (cfg.data.max_prompt_length, cfg.rollout.max_new_tokens) == (1024, 1024)
    assert (cfg.trainer.total_epochs, cfg.trainer.eval_every, cfg.trainer.save_every) == (5, 10, 50)
    assert (cfg.data.train_file, cfg.data.test_file) == \
        ("data/rarearena/train.jsonl", "data/rarearena/test.jsonl")
    assert cfg.demo.warmup_steps == 0
    # The seed's arithmetic: its loss, its matcher, its step count, AdamW's eps.
    ranks, rows = (8, 8) if size == "7B" else (4, 16)
    g = cfg.grpo
    assert (g.loss_agg, g.seed_dp_ranks, g.seed_micro_batch_rows, g.loss_scale) == \
        ("seed-micro-token-mean", ranks, rows, 1 / 32)
    # 1/32 = micro-batches / (GPUs × gradient accumulation 256·16/GPUs / (64/GPUs)).
    assert g.loss_scale == (128 // rows) / (ranks * ((256 * 16 // ranks) // (64 // ranks)))
    assert (cfg.reward.matcher, cfg.reward.mode, cfg.optim.eps) == ("difflib", "strict", 1e-8)
    assert cfg.trainer.seed_step_count
    fixed = load_config(CONFIGS / f"qwen2.5-{size.lower()}-fixed.yaml")
    assert (fixed.grpo.loss_agg, fixed.grpo.loss_scale, fixed.trainer.seed_step_count) == \
        ("token-mean", 1.0, False)
    assert diff_configs(cfg, fixed) == [
        "grpo.loss_agg", "grpo.seed_micro_batch_rows", "grpo.seed_dp_ranks",
        "grpo.loss_scale", "trainer.run_dir", "trainer.seed_step_count"]


def test_demo_config():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.model.demo and cfg.model.path is None
    assert (cfg.model.param_dtype, cfg.model.compute_dtype, cfg.model.remat) == \
        ("float32", "float32", "none")
    assert cfg.data.train_file is None and cfg.data.prompt_buckets == (224,)
    assert (cfg.rollout.n, cfg.rollout.max_new_tokens, cfg.trainer.max_steps) == (4, 32, 40)
    assert (cfg.demo.warmup_steps, cfg.demo.warmup_lr, cfg.rollout.temperature) == (120, 5e-3, 0.5)
    assert len(cfg.demo.familiar_diseases) == 5 and cfg.trainer.export_hf == "runs/demo/hf"
    assert (cfg.grpo.micro_batches, cfg.grpo.logit_chunk) == (4, 2)  # measured: 2x faster
    assert _resolve(cfg.mesh) == (1, 8, 1)


def test_defaults(tmp_path):
    cfg = load_config(_minimal(tmp_path))
    assert cfg.model == ModelConfig(path="Qwen/Qwen2.5-1.5B-Instruct")
    assert (cfg.model.param_dtype, cfg.model.compute_dtype, cfg.model.remat) == \
        ("bfloat16", "bfloat16", "block")
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)
    assert cfg.data.prompt_buckets == (256, 512, 768, 1024) and cfg.data.prompts_per_step == 8
    assert cfg.rollout == RolloutConfig()
    assert (cfg.rollout.n, cfg.rollout.top_k, cfg.rollout.micro_batch) == (16, 0, None)
    assert (cfg.reward.mode, cfg.reward.matcher, cfg.reward.threshold) == \
        ("strict", "rapidfuzz", 0.8)
    assert (cfg.grpo.loss_agg, cfg.grpo.kl_kind, cfg.grpo.clip_c, cfg.grpo.micro_batches) == \
        ("token-mean", "low_var_kl", None, 1)
    assert (cfg.optim.lr, cfg.optim.b2, cfg.optim.eps) == (3e-7, 0.999, 1e-8)
    assert (cfg.trainer.run_dir, cfg.trainer.keep_checkpoints) == ("runs/default", 3)
    assert (cfg.demo.warmup_steps, cfg.demo.warmup_lr) == (0, 1e-2)


def test_overrides_of_each_type(tmp_path):
    cfg = load_config(_minimal(tmp_path), [
        "rollout.n=8", "optim.lr=1e-6", "grpo.kl_coef=1", "data.shuffle=false",
        "model.path=/x", "grpo.clip_c=3", "data.eval_max_prompts=null",
        "data.prompt_buckets=[128, 256, 1024]", "mesh={fsdp: 2, tensor: 4}",
        "grpo.loss_agg=seq-mean-token-sum", "trainer.export_hf=out/hf"])
    assert cfg.rollout.n == 8 and type(cfg.rollout.n) is int
    assert cfg.optim.lr == 1e-6 and type(cfg.optim.lr) is float
    assert cfg.grpo.kl_coef == 1.0 and type(cfg.grpo.kl_coef) is float   # int -> float
    assert cfg.grpo.clip_c == 3.0 and type(cfg.grpo.clip_c) is float     # inside `| None`
    assert cfg.data.shuffle is False and cfg.model.path == "/x"
    assert cfg.data.eval_max_prompts is None
    assert cfg.data.prompt_buckets == (128, 256, 1024)                  # list -> tuple
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, 2, 4)   # merged, not replaced
    assert cfg.grpo.loss_agg == "seq-mean-token-sum" and cfg.trainer.export_hf == "out/hf"
    assert load_config(_minimal(tmp_path), ["grpo.clip_c=3", "grpo.clip_c=null"]).grpo.clip_c \
        is None  # later overrides win


def test_unknown_key_in_yaml(tmp_path):
    path = _write(tmp_path, yaml.safe_dump({**MINIMAL, "rollout": {"temprature": 0.5}}))
    msg = _error(load_config, path)
    assert "'rollout.temprature'" in msg and "did you mean 'rollout.temperature'" in msg
    assert str(path) in msg
    msg = _error(load_config, _write(tmp_path, yaml.safe_dump({**MINIMAL, "rolout": {"n": 2}})))
    assert "'rolout'" in msg and "'rollout'" in msg
    # A key in the wrong section points to the section that has it.
    msg = _error(load_config, _write(tmp_path, yaml.safe_dump({**MINIMAL, "grpo": {"lr": 1.0}})))
    assert "'grpo.lr'" in msg and "'optim.lr'" in msg
    msg = _error(load_config, _write(tmp_path, yaml.safe_dump({**MINIMAL, "zzz": 1})))
    assert "'zzz'" in msg and "valid keys: model, mesh" in msg


def test_unknown_key_in_override(tmp_path):
    msg = _error(load_config, _minimal(tmp_path), ["rollout.temprature=0.5"])
    assert "rollout.temprature" in msg and "did you mean 'rollout.temperature'" in msg
    msg = _error(load_config, _minimal(tmp_path), ["rollout.temperature"])
    assert "KEY=VALUE" in msg
    msg = _error(load_config, _minimal(tmp_path), ["rollout.n.x=1"])
    assert "section.field" in msg


@pytest.mark.parametrize("override,expected", [
    ("rollout.n=8.5", "rollout.n: expected an integer, got 8.5"),
    ("rollout.n=true", "rollout.n: expected an integer, got true"),
    ("rollout.n='8'", "rollout.n: expected an integer, got '8' (a string)"),
    ("optim.lr=fast", "optim.lr: expected a finite number, got 'fast' (a string)"),
    ("optim.lr=.nan", "optim.lr: expected a finite number, got nan"),
    ("data.shuffle=1", "data.shuffle: expected true or false, got 1"),
    ("model.path=3", "model.path: expected a string or null, got 3"),
    ("rollout.n=null", "rollout.n: expected an integer, got null"),
    ("data.prompt_buckets=[256, x]", "data.prompt_buckets: expected a list of integers"),
    ("data.prompt_buckets=1024", "data.prompt_buckets: expected a list of integers, got 1024"),
    ("rollout=5", "section 'rollout' must be a mapping"),
])
def test_wrong_type(tmp_path, override, expected):
    assert expected in _error(load_config, _minimal(tmp_path), [override])


def test_bad_choice(tmp_path):
    msg = _error(load_config, _minimal(tmp_path), ["grpo.loss_agg=mean"])
    assert "grpo.loss_agg" in msg and "'token-mean'" in msg and "'seq-mean-token-sum-norm'" in msg
    msg = _error(load_config, _minimal(tmp_path), ["grpo.kl_kind=k4"])
    assert "grpo.kl_kind" in msg and "'low_var_kl'" in msg and "'k4'" in msg
    msg = _error(load_config, _minimal(tmp_path), ["model.param_dtype=float16"])
    assert "model.param_dtype: expected one of 'float32', 'bfloat16'" in msg


@pytest.mark.parametrize("override,expected", [
    ("grpo.micro_batches=3", "grpo.micro_batches=3 must divide data.prompts_per_step × rollout.n"),
    ("rollout.micro_batch=48", "rollout.micro_batch=48 must divide"),
    ("grpo.micro_batch_tokens=1000", "grpo.micro_batch_tokens=1000: a packed row must hold the "
     "longest rollout, data.max_prompt_length + rollout.max_new_tokens = 2048"),
    ("grpo.row_width_multiple=0", "grpo.row_width_multiple=0: must be at least 1"),
    ("trainer.local_dir=/tmp/m", "trainer.local_dir='/tmp/m': is only for a remote "
     "trainer.run_dir"),
    ("rollout.temperature=-0.1", "rollout.temperature=-0.1"),
    ("rollout.temperature=0", "rollout.temperature=0.0: GRPO trains on sampled rollouts: "
     "greedy decoding (0) gives every response of a group the same reward"),
    ("grpo.loss_agg=seed-micro-token-mean", "grpo.seed_micro_batch_rows=null: give it"),
    ("grpo.seed_dp_ranks=4", "grpo.seed_dp_ranks=4: give it (a positive count) with "
     "grpo.loss_agg: seed-micro-token-mean, and only then"),
    ("grpo.loss_scale=0", "grpo.loss_scale=0.0: must be positive"),
    ("rollout.top_p=0", "rollout.top_p=0.0: must be in (0, 1]"),
    ("rollout.n=1", "rollout.n=1: must be at least 2"),
    ("grpo.clip_low=1.0", "grpo.clip_low=1.0: must be in [0, 1)"),
    ("grpo.clip_c=0.5", "grpo.clip_c=0.5"),
    ("data.prompt_buckets=[512, 256]", "data.prompt_buckets=[512, 256]: give positive lengths"),
    ("data.prompt_buckets=[256]", "the largest bucket must hold data.max_prompt_length (1024)"),
    ("mesh.fsdp=0", "mesh.fsdp=0"),
    ("mesh.data=-1", "at most one axis may be -1"),
    ("data.train_file=null", "data.train_file is required"),
    ("demo.warmup_steps=5", "demo.warmup_steps=5"),
    ("model.demo=true", "model.path='Qwen/Qwen2.5-1.5B-Instruct': must be null when"),
    ("model.path=null", "model.path=null"),
    ("reward.format_score=2", "reward.format_score=2.0: must not exceed reward.score"),
    ("trainer.max_steps=0", "trainer.max_steps=0: must be at least 1 (or null)"),
    ("grpo.logit_chunk=0", "grpo.logit_chunk=0"),
    ("optim.grad_clip=0", "optim.grad_clip=0.0: must be positive"),
])
def test_cross_field_validation(tmp_path, override, expected):
    assert expected in _error(load_config, _minimal(tmp_path), [override])


def test_seed_loss_groups_must_tile_the_batch(tmp_path):
    seed = ["grpo.loss_agg=seed-micro-token-mean", "grpo.seed_micro_batch_rows=16"]
    cfg = load_config(_minimal(tmp_path), seed + ["grpo.seed_dp_ranks=4"])
    assert (cfg.grpo.seed_dp_ranks, cfg.grpo.seed_micro_batch_rows) == (4, 16)
    msg = _error(load_config, _minimal(tmp_path), seed + ["grpo.seed_dp_ranks=3"])
    assert msg.endswith("grpo.seed_dp_ranks × grpo.seed_micro_batch_rows = 3 × 16 = 48 must divide "
                   "data.prompts_per_step × rollout.n = 128")
    # Memory micro-batching need not line up with the seed's groups.
    load_config(_minimal(tmp_path), seed + ["grpo.seed_dp_ranks=4", "grpo.micro_batches=32"])


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="rollout.top_k=-1"):
        RolloutConfig(top_k=-1)
    with pytest.raises(ConfigError, match="grpo.kl_kind: expected one of"):
        GRPOConfig(kl_kind="k9")
    assert DataConfig(prompt_buckets=[1024]).prompt_buckets == (1024,)
    with pytest.raises(ConfigError, match="grpo.micro_batches=5 must divide"):
        RunConfig(model=ModelConfig(demo=True), grpo=GRPOConfig(micro_batches=5))
    with pytest.raises(ConfigError, match="grpo.micro_batches=2: must be 1 with "
                                          "grpo.micro_batch_tokens"):
        GRPOConfig(micro_batches=2, micro_batch_tokens=4096)


def _resolve(mesh: MeshConfig, devices: int = 8):
    return resolve_mesh_shape(mesh.data, mesh.fsdp, mesh.tensor, devices)


def test_mesh_resolve():
    assert _resolve(MeshConfig(data=2, fsdp=2, tensor=2)) == (2, 2, 2)
    assert _resolve(MeshConfig()) == (1, 8, 1)
    assert _resolve(MeshConfig(data=2, fsdp=-1, tensor=2)) == (2, 2, 2)
    assert _resolve(MeshConfig(data=-1, fsdp=4, tensor=1)) == (2, 4, 1)
    msg = _error(_resolve, MeshConfig(data=2, fsdp=3, tensor=1))
    assert "mesh data=2 × fsdp=3 × tensor=1 = 6 devices, but 8 devices exist" in msg
    assert "set one axis to -1" in msg
    msg = _error(_resolve, MeshConfig(data=3, fsdp=-1, tensor=1))
    assert "take 3 devices" in msg and "8 devices" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    msg = _error(load_config, tmp_path / "nope.yaml")
    assert "config file not found" in msg and "nope.yaml" in msg
    assert "top level must be a mapping" in _error(load_config, _write(tmp_path, "- a\n- b\n"))
    assert "top level must be a mapping" in _error(load_config, _write(tmp_path, ""))
    assert "not valid YAML" in _error(load_config, _write(tmp_path, "model: [\n"))
    path = _write(tmp_path, "model: {path: a}\nmodel: {path: b}\n")
    assert _error(load_config, path).startswith(f"{path}: duplicate key 'model' at line 2")


def test_base_inheritance(tmp_path):
    _write(tmp_path, yaml.safe_dump({**MINIMAL, "rollout": {"n": 4, "top_k": 5}}), "base.yaml")
    child = _write(tmp_path, "base: base.yaml\nrollout: {n: 8}\n", "child.yaml")
    cfg = load_config(child)
    assert (cfg.model.path, cfg.rollout.n, cfg.rollout.top_k) == \
        ("Qwen/Qwen2.5-1.5B-Instruct", 8, 5)
    loop = _write(tmp_path, "base: loop.yaml\n", "loop.yaml")
    assert "`base` chain loops" in _error(load_config, loop)
    bad = _write(tmp_path, "base: base.yaml\nrollout: {nn: 8}\n", "bad.yaml")
    msg = _error(load_config, bad)
    assert "bad.yaml" in msg and "'rollout.nn'" in msg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_round_trip(tmp_path, path):
    cfg = load_config(path)
    d = config_to_dict(cfg)
    assert set(d) == set(SECTIONS)
    assert config_from_dict(d) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == d


def test_diff_configs_and_flatten(tmp_path):
    a = load_config(_minimal(tmp_path))
    b = load_config(_minimal(tmp_path), ["rollout.n=8", "optim.lr=1e-6", "grpo.micro_batches=2"])
    assert diff_configs(a, a) == []
    assert diff_configs(a, b) == ["rollout.n", "grpo.micro_batches", "optim.lr"]
    flat = flatten(a)
    assert flat["rollout.n"] == 16 and flat["data.prompt_buckets"] == [256, 512, 768, 1024]
    assert len(flat) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values())
