"""The update both the 2-process test and its single-process reference run."""

import jax
import numpy as np
from flax import nnx

from jaxzero.rl import grpo
from jaxzero.model.qwen2 import init_model
from jaxzero.model.config import Qwen2Config
from jaxzero.parallel.sharding import batch_sharding, make_mesh, put_global
from jaxzero.rl.train_step import TrainBatch, build_step_functions, init_opt_state, make_optimizer

CFG = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
R, P_LEN, B = 4, 6, 8


def host_batch():
    rng = np.random.RandomState(3)
    tokens = rng.randint(0, CFG.vocab_size, (B, P_LEN + R)).astype(np.int32)
    valid = np.ones(tokens.shape, bool)
    valid[::2, :2] = False
    return TrainBatch(tokens, valid, valid[:, P_LEN:].astype(np.float32),
                      rng.randn(B).astype(np.float32),
                      (-rng.rand(B, R) - 4).astype(np.float32),
                      (-rng.rand(B, R) - 4).astype(np.float32))


def run_update(devices):
    mesh = make_mesh(2, 2, 2, devices=devices)
    graphdef, params = nnx.split(init_model(CFG, seed=7))
    host_params = jax.tree.map(np.asarray, params)
    optimizer = make_optimizer(lr=1e-2, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                               grad_clip=1.0)
    fns = build_step_functions(graphdef, params, optimizer,
                               grpo.LossConfig(use_kl_loss=True, kl_coef=0.1), mesh,
                               response_len=R)
    params = put_global(host_params, fns.param_shardings)
    opt_state = init_opt_state(optimizer, params, fns.opt_shardings)
    rows = batch_sharding(mesh, 2)
    batch = put_global(host_batch(), TrainBatch(rows, rows, rows, batch_sharding(mesh, 1),
                                                rows, rows))
    params, opt_state, metrics = fns.update(params, opt_state, batch)
    return metrics, params
