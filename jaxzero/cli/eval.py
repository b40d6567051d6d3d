"""`jaxzero eval`: greedy generation per model or checkpoint, scored by rule and judge."""

from __future__ import annotations

from pathlib import Path

from jaxzero.errors import JaxzeroError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="RareArena evaluation of one or more checkpoints",
                       description="Generate (greedy) for a test file with each model or "
                       "checkpoint, score by the matching rule and optionally an LLM judge "
                       "(RareArena protocol), and write report.md and report.json.")
    p.add_argument("models", nargs="+", help="HF dirs, jaxzero dirs or run dirs "
                   "(a run dir evaluates each of its checkpoints)")
    p.add_argument("--data", required=True, help="prepared test file (test.jsonl)")
    p.add_argument("--top-k", type=int, choices=[1, 5], default=1)
    p.add_argument("--judge", choices=["none", "openai", "local"], default="none")
    p.add_argument("--judge-url", help="openai judge: base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", help="openai judge model name, or local judge model path")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (never logged)")
    p.add_argument("--judge-max-new-tokens", type=int, default=512,
                   help="local judge: tokens its reply may take")
    p.add_argument("--hypernyms", help="RareArena orphanet_hypernym.json (for score 1)")
    p.add_argument("--out", default="eval_out", help="report directory")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N cases only")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.set_defaults(func=run)


def _make_judge(args, out_dir: Path, reward_cfg):
    """The judge the flags ask for; every model-based judge caches its verdicts in OUT."""
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
    from jaxzero.io.loaded import LoadedModel
    judge_model = LoadedModel(args.judge_model, dtype=args.dtype)

    def generate_fn(prompts: list[str]) -> list[str]:
        return judge_model.greedy_texts(judge_model.encode(prompts, chat=True),
                                        max_new_tokens=args.judge_max_new_tokens,
                                        batch_size=args.batch_size)[0]
    return LocalJudge(generate_fn, f"local:{args.judge_model}", cache=cache)


def run(args) -> None:
    from jaxzero.config.schema import RewardConfig
    from jaxzero.diagnosis.hypernyms import load_hypernyms
    from jaxzero.diagnosis.rarearena import read_prepared
    from jaxzero.diagnosis.report import score_checkpoint, top5_prompt, write_report
    from jaxzero.io.loaded import LoadedModel
    from jaxzero.io.model_dir import checkpoints_of
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_prepared(args.data)[: args.limit] if args.limit else read_prepared(args.data)
    reward_cfg = RewardConfig()
    hypernyms = load_hypernyms(args.hypernyms) if args.hypernyms else None
    judge = _make_judge(args, out_dir, reward_cfg)
    rows = []
    for path, step in [c for m in args.models for c in checkpoints_of(m)]:
        model = LoadedModel(path, dtype=args.dtype, step=step)
        if args.top_k == 5:
            ids = model.encode([top5_prompt(r["case_text"]) for r in records], chat=True)
        else:
            ids = [r.get("prompt_token_ids") or model.encode([r["prompt"]], chat=True)[0]
                   for r in records]
        texts, lengths = model.greedy_texts(ids, max_new_tokens=args.max_new_tokens,
                                            batch_size=args.batch_size)
        name = f"{path}@{step}" if step is not None else str(path)
        row, _ = score_checkpoint(name, records, texts, lengths, judge=judge,
                                  hypernyms=hypernyms, reward_cfg=reward_cfg,
                                  top_k=args.top_k, step=step)
        rows.append(row)
        print(f"{name}: {len(records)} cases scored")
    md, js = write_report(out_dir, rows)
    print(md.read_text())
    print(f"wrote {md} and {js}")
