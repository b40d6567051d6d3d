"""The rollout's decode copy: the training rollout (float32 master weights, bfloat16 compute,
fsdp=8 on 8 simulated devices) compiled as setup builds it, read in its optimized HLO."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxzero.config.schema import config_from_dict
from jaxzero.errors import ConfigError
from jaxzero.model.qwen2 import ModelOptions, init_model
from jaxzero.model.sampler import Sampler, pad_prompts
from jaxzero.model.sampling import SamplingParams
from jaxzero.parallel.sharding import (ShardingConfig, choose_decode_layout, make_mesh,
                                       param_shardings)
from jaxzero.rl import setup
from helpers import TINY

OPTIONS = ModelOptions(param_dtype=jnp.float32, compute_dtype=jnp.bfloat16)
PROMPTS = [[5, 17, 33, 9], [40, 3], [12, 50, 7], [60, 1, 33, 15]] * 2


def _training_rollout():
    cfg = config_from_dict({"model": {"demo": True, "param_dtype": "float32",
                                      "compute_dtype": "bfloat16"},
                            "data": {"prompts_per_step": 8},
                            "rollout": {"n": 2, "max_new_tokens": 6, "decode_chunk": 3}})
    mesh = setup.validate(cfg)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    graphdef, params = nnx.split(init_model(TINY, OPTIONS))
    params = jax.device_put(params, param_shardings(params, mesh))  # the trainer's FSDP shards
    return cfg, mesh, graphdef, params


def _while_loops(hlo: str):
    """(carry type, body computation) of every while loop in an HLO module's text."""
    return re.findall(r"= (\(.*?\)) while\(.*?body=%?([\w.\-]+)", hlo)


def _decode_hlo(sampler: Sampler, params) -> str:
    tokens, valid = pad_prompts(PROMPTS, 8, 0)
    loop = sampler.loop(2)
    cache, logits = loop.prefill(params, sampler._put(tokens), sampler._put(valid))
    positions = sampler._put(valid.sum(1).repeat(2).astype(np.int32))
    sampling = SamplingParams.make(1.0)
    return loop.decode.lower(loop, params, cache, logits, positions, jax.random.key(0),
                             sampling).compile().as_text()


def _f32_weights_in_carries(hlo: str) -> list[str]:
    """float32 arrays in a while loop's carry with as many elements as a (layer-stacked)
    weight matrix, whole or in one of 8 FSDP shards (biases and norms, a few hundred bytes,
    are left out)."""
    whole = {x.size for x in jax.tree.leaves(nnx.split(init_model(TINY, OPTIONS))[1])
             if x.size >= TINY.hidden_size * TINY.head_dim}
    sizes = whole | {size // 8 for size in whole}
    found = []
    for carry, _ in _while_loops(hlo):
        for dims in re.findall(r"f32\[([\d,]+)\]", carry):
            if np.prod([int(d) for d in dims.split(",")]) in sizes:
                found.append(f"f32[{dims}]")
    return found


def _all_gathers(hlo: str) -> int:
    return len(re.findall(r" all-gather(?:-start)?\(", hlo))


def test_the_decode_loop_carries_no_float32_weight_and_gathers_nothing():
    """Checked on the code before the copy, the same reading found float32 gate/up/down
    replicas in the loop's carry and 16 all-gathers (hoisted out of the loop), as it still
    finds when the trainer's parameters are decoded directly."""
    cfg, mesh, graphdef, params = _training_rollout()
    sampler = setup.build_sampler(cfg, TINY, OPTIONS, mesh, stop_ids=(1,), pad_id=0,
                                  log=lambda _: None)
    copy = sampler.decode_params(params)
    for leaf in jax.tree.leaves(copy):
        assert leaf.dtype == jnp.bfloat16 and leaf.sharding.is_fully_replicated  # bf16
    hlo = _decode_hlo(sampler, copy)
    assert len(_while_loops(hlo)) >= 2  # the chunk loop and its per-token loops
    assert _f32_weights_in_carries(hlo) == []
    assert _all_gathers(hlo) == 0  # none per token, none hoisted out of the loop either

    # Decoding the trainer's float32 FSDP shards directly, as before the copy, fails both:
    # the loop carries the float32 shards and gathers them every token.
    direct = Sampler(graphdef, TINY, max_new_tokens=6, stop_ids=(1,), pad_id=0, buckets=(8,),
                     mesh=mesh, chunk=3)
    hlo = _decode_hlo(direct, params)
    assert _f32_weights_in_carries(hlo) and _all_gathers(hlo) > 0


def test_auto_layout_replicates_small_copies_and_splits_large_ones_within_a_host():
    """...and replicates a large one whose tensor layout would span hosts."""
    mesh = make_mesh(1, 4, 2)
    gib = 2 ** 30
    assert choose_decode_layout("auto", 3 * gib, None, mesh, 8) == "replicated"  # CPU
    assert choose_decode_layout("auto", 3 * gib, 140 * gib, mesh, 8) == "replicated"
    assert choose_decode_layout("auto", 15 * gib, 16 * gib, mesh, 8) == "tensor"
    # fsdp × tensor = 8 devices over hosts of 4: tensor cannot, so auto replicates.
    assert choose_decode_layout("auto", 6 * gib, 16 * gib, mesh, 4) == "replicated"
    with pytest.raises(ConfigError, match="more than one host's 4"):
        choose_decode_layout("tensor", gib, None, mesh, 4)
    table = ShardingConfig.decode_tensor()
    assert table.q_DNH == P(None, ("fsdp", "tensor"), None) and table.rows_B == P("data")
    assert ShardingConfig.decode_replicated().embed_VD == P()


@pytest.mark.slow
def test_tensor_layout_decodes_what_the_replicated_one_does():
    """On (data 2, fsdp 2, tensor 2) the tensor copy splits heads, MLP and vocab over 4
    devices and rows over 2; greedy tokens match the replicated copy's."""
    mesh = make_mesh(2, 2, 2)
    graphdef, params = nnx.split(init_model(TINY, ModelOptions()))
    params = jax.device_put(params, param_shardings(params, mesh))
    outs = []
    for layout in ("replicated", "tensor"):
        cfg = config_from_dict({"model": {"demo": True}, "data": {"prompts_per_step": 8},
                                "rollout": {"n": 2, "max_new_tokens": 6,
                                            "decode_layout": layout}})
        sampler = setup.build_sampler(cfg, TINY, ModelOptions(), mesh, stop_ids=(), pad_id=0)
        copy = sampler.decode_params(params)
        gate = copy["layers"]["mlp"]["gate_DF"]
        layers = TINY.num_hidden_layers
        assert gate.addressable_shards[0].data.shape == (
            (layers, 64, 128) if layout == "replicated" else (layers, 64, 32))
        outs.append(sampler.generate(params, PROMPTS, key=jax.random.key(0), n=2,
                                     temperature=0.0))
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-4)
