"""One whole GRPO step on this CPU: jaxzero vs TRL's GRPOTrainer, on a Qwen2.5-0.5B-shaped model.

Random weights, 4 prompts x 4 rollouts, prompts of 120-128 tokens (the same token ids for both
systems, from the real Qwen2.5 tokenizer), 128 response tokens with the stop tokens ignored so
every rollout is full length, DiagnosisZero's matching reward, KL coefficient 0.001 (so the
reference model runs), entropy bonus 0.001, AdamW with weight decay 0.01 and clipping at 1.0,
one optimizer step per rollout batch. Each (system, dtype) runs in its own subprocess, so one's
memory and threads never disturb the other's timing; they alternate per dtype so the two
systems of a comparison are timed close together.

    /work/venv/bin/python benchmarks/grpo_step.py        # jaxzero f32, TRL f32 and bf16
    /work/venv/bin/python benchmarks/grpo_step.py --systems jaxzero,trl --dtypes float32 --steps 2
    /work/venv/bin/python benchmarks/grpo_step.py --new-tokens 16    # a quick look
    # reasoning-like lengths (50-1,024, benchmarks/length_mix.py), before and after:
    /work/venv/bin/python benchmarks/grpo_step.py --systems jaxzero --new-tokens 1024 \
        --length-mix 50 --layout padded
    /work/venv/bin/python benchmarks/grpo_step.py --systems jaxzero --new-tokens 1024 \
        --length-mix 50 --layout packed --skip-old-pass

The default takes about 9 minutes on an idle 2-core machine (TRL's float32 run alone is over 4)
and much longer on a busy one. Results and the exact commands: BENCHMARKS.md.

A step is timed after one warm-up step, best of `--steps`. jaxzero's warm-up is a full step
(it compiles; warm-up minus a steady step is reported as compile time). TRL's warm-up is a
step with `--trl-warmup-tokens` new tokens: it pays TRL's one-time costs (optimizer state,
allocator growth) without a second full-length generation. jaxzero's phases: rollout (prefill
+ decode), reward (decode to text, score, advantages), reference log-probs, old log-probs
(recomputed, jaxzero's default), update. TRL's come from wrappers around its own methods:
rollout (`_generate`), reward, reference log-probs (plus its batch preparation), and update
(the rest of the step: loss forward and backward over the micro-batches and the AdamW step).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SYSTEMS = ("jaxzero", "trl")
NO_STOP = -1  # a token id no model emits: jaxzero's "stop tokens ignored"
PRESET = "qwen2.5-0.5b"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# jaxzero's dtype modes: (param_dtype, compute_dtype). "bfloat16" keeps float32 master weights
# (the update needs them; bf16 AdamW steps of 1e-6 vanish), "bfloat16-pure" stores bf16.
JAX_MODES = {"float32": ("float32", "float32"), "bfloat16": ("float32", "bfloat16"),
             "bfloat16-pure": ("bfloat16", "bfloat16")}
# TRL's: (weights dtype, GRPOConfig.bf16 autocast). "bfloat16" is TRL's usual bf16 recipe
# (model_init_kwargs dtype=bfloat16 with bf16=True); "bfloat16-autocast" keeps f32 weights.
TRL_MODES = {"float32": ("float32", False), "bfloat16": ("bfloat16", True),
             "bfloat16-autocast": ("float32", True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--dtypes", default=None,
                   help="dtypes for every system (overrides the two below)")
    p.add_argument("--jaxzero-dtypes", default="float32",
                   help=f"of {', '.join(JAX_MODES)}; float32 is jaxzero's fastest here")
    p.add_argument("--trl-dtypes", default="float32,bfloat16",
                   help=f"of {', '.join(TRL_MODES)}")
    p.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up (best kept)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=4, help="rollouts per prompt")
    p.add_argument("--prompt-len", type=int, default=128, help="longest prompt, in tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--micro-batches", type=int, default=8,
                   help="jaxzero: update micro-batches; trl: gradient accumulation steps "
                        "(per_device_train_batch_size = prompts * n / this)")
    p.add_argument("--remat", action="store_true", help="jaxzero: rematerialise each block")
    p.add_argument("--trl-grad-ckpt", action="store_true",
                   help="trl: gradient checkpointing (GRPOConfig's default; off here to match "
                        "jaxzero, which does not remat)")
    p.add_argument("--trl-warmup-tokens", type=int, default=8,
                   help="trl: new tokens of the (untimed) warm-up step; 0: --new-tokens")
    p.add_argument("--sampler-logprobs", action="store_true",
                   help="jaxzero: use the sampler's log-probs as the old ones (TRL's default "
                        "skips the old pass too) instead of recomputing them")
    p.add_argument("--layers", type=int, default=None,
                   help="blocks of the model (default: the preset's 24); fewer for a small run")
    p.add_argument("--length-mix", type=int, default=None, metavar="LOW",
                   help="response lengths log-uniform on [LOW, --new-tokens], stops forced "
                        "there after sampling, the same for both systems "
                        "(benchmarks/length_mix.py); default: all full length")
    p.add_argument("--layout", choices=("padded", "trimmed", "packed"), default="padded",
                   help="jaxzero: the rows of the log-prob passes and the update (padded: "
                        "the sampler's batch as it is, the old default)")
    p.add_argument("--width-multiple", type=int, default=64,
                   help="jaxzero --layout trimmed and packed: row widths are multiples of this")
    p.add_argument("--pack-tokens", type=int, default=None,
                   help="jaxzero --layout packed: tokens per packed row (default: twice the "
                        "longest rollout)")
    p.add_argument("--logit-chunk", type=int, default=128,
                   help="jaxzero: response positions whose logits are formed at once "
                        "(grpo.logit_chunk); trimmed and packed rows skip empty chunks")
    p.add_argument("--skip-old-pass", action="store_true",
                   help="jaxzero: one update per step takes the current log-probs, detached, "
                        "as the old ones (no old-log-prob pass)")
    p.add_argument("--retries", type=int, default=1,
                   help="reruns of a worker the kernel killed (the OOM killer, on a shared box)")
    p.add_argument("--skip-hardware", action="store_true", help="no matmul probe (no MFU)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "system:dtype"
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- shared


def model_config(layers: int | None = None):
    """The preset's shape, with `layers` blocks if given (a smaller run of the same widths)."""
    import dataclasses
    from jaxzero.model.config import preset
    cfg = preset(PRESET)
    return cfg if layers is None else dataclasses.replace(cfg, num_hidden_layers=layers)


def make_prompts(tokenizer, count: int, max_len: int):
    """(token ids, labels) of `count` chat prompts of at most max_len tokens, the longest exactly
    max_len when the case allows: demo cases cut word by word to fit."""
    from jaxzero.diagnosis.demo_data import demo_cases_path
    cases = [json.loads(line) for line in demo_cases_path().read_text("utf-8").splitlines()]
    out = []
    for case in (cases * (count // len(cases) + 1))[:count]:
        words = f"{case['case_report']} {case['test_results']}".split()
        while words:
            user = ("Give the diagnosis of this case inside <answer> </answer> tags. "
                    + " ".join(words))
            text = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text)["input_ids"]
            if len(ids) <= max_len:
                break
            words.pop()
        if not words:
            raise ValueError(f"no prompt fits in {max_len} tokens")
        out.append((text, ids, [case["diagnosis"].lower()]))
    return out


def flops_forward(cfg, rows: int, seq: int, scored: int) -> float:
    """Model FLOPs of one forward pass over rows x seq tokens, with logits at `scored` positions
    per row (`length_mix.sequence_flops`)."""
    from benchmarks.length_mix import sequence_flops
    return rows * sequence_flops(cfg, seq, scored)


def update_flops(cfg, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Forward + backward (2x the forward) of the loss, with no rematerialisation counted."""
    return 3 * flops_forward(cfg, rows, prompt_len + new_tokens, new_tokens)


def mix_lengths(args, count: int):
    """--length-mix's response lengths: the same draw every step and for both systems, so
    every timed step does the same work."""
    from benchmarks.length_mix import draw_lengths
    return draw_lengths(0, count, args.length_mix, args.new_tokens)


def load_tokenizer():
    from jaxzero.io.tokenizer import demo_tokenizer_dir, load_tokenizer as load
    return load(demo_tokenizer_dir())


# ----------------------------------------------------------------------------- jaxzero


def run_jaxzero(args, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks import length_mix
    from jaxzero.rl import grpo, layout
    from jaxzero.diagnosis import reward
    from jaxzero.model.qwen2 import ModelOptions, init_model
    from jaxzero.rl.rollout import response_mask
    from jaxzero.model.sampler import Sampler
    from jaxzero.parallel.sharding import batch_sharding, make_mesh, put_global
    from jaxzero.rl.train_step import TrainBatch, build_step_functions, init_opt_state, make_optimizer

    cfg = model_config(args.layers)
    tokenizer = load_tokenizer()
    prompts = make_prompts(tokenizer, args.prompts, args.prompt_len)
    prompt_ids = [ids for _, ids, _ in prompts]
    labels_B = [labels for _, _, labels in prompts for _ in range(args.n)]
    param_dtype, compute_dtype = JAX_MODES[dtype]

    t0 = time.perf_counter()
    mesh = make_mesh(1, 1, 1)
    options = ModelOptions(jnp.dtype(param_dtype), jnp.dtype(compute_dtype), remat=args.remat)
    graphdef, params = nnx.split(init_model(cfg, options, seed=0))
    optimizer = make_optimizer(lr=1e-6, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                               grad_clip=1.0)
    loss_config = grpo.LossConfig(kl_coef=0.001, entropy_coeff=0.001, agg="token-mean",
                                  kl_kind="low_var_kl")
    fns = build_step_functions(graphdef, params, optimizer, loss_config, mesh,
                               response_len=args.new_tokens, micro_batches=args.micro_batches,
                               logit_chunk=args.logit_chunk)
    params = jax.device_put(params, fns.param_shardings)
    # The reference must be its own buffers: the update donates (overwrites) the policy's.
    ref_params = jax.tree.map(jnp.copy, params)
    opt_state = init_opt_state(optimizer, params, fns.opt_shardings)
    sampler = Sampler(graphdef, cfg, max_new_tokens=args.new_tokens, stop_ids=(NO_STOP,),
                      pad_id=tokenizer.pad_token_id, buckets=(args.prompt_len,), mesh=mesh)
    jax.block_until_ready((params, ref_params, opt_state))
    setup_s = time.perf_counter() - t0
    rows = lambda x, ndim=2: put_global(x, batch_sharding(mesh, ndim))
    state = {"params": params, "opt_state": opt_state}
    base_key = jax.random.key(0)

    def lay_out(valid_BT):
        if args.layout == "trimmed":
            return layout.trimmed(valid_BT, args.new_tokens, micro_batches=args.micro_batches,
                                  width_multiple=args.width_multiple)
        width = args.pack_tokens or 2 * (args.prompt_len + args.new_tokens)
        return layout.packed(valid_BT, args.new_tokens, width=width, rows=1,
                             micro_batches=len(valid_BT), width_multiple=args.width_multiple)

    def laid_out_passes(host, tokens_BT, valid_BT, mask_BR, adv_B, times):
        """The log-prob passes and the update on trimmed or packed rows; (metrics, the
        update's FLOP share spent on padding)."""
        lay = lay_out(valid_BT)
        model_rows = put_global(lay.rows_of(tokens_BT), fns.row_shardings)
        t = time.perf_counter()
        ref_logp = fns.row_logprobs(ref_params, model_rows).block_until_ready()
        times["reference"] = time.perf_counter() - t
        t = time.perf_counter()
        if args.sampler_logprobs:
            old_logp = put_global(lay.scatter(host.logprobs), fns.row_loss_shardings.old_logp_MBN)
        elif args.skip_old_pass:
            old_logp = None
        else:
            old_logp = fns.row_logprobs(state["params"], model_rows).block_until_ready()
        times["old_logprobs"] = time.perf_counter() - t
        t = time.perf_counter()
        loss = lay.loss_of(mask_BR, adv_B, loss_config)
        loss = loss._replace(**{f: put_global(getattr(loss, f), getattr(fns.row_loss_shardings, f))
                                for f in loss._fields[:3]},
                             old_logp_MBN=old_logp, ref_logp_MBN=ref_logp)
        state["params"], state["opt_state"], metrics = fns.row_update(
            state["params"], state["opt_state"], model_rows, loss)
        metrics = jax.device_get(metrics)
        times["update"] = time.perf_counter() - t
        computed = length_mix.layout_flops(cfg, lay, model_rows.live_M, chunk=args.logit_chunk)
        return metrics, computed

    def step(index: int) -> dict:
        times = {}
        t = time.perf_counter()
        out = sampler.generate(state["params"], prompt_ids, key=jax.random.fold_in(base_key, index),
                               n=args.n, temperature=1.0, top_p=1.0, top_k=0)
        host = jax.tree.map(np.asarray, out)
        if args.length_mix is not None:
            host = length_mix.force_stops(host, mix_lengths(args, len(host.tokens)),
                                          tokenizer.pad_token_id)
        times["rollout"] = time.perf_counter() - t

        t = time.perf_counter()
        texts = tokenizer.batch_decode([row[:n].tolist() for row, n in
                                        zip(host.tokens, host.lengths)], skip_special_tokens=True)
        scores_B = reward.score_batch(texts, labels_B)
        adv_B = np.asarray(grpo.group_advantages(scores_B, args.n, eps=1e-6, scale_by_std=True),
                           np.float32)
        mask_BR = response_mask(host.mask, ~host.stopped, mask_truncated=False)
        tokens_BT = np.concatenate([host.prompt_tokens, host.tokens], axis=1)
        valid_BT = np.concatenate([host.prompt_mask, host.mask], axis=1)
        times["reward"] = time.perf_counter() - t

        plen_B = host.prompt_mask.sum(-1)
        useful = length_mix.useful_flops(cfg, plen_B, host.lengths)
        if args.layout == "padded":
            metrics = padded_passes(host, tokens_BT, valid_BT, mask_BR, adv_B, times)
            computed = length_mix.padded_flops(cfg, *tokens_BT.shape, args.new_tokens)
        else:
            metrics, computed = laid_out_passes(host, tokens_BT, valid_BT, mask_BR, adv_B, times)
        times["step"] = sum(times.values())
        if args.length_mix is None:
            assert int(host.lengths.sum()) == len(prompt_ids) * args.n * args.new_tokens, \
                "every rollout must be full length"
        assert np.isfinite(metrics["loss"]) and not metrics["skipped"], metrics
        times["padding_flops"] = 1.0 - useful / computed
        times["useful_tflop"] = useful / 1e12
        times["real_tokens"] = float(host.lengths.sum())
        return times

    def padded_passes(host, tokens_BT, valid_BT, mask_BR, adv_B, times):
        t = time.perf_counter()
        tokens_dev, valid_dev = rows(tokens_BT), rows(valid_BT)
        ref_logp = fns.logprobs(ref_params, tokens_dev, valid_dev).block_until_ready()
        times["reference"] = time.perf_counter() - t

        t = time.perf_counter()
        if args.sampler_logprobs:
            old_logp = rows(host.logprobs)
        elif args.skip_old_pass:
            old_logp = None
        else:
            old_logp = fns.logprobs(state["params"], tokens_dev, valid_dev).block_until_ready()
        times["old_logprobs"] = time.perf_counter() - t

        t = time.perf_counter()
        batch = TrainBatch(tokens_dev, valid_dev, rows(mask_BR), rows(adv_B, 1), old_logp,
                           ref_logp)
        state["params"], state["opt_state"], metrics = fns.update(
            state["params"], state["opt_state"], batch)
        metrics = jax.device_get(metrics)
        times["update"] = time.perf_counter() - t
        return metrics

    return timed_steps("jaxzero", dtype, step, args, setup_s,
                       note=f"params {param_dtype}, compute {compute_dtype}, "
                            f"micro_batches {args.micro_batches}, remat {args.remat}, "
                            f"layout {args.layout}, old pass "
                            f"{'skipped' if args.skip_old_pass else 'sampler' if args.sampler_logprobs else 'recomputed'}")


# ----------------------------------------------------------------------------- TRL


def run_trl(args, dtype: str) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from jaxzero.diagnosis import reward

    torch.set_num_threads(os.cpu_count())
    cfg = model_config(args.layers)
    tokenizer = load_tokenizer()
    prompts = make_prompts(tokenizer, args.prompts, args.prompt_len)
    weights_dtype, autocast_bf16 = TRL_MODES[dtype]
    batch = args.prompts * args.n
    if batch % args.micro_batches:
        raise ValueError(f"--micro-batches {args.micro_batches} must divide {batch} rollouts")

    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="grpo_step_trl_")
    # TRL builds its reference model from the policy's path, so the random model is saved first.
    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                         if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    Qwen2ForCausalLM(hf_cfg).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model = Qwen2ForCausalLM.from_pretrained(tmp, dtype=getattr(torch, weights_dtype))

    dataset = Dataset.from_dict({"prompt": [text for text, _, _ in prompts],
                                 "labels": [labels for _, _, labels in prompts]})
    expected = [ids for _, ids, _ in prompts]
    assert [tokenizer(t)["input_ids"] for t in dataset["prompt"]] == expected

    def diagnosis_reward(prompts, completions, labels, **_):
        return reward.score_batch(completions, labels).tolist()

    config = GRPOConfig(
        output_dir=tmp, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
        use_cpu=True, bf16=autocast_bf16, seed=0, max_steps=1 + args.steps,
        per_device_train_batch_size=batch // args.micro_batches,
        gradient_accumulation_steps=args.micro_batches,
        gradient_checkpointing=args.trl_grad_ckpt,
        num_generations=args.n, max_completion_length=args.new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        # Forbids the eos ids for all new tokens: full-length rollouts, as jaxzero's.
        generation_kwargs={"min_new_tokens": args.new_tokens},
        beta=0.001, entropy_coef=0.001, loss_type="dapo", epsilon=0.2, num_iterations=1,
        learning_rate=1e-6, lr_scheduler_type="constant", weight_decay=0.01,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0)

    def set_new_tokens(count: int):
        # The trainer keeps its sampling settings twice: the GenerationConfig it passes to
        # generate() and the kwargs it lays over the model's own config.
        trainer.generation_kwargs.update(max_new_tokens=count, min_new_tokens=count)
        trainer.generation_config.max_new_tokens = count
        trainer.generation_config.min_new_tokens = count

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.phases, self._t0 = [], [], 0.0

        def on_step_begin(self, args_, state, control, **_):
            self._t0 = time.perf_counter()
            phases.clear()

        def on_step_end(self, args_, state, control, **_):
            self.times.append(time.perf_counter() - self._t0)
            self.phases.append(dict(phases))
            set_new_tokens(args.new_tokens)  # after a short warm-up step, the real length

    timer = StepTimer()
    phases: dict[str, float] = {}
    trainer = GRPOTrainer(model=model, reward_funcs=diagnosis_reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])

    def timed(fn, name_of):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            name = name_of(*a, **kw)
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    def logp_phase(model_, *_, **__):
        if torch.is_grad_enabled():
            return "loss_forward"
        return "reference" if model_ is trainer.ref_model else "old_logprobs"

    lengths: list[list[int]] = []

    def generate(*a, **kw):
        out = list(trainer_generate(*a, **kw))  # (prompt_ids, completion_ids, _, texts, ...)
        if args.length_mix is not None:
            # As jaxzero's forced stops: row b ends at its drawn length with an eos, so TRL
            # pads its batch to the longest, as when its model stops there itself.
            eos = tokenizer.eos_token_id
            cut = [ids[:min(n, len(ids)) - 1] + [eos]
                   for ids, n in zip(out[1], mix_lengths(args, len(out[1])))]
            out[1], out[3] = cut, tokenizer.batch_decode(cut, skip_special_tokens=True)
        lengths.append([len(ids) for ids in out[1]])
        return tuple(out)

    trainer_generate = trainer._generate
    trainer._generate = timed(generate, lambda *_, **__: "rollout")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, lambda *_, **__: "reward")
    trainer._get_per_token_logps_and_entropies = timed(
        trainer._get_per_token_logps_and_entropies, logp_phase)
    trainer._generate_and_score_completions = timed(
        trainer._generate_and_score_completions, lambda *_, **__: "generate_and_score")
    setup_s = time.perf_counter() - t0

    if args.trl_warmup_tokens:
        set_new_tokens(args.trl_warmup_tokens)
    trainer.train()
    steps = []
    for total, ph, call_lengths in zip(timer.times, timer.phases, lengths):
        other = ph.get("generate_and_score", 0.0) - sum(
            ph.get(k, 0.0) for k in ("rollout", "reward", "reference", "old_logprobs"))
        steps.append({"rollout": ph.get("rollout", 0.0), "reward": ph.get("reward", 0.0),
                      "reference": ph.get("reference", 0.0) + other,
                      "old_logprobs": ph.get("old_logprobs", 0.0),
                      "update": total - ph.get("generate_and_score", 0.0),
                      "loss_forward": ph.get("loss_forward", 0.0), "step": total,
                      "real_tokens": float(sum(call_lengths))})
    want = (mix_lengths(args, batch).tolist() if args.length_mix is not None
            else [args.new_tokens] * batch)
    assert all(call == want for call in lengths[1:]), (lengths, want)
    result = summarise("trl", dtype, steps, setup_s,
                       note=f"weights {weights_dtype}, bf16 autocast {autocast_bf16}, "
                            f"per_device_train_batch_size {batch // args.micro_batches} x "
                            f"gradient_accumulation_steps {args.micro_batches}, "
                            f"gradient_checkpointing {args.trl_grad_ckpt}")
    if not args.skip_hardware:
        from benchmarks import hardware
        result["matmul_tflops"] = hardware.torch_matmul_tflops(
            "bfloat16" if weights_dtype == "bfloat16" or autocast_bf16 else "float32")
    return result


# ----------------------------------------------------------------------------- timing


def summarise(system: str, dtype: str, steps: list[dict], setup_s: float, note: str) -> dict:
    """The warm-up step (the first) and the best of the rest, with its phases. The warm-up
    minus the best step estimates jaxzero's compile time; TRL's warm-up is a shorter step."""
    if len(steps) < 2:
        raise RuntimeError(f"{system}: {len(steps)} steps recorded; need a warm-up and one more")
    warm, timed = steps[0], steps[1:]
    best = min(timed, key=lambda s: s["step"])
    return {"system": system, "dtype": dtype, "step_s": best["step"], "phases": best,
            "all_steps_s": [round(s["step"], 2) for s in steps],
            "warmup": warm, "setup_s": setup_s,
            "compile_s": warm["step"] - best["step"] if system == "jaxzero" else None,
            "note": note}


def timed_steps(system: str, dtype: str, step, args, setup_s: float, note: str) -> dict:
    steps = []
    for index in range(1 + args.steps):
        steps.append(step(index))
        print(f"  {system} {dtype} step {index}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in steps[-1].items()), flush=True)
    result = summarise(system, dtype, steps, setup_s, note)
    if not args.skip_hardware:
        from benchmarks import hardware
        # The update's own matmul dtype: bf16 compute for the bf16 modes.
        result["matmul_tflops"] = hardware.xla_matmul_tflops(JAX_MODES[dtype][1])
    return result


def worker(args) -> None:
    sys.path.insert(0, ROOT)
    system, dtype = args.worker.split(":")
    result = {"jaxzero": run_jaxzero, "trl": run_trl}[system](args, dtype)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def spawn(system: str, dtype: str, argv: list[str], retries: int) -> dict | None:
    """Runs one (system, dtype) in a fresh process; its stdout is passed through."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", f"{system}:{dtype}"]
    for attempt in range(1 + retries):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        result = None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            else:
                print(line, end="", flush=True)
        if proc.wait() == 0:
            return result
        killed = proc.returncode == -9
        print(f"{system} {dtype}: FAILED (exit code {proc.returncode}"
              f"{', killed: out of memory?' if killed else ''})", flush=True)
        if not killed or attempt == retries:
            return None
        time.sleep(30)
        print(f"{system} {dtype}: retrying", flush=True)
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, ROOT)  # benchmarks.length_mix, for the FLOP counts
    argv = sys.argv[1:] if argv is None else argv
    systems = args.systems.split(",")
    wanted = {"jaxzero": (args.dtypes or args.jaxzero_dtypes).split(","),
              "trl": (args.dtypes or args.trl_dtypes).split(",")}
    for s in systems:
        if s not in SYSTEMS:
            raise SystemExit(f"unknown system {s!r}; choose from {SYSTEMS}")
        modes = JAX_MODES if s == "jaxzero" else TRL_MODES
        for d in wanted[s]:
            if d not in modes:
                raise SystemExit(f"unknown {s} dtype {d!r}; choose from {tuple(modes)}")
    # One dtype at a time, both systems back to back, so a comparison shares the machine's load.
    dtypes = list(dict.fromkeys(d for s in systems for d in wanted[s]))
    cfg = model_config(args.layers)
    print(f"grpo_step: {PRESET}-shaped random weights, {cfg.num_hidden_layers} layers, "
          f"{args.prompts} prompts x {args.n} rollouts, "
          f"prompts <= {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for dtype in dtypes:
        for system in systems:
            if dtype not in wanted[system]:
                continue
            t0 = time.perf_counter()
            r = spawn(system, dtype, argv, args.retries)
            if r is None:
                continue
            results.append(r)
            ph = r["phases"]
            print(f"{system:8s} {dtype:17s} step {r['step_s']:7.2f} s  (" + ", ".join(
                f"{k} {ph[k]:.2f}" for k in ("rollout", "reward", "reference", "old_logprobs",
                                             "update")) +
                  f")  warm-up {r['warmup']['step']:.1f} s, "
                  + (f"compile ~{r['compile_s']:.1f} s, " if r["compile_s"] is not None else "")
                  + (f"loss forward {ph['loss_forward']:.2f} s, " if "loss_forward" in ph else "")
                  + (f"padding {ph['padding_flops']:.1%} of the passes' FLOPs, "
                     if "padding_flops" in ph else "")
                  + f"{ph['real_tokens'] / r['step_s']:.1f} real tokens/s, "
                  + f"setup {r['setup_s']:.0f} s, "
                  f"wall {time.perf_counter() - t0:.0f} s, peak RSS {r['peak_rss_gib']:.1f} GiB; "
                  f"{r['note']}; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)

    flops = update_flops(cfg, args.prompts * args.n, args.prompt_len, args.new_tokens)
    if args.length_mix is not None:  # the FLOPs the real tokens need, fwd + bwd (both
        # systems score the same lengths; jaxzero's run counts them)
        useful = [r["phases"]["useful_tflop"] for r in results if "useful_tflop" in r["phases"]]
        flops = 3 * useful[0] * 1e12 if useful else None
    mfu = {}
    for r in results:
        if "matmul_tflops" in r and flops is not None:
            achieved = flops / r["phases"]["update"] / 1e12
            mfu[(r["system"], r["dtype"])] = achieved / r["matmul_tflops"]
            print(f"update MFU {r['system']} {r['dtype']}: {flops / 1e12:.2f} TFLOP in "
                  f"{r['phases']['update']:.2f} s = {achieved:.3f} TFLOP/s of a measured "
                  f"{r['matmul_tflops']:.3f} TFLOP/s matmul = {achieved / r['matmul_tflops']:.1%}",
                  flush=True)
    f32 = {r["system"]: round(r["step_s"], 2) for r in results if r["dtype"] == "float32"}
    best: dict[str, dict] = {}
    for r in results:
        if r["system"] not in best or r["step_s"] < best[r["system"]]["step_s"]:
            best[r["system"]] = r
    if "jaxzero" in f32 and "trl" in f32:
        print(f"float32: jaxzero is {f32['trl'] / f32['jaxzero']:.2f}x TRL's speed", flush=True)
    if len(best) == 2:
        print(f"best vs best: jaxzero {best['jaxzero']['dtype']} {best['jaxzero']['step_s']:.2f} s"
              f", TRL {best['trl']['dtype']} {best['trl']['step_s']:.2f} s", flush=True)
    update_mfu = mfu.get(("jaxzero", "float32"))
    print(json.dumps({
        "bench": "grpo_step",
        "step_seconds": f32,
        "best_step_seconds": {k: round(v["step_s"], 2) for k, v in best.items()},
        "update_mfu": None if update_mfu is None else round(update_mfu, 4),
        "padding_flop_fraction": {r["system"]: round(r["phases"]["padding_flops"], 4)
                                  for r in results if "padding_flops" in r["phases"]},
        "real_tokens_per_s": {r["system"]: round(r["phases"]["real_tokens"] / r["step_s"], 2)
                              for r in results if "real_tokens" in r["phases"]},
    }))


if __name__ == "__main__":
    main()
