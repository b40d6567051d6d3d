"""The sharding table: sharded results equal single-device ones, constraints bind in the
update, and what the mesh cannot shard is listed."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import LOSS, R, TINY, grpo_batch
from jaxzero.errors import ConfigError
from jaxzero.model.qwen2 import init_model
from jaxzero.model.config import Qwen2Config
from jaxzero.parallel.sharding import (FSDP_TP, PARAM_NAMES, Dropped, ShardingConfig,
                                       abstract_on, fit_spec, follow_params, make_mesh,
                                       param_shardings, resolve_mesh_shape, undivided)
from jaxzero.rl.train_step import build_step_functions, init_opt_state, make_optimizer

def _run(mesh):
    graphdef, params = nnx.split(init_model(TINY, seed=1))
    optimizer = make_optimizer(lr=1e-3, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                               grad_clip=1.0)
    fns = build_step_functions(graphdef, params, optimizer, LOSS, mesh, response_len=R)
    params = jax.device_put(params, fns.param_shardings)
    opt_state = init_opt_state(optimizer, params, fns.opt_shardings)
    batch = grpo_batch()
    with jax.set_mesh(mesh):
        logits, _ = jax.jit(lambda p, t, v: nnx.merge(graphdef, p)(t, v))(
            params, batch.tokens_BT, batch.valid_BT)
    logp = fns.logprobs(params, batch.tokens_BT, batch.valid_BT)
    new_params, new_opt, metrics = fns.update(params, opt_state, batch)
    return (np.asarray(logits), np.asarray(logp), jax.device_get(metrics),
            jax.device_get(new_params), new_params, new_opt)


@pytest.fixture(scope="module")
def single():
    """The unsharded reference: a 1x1x1 mesh on the first device."""
    return _run(make_mesh(1, 1, 1, devices=jax.devices()[:1]))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)])
def test_sharded_equals_single_device(single, mesh_shape):
    logits, logp, metrics, params, _, _ = _run(make_mesh(*mesh_shape))
    ref_logits, ref_logp, ref_metrics, ref_params, _, _ = single
    valid = np.asarray(grpo_batch().valid_BT)
    np.testing.assert_allclose(logits[valid], ref_logits[valid], atol=1e-5)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    for key in ("loss", "grad_norm", "pg_loss", "kl", "entropy"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_parameters_are_really_sharded():
    mesh = make_mesh(1, 4, 2)
    _, _, _, _, params, opt_state = _run(mesh)
    q = params["layers"]["attn"]["q_DNH"].value  # stacked: [L, D, N, H], L never sharded
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 64 // 4, 4 // 2, 16)
    up = params["layers"]["mlp"]["up_DF"].value
    assert up.addressable_shards[0].data.shape == (2, 16, 64)
    embed = params["embed_VD"].value
    assert embed.sharding.spec == P("tensor", "fsdp")
    # Adam moments follow their parameter.
    mu = opt_state[1][0].mu["layers"]["attn"]["q_DNH"].value
    assert mu.sharding.spec == P(None, "fsdp", "tensor", None)
    assert mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}


def test_indivisible_heads_are_replicated():
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=1)
    mesh = make_mesh(1, 2, 4)
    _, params = nnx.split(init_model(cfg))
    shard = param_shardings(params, mesh)
    assert shard["layers"]["attn"]["k_DKH"].value.spec == P(None, "fsdp", None, None)
    assert shard["layers"]["attn"]["q_DNH"].value.spec == P(None, "fsdp", "tensor", None)


def test_every_parameter_has_a_rule():
    untied = Qwen2Config(**{**TINY.to_dict(), "tie_word_embeddings": False})
    _, params = nnx.split(init_model(untied))
    names = {str(p[-2].key) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert names == set(PARAM_NAMES)


def test_optimizer_state_follows_parameters():
    mesh = make_mesh(1, 8, 1)
    _, params = nnx.split(init_model(TINY))
    opt = make_optimizer(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8, grad_clip=1.0)
    shard = follow_params(jax.eval_shape(opt.init, params), params, mesh)
    nu = shard[1][0].nu["embed_VD"].value
    assert nu.spec == P("tensor", "fsdp")
    assert shard[1][0].count.spec == P()


def test_mesh_resolution_and_errors():
    assert resolve_mesh_shape(1, -1, 2, 8) == (1, 4, 2)
    assert resolve_mesh_shape(2, 2, 2, 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="6 devices, but 8 devices exist"):
        resolve_mesh_shape(2, 3, 1, 8)
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_mesh_shape(3, -1, 1, 8)
    with pytest.raises(ConfigError, match="at most one is -1"):
        resolve_mesh_shape(-1, -1, 1, 8)


def _constraints(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if "sdy.sharding_constraint" in line]


def test_update_traces_under_the_mesh_so_activation_constraints_bind():
    """The lowered update carries the model's activation constraints (act_BTD after the
    embedding and after every block, the attention scores over K heads); a plain jit of the
    model outside a mesh carries none."""
    mesh = make_mesh(1, 4, 2)
    graphdef, params = nnx.split(init_model(TINY, seed=1))
    optimizer = make_optimizer(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                               grad_clip=None)
    fns = build_step_functions(graphdef, params, optimizer, LOSS, mesh, response_len=R)
    batch = abstract_on(grpo_batch(), fns.batch_shardings)
    hlo = fns.update.lower(abstract_on(params, fns.param_shardings),
                           abstract_on(jax.eval_shape(optimizer.init, params), fns.opt_shardings),
                           batch).as_text()
    b, t = batch.tokens_BT.shape
    act_BTD = [c for c in _constraints(hlo)
               if f'[{{"data", "fsdp"}}, {{}}, {{}}]> : tensor<{b}x{t}x{TINY.hidden_size}xf32>' in c]
    assert len(act_BTD) >= TINY.num_hidden_layers + 1
    assert any('[{"data", "fsdp"}, {"tensor"}, {}, {}, {}]' in c for c in _constraints(hlo))
    logprobs_hlo = fns.logprobs.lower(abstract_on(params, fns.param_shardings), batch.tokens_BT,
                                      batch.valid_BT).as_text()
    assert _constraints(logprobs_hlo)

    plain = jax.jit(lambda p, x, v: nnx.merge(graphdef, p)(x, v)[0]).lower(
        params, grpo_batch().tokens_BT, grpo_batch().valid_BT).as_text()
    assert not _constraints(plain)


def test_undivided_lists_what_the_mesh_replicates():
    """One KV head over tensor=4: every K-sharded field is listed once (not per layer), and
    nothing else; a mesh that divides everything lists nothing."""
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1)
    _, params = nnx.split(init_model(cfg))
    assert undivided(params, make_mesh(1, 2, 4)) == [
        f"{field}: K=1 does not divide over tensor (4 devices); replicated along K"
        for field in ("k_DKH", "k_bias_KH", "v_DKH", "v_bias_KH", "act_BTKH", "scores_BKQTS",
                      "cache_LBKSH")]
    assert undivided(params, make_mesh(1, 8, 1)) == []
    _, tiny = nnx.split(init_model(TINY))
    assert undivided(tiny, make_mesh(1, 4, 2), FSDP_TP) == []


def test_step_functions_report_undivided_and_stray_optimizer_leaves():
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=1)
    graphdef, params = nnx.split(init_model(cfg))
    optimizer = make_optimizer(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                               grad_clip=1.0)
    fns = build_step_functions(graphdef, params, optimizer, LOSS, make_mesh(1, 2, 4),
                               response_len=R)
    assert fns.replicated[0] == "k_DKH: K=1 does not divide over tensor (4 devices); " \
        "replicated along K" and len(fns.replicated) == 7
    # A leaf that mirrors no parameter and is not a scalar is replicated, and said so.
    stray = {"adam": jax.ShapeDtypeStruct((3, 5), np.float32),
             "count": jax.ShapeDtypeStruct((), np.int32)}
    assert undivided(params, make_mesh(1, 8, 1), opt_state=stray) == [
        "optimizer state adam (3, 5): follows no parameter; replicated"]
    assert follow_params(stray, params, make_mesh(1, 8, 1))["adam"].spec == P()


def test_fit_spec_drops_only_axes_that_do_not_divide():
    mesh = make_mesh(2, 2, 2)
    spec, dropped = fit_spec(P(("data", "fsdp"), "tensor", None), (8, 3, 5), mesh)
    assert spec == P(("data", "fsdp"), None, None)
    assert dropped == (Dropped(dim=1, size=3, axes=("tensor",), devices=2),)
    # A dimension that depends on the call (None) keeps its axes.
    assert fit_spec(P(("data", "fsdp"), "tensor"), (None, 6), mesh) == (
        P(("data", "fsdp"), "tensor"), ())


def test_table_factories_and_validation():
    rep = ShardingConfig.replicated()
    assert all(getattr(rep, f.name) == P() for f in dataclasses.fields(ShardingConfig))
    assert hash(FSDP_TP) == hash(ShardingConfig.fsdp_tp()) and FSDP_TP == ShardingConfig.fsdp_tp()
    with pytest.raises(ConfigError, match="act_BTD: unknown mesh axes \\['model'\\]"):
        dataclasses.replace(FSDP_TP, act_BTD=P("model", None, None))
    with pytest.raises(ConfigError, match="norm_D: .* more entries than the 1 dimensions"):
        dataclasses.replace(FSDP_TP, norm_D=P(None, "fsdp"))


def test_replicated_table_shards_nothing():
    mesh = make_mesh(1, 4, 2)
    _, params = nnx.split(init_model(TINY))
    shard = param_shardings(params, mesh, ShardingConfig.replicated())
    assert all(s.is_fully_replicated for s in jax.tree.leaves(
        shard, is_leaf=lambda x: isinstance(x, NamedSharding)))
