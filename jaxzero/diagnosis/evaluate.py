"""Greedy generation over a test split, scored by the matching rule (used in training and by
`jaxzero eval`, which adds the LLM-judge protocol on top)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxzero.diagnosis import reward
from jaxzero.diagnosis.analysis import analyze_response, summarize
from jaxzero.parallel.sharding import to_host


@dataclasses.dataclass(frozen=True)
class EvalResult:
    prompts: list[str]
    completions: list[str]
    scores: list[float]
    labels: list[list[str]]
    lengths: list[int]
    metrics: dict[str, float]


def generate_texts(generate_fn, params, prompt_ids: list[list[int]], tokenizer,
                   batch_size: int) -> tuple[list[str], list[int]]:
    """Completions for every prompt, `batch_size` at a time; the last batch is padded with
    repeats of its first prompt so every call has the same shape (one compile)."""
    texts, lengths = [], []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start: start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (min(batch_size, len(prompt_ids)) - real)
        out = generate_fn(params, chunk)
        tokens, lens = to_host(out.tokens)[:real], to_host(out.lengths)[:real]
        texts += tokenizer.batch_decode([t[:n].tolist() for t, n in zip(tokens, lens)],
                                        skip_special_tokens=True)
        lengths += [int(n) for n in lens]
    return texts, lengths


def evaluate_records(generate_fn, params, records: list[dict], tokenizer, *,
                     reward_kwargs: dict, limit: int | None = None,
                     batch_size: int = 64) -> EvalResult:
    """Greedy completions for the records, with reward, accuracy and format rates."""
    records = records[:limit] if limit else records
    if not records:
        return EvalResult([], [], [], [], [], {})
    texts, lengths = generate_texts(generate_fn, params,
                                    [r["prompt_token_ids"] for r in records], tokenizer,
                                    batch_size)
    labels = [r["labels"] for r in records]
    scores = np.asarray(reward.score_batch(texts, labels, **reward_kwargs), np.float32)
    metrics = {
        "reward_mean": float(scores.mean()),
        "accuracy": float((scores >= reward_kwargs["score"]).mean()),
        "response_length_mean": float(np.mean(lengths)),
    }
    metrics.update(summarize([analyze_response(t) for t in texts]))
    prompts = [r.get("prompt", "") for r in records]
    return EvalResult(prompts, texts, [float(s) for s in scores], labels, lengths, metrics)


def _checkpoints(path: str) -> list[tuple[str, int | None]]:
    """A run or converted dir expands to each of its checkpoint steps; anything else is one."""
    from pathlib import Path
    from jaxzero.io.checkpoint import CheckpointStore
    ckpt = Path(path) / "checkpoints"
    if ckpt.is_dir():
        steps = CheckpointStore(ckpt).all_steps()
        if steps:
            return [(path, s) for s in steps]
    return [(path, None)]


def _judge(args, out_dir, reward_cfg):
    from jaxzero.errors import JaxzeroError
    from jaxzero.diagnosis.judge import JudgeCache, LocalJudge, OpenAIJudge, RuleJudge
    cache = JudgeCache(out_dir / "judge_cache.jsonl")
    if args.judge == "none":
        return RuleJudge(reward_cfg.threshold, reward_cfg.matcher)
    if not args.judge_model:
        raise JaxzeroError(f"--judge {args.judge} needs --judge-model")
    if args.judge == "openai":
        if not args.judge_url:
            raise JaxzeroError("--judge openai needs --judge-url (e.g. http://localhost:8000/v1)")
        return OpenAIJudge(args.judge_url, args.judge_model,
                           api_key_env=args.judge_api_key_env, cache=cache)
    from jaxzero.cli.generate import LoadedModel
    judge_model = LoadedModel(args.judge_model, dtype=args.dtype)

    def generate_fn(prompts: list[str]) -> list[str]:
        ids = judge_model.encode(prompts, chat=True)
        sampler = judge_model.sampler(args.judge_max_new_tokens)
        greedy = lambda p, chunk: sampler.generate(p, chunk, key=_key0(), n=1, temperature=0.0)
        return generate_texts(greedy, judge_model.params, ids, judge_model.tokenizer,
                              args.batch_size)[0]
    return LocalJudge(generate_fn, f"local:{args.judge_model}", cache=cache)


def _key0():
    import jax
    return jax.random.key(0)


def run_eval_cli(args) -> None:
    """`jaxzero eval`: generate greedily per checkpoint, score by rule and judge, report."""
    from pathlib import Path
    from jaxzero.config.schema import RewardConfig
    from jaxzero.diagnosis.report import score_checkpoint, top5_prompt, write_report
    from jaxzero.cli.generate import LoadedModel
    from jaxzero.diagnosis.hypernyms import load_hypernyms
    from jaxzero.diagnosis.rarearena import read_prepared
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_prepared(args.data)[: args.limit] if args.limit else read_prepared(args.data)
    reward_cfg = RewardConfig()
    hypernyms = load_hypernyms(args.hypernyms) if args.hypernyms else None
    judge = _judge(args, out_dir, reward_cfg)
    rows = []
    for path, step in [c for m in args.models for c in _checkpoints(m)]:
        model = LoadedModel(path, dtype=args.dtype, step=step)
        if args.top_k == 5:
            ids = model.encode([top5_prompt(r["case_text"]) for r in records], chat=True)
        else:
            ids = [r.get("prompt_token_ids") or model.encode([r["prompt"]], chat=True)[0]
                   for r in records]
        sampler = model.sampler(args.max_new_tokens)
        greedy = lambda p, chunk: sampler.generate(p, chunk, key=_key0(), n=1, temperature=0.0)
        texts, lengths = generate_texts(greedy, model.params, ids, model.tokenizer,
                                        args.batch_size)
        name = f"{path}@{step}" if step is not None else str(path)
        row, _ = score_checkpoint(name, records, texts, lengths, judge=judge,
                                  hypernyms=hypernyms, reward_cfg=reward_cfg,
                                  top_k=args.top_k, step=step)
        rows.append(row)
        print(f"{name}: {len(records)} cases scored")
    md, js = write_report(out_dir, rows)
    print(md.read_text())
    print(f"wrote {md} and {js}")
