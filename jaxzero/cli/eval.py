"""`jaxzero eval`: greedy generation per model or checkpoint, scored by rule and judge."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from jaxzero.errors import DataError, JaxzeroError

RUN_CONFIG = "config.yaml"
RAREARENA_HYPERNYMS = "benchmark_data/orphanet_hypernym.json"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="RareArena evaluation of one or more checkpoints",
                       description="Generate (greedy) for a test file with each model or "
                       "checkpoint, score by the matching rule and optionally an LLM judge "
                       "(RareArena's protocol by default), and write report.md and "
                       "report.json. Generations are kept in OUT/generations/ and verdicts "
                       "in OUT/judge_cache.jsonl, so a re-run only does what is missing.")
    p.add_argument("models", nargs="+", help="HF dirs, jaxzero dirs or run dirs "
                   "(a run dir evaluates each of its checkpoints, scored with the run's "
                   "reward settings)")
    p.add_argument("--data", required=True, help="prepared test file (test.jsonl)")
    p.add_argument("--top-k", type=int, choices=[1, 5], default=1)
    p.add_argument("--judge", choices=["none", "openai", "local"], default="none")
    p.add_argument("--judge-protocol", choices=["rarearena", "rarearena-2025", "jaxzero"],
                   help="model judges: rarearena (default; RareArena's eval_updated.py), "
                   "rarearena-2025 (its eval.py), or jaxzero's own rewritten prompt")
    p.add_argument("--rarearena-dir", help="a checkout of github.com/zhao-zy15/RareArena: the "
                   "rarearena protocols read their prompts from its eval/ scripts")
    p.add_argument("--judge-url", help="openai judge: base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", help="openai judge model name (RareArena's figures use "
                   "gpt-4o), or local judge model path")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (never logged)")
    p.add_argument("--judge-timeout", type=float, default=60.0,
                   help="openai judge: seconds one request may wait for the server")
    p.add_argument("--judge-retries", type=int, default=5,
                   help="openai judge: retries of a request that timed out or failed with "
                   "408/429/5xx; a hung server fails after about (retries + 1) x timeout")
    p.add_argument("--judge-max-new-tokens", type=int, default=512,
                   help="local judge: tokens its reply may take")
    p.add_argument("--keep-unparsed", action="store_true",
                   help="keep cached judge replies that did not parse (by default they are "
                   "asked again)")
    p.add_argument("--hypernyms", help="RareArena orphanet_hypernym.json (for score 1; the "
                   "rarearena protocol defaults to RAREARENA_DIR/" + RAREARENA_HYPERNYMS + ")")
    p.add_argument("--reward-mode", choices=["strict", "flexible"],
                   help="matching rule's answer mode (default: the run's reward.mode, else "
                   "strict)")
    p.add_argument("--matcher", choices=["rapidfuzz", "difflib"],
                   help="matching rule's matcher (default: the run's reward.matcher, else "
                   "rapidfuzz)")
    p.add_argument("--out", default="eval_out", help="report directory")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N cases only")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.set_defaults(func=run)


def _read_data(path: str) -> list[dict]:
    """The prepared records; a raw RareArena file gets told to go through prepare-data."""
    from jaxzero.diagnosis.rarearena import read_prepared
    try:
        return read_prepared(path)
    except DataError as err:
        try:
            with open(path, encoding="utf-8") as f:
                first = json.loads(next(line for line in f if line.strip()))
        except (OSError, UnicodeDecodeError, ValueError, StopIteration):
            raise err from None
        if isinstance(first, dict) and "prompt" not in first and (
                "_id" in first or "case_report" in first):
            raise DataError(f"{path} is a raw RareArena file, not prepared data: run "
                            f"`jaxzero prepare-data {path} DATA_DIR` first and pass "
                            "DATA_DIR/test.jsonl to --data") from None
        raise


def _reward_config(model: str, args):
    """The run's reward section (RUN/config.yaml) for a run dir, else the defaults; then the
    --reward-mode and --matcher flags. Returns (config, where it came from)."""
    from jaxzero.config.files import load_config
    from jaxzero.config.schema import RewardConfig
    saved = Path(model) / RUN_CONFIG
    cfg, source = (load_config(saved).reward, str(saved)) if saved.is_file() else (
        RewardConfig(), "defaults")
    flags = {k: v for k, v in (("mode", args.reward_mode), ("matcher", args.matcher))
             if v is not None}
    if flags:
        cfg = dataclasses.replace(cfg, **flags)
        source += " with " + ", ".join(f"{k}={v}" for k, v in flags.items())
    return cfg, source


def _protocol(args):
    """The judge protocol and hypernym table path; the protocol is None for --judge none."""
    from jaxzero.diagnosis.protocols import load_protocol
    if args.judge == "none":
        if args.judge_protocol is not None:
            raise JaxzeroError("--judge-protocol needs a model judge (--judge openai or local)")
        return None, args.hypernyms
    name = args.judge_protocol or "rarearena"
    protocol = load_protocol(name, args.rarearena_dir)
    hypernyms = args.hypernyms
    if name == "rarearena" and hypernyms is None:
        hypernyms = Path(args.rarearena_dir) / RAREARENA_HYPERNYMS
        if not hypernyms.is_file():
            raise DataError(f"the rarearena protocol needs the Orphanet hypernym table: "
                            f"{hypernyms} is missing; pass --hypernyms")
    return protocol, hypernyms


def _make_judge(args, out_dir: Path, protocol):
    """The model judge the flags ask for; it caches its replies in OUT/judge_cache.jsonl."""
    from jaxzero.diagnosis.judge import JudgeCache, LocalJudge, OpenAIJudge
    cache = JudgeCache(out_dir / "judge_cache.jsonl")
    if not args.judge_model:
        raise JaxzeroError(f"--judge {args.judge} needs --judge-model")
    retry = not args.keep_unparsed
    if args.judge == "openai":
        if not args.judge_url:
            raise JaxzeroError("--judge openai needs --judge-url (e.g. http://localhost:8000/v1)")
        if args.judge_timeout <= 0 or args.judge_retries < 0:
            raise JaxzeroError(f"--judge-timeout must be > 0 and --judge-retries >= 0, got "
                               f"{args.judge_timeout} and {args.judge_retries}")
        return OpenAIJudge(args.judge_url, args.judge_model, protocol,
                           api_key_env=args.judge_api_key_env, timeout_s=args.judge_timeout,
                           max_retries=args.judge_retries, cache=cache, retry_unparsed=retry)
    from jaxzero.io.loaded import LoadedModel
    judge_model = LoadedModel(args.judge_model, dtype=args.dtype)

    def generate_fn(prompts: list[str]) -> list[str]:
        return judge_model.greedy_texts(judge_model.encode(prompts, chat=True),
                                        max_new_tokens=args.judge_max_new_tokens,
                                        batch_size=args.batch_size)[0]
    return LocalJudge(generate_fn, f"local:{args.judge_model}", protocol,
                      max_new_tokens=args.judge_max_new_tokens, cache=cache,
                      retry_unparsed=retry)


def _generate(model, name: str, records, ids, store, args) -> tuple[list[str], list[int]]:
    """Greedy completions for every record, reusing the kept ones; each new batch is kept as
    soon as it is done. Every sampler call has the same batch size (one compile)."""
    from tqdm import tqdm
    todo = [i for i, r in enumerate(records) if store.get(r["id"], ids[i]) is None]
    width = min(args.batch_size, len(todo)) or 1
    with tqdm(total=len(records), initial=len(records) - len(todo), unit="case",
              desc=f"generating {name}", file=sys.stderr, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(todo), width):
            chunk = todo[start:start + width]
            batch = [ids[i] for i in chunk]
            texts, lengths = model.greedy_texts(batch + [batch[0]] * (width - len(batch)),
                                                max_new_tokens=args.max_new_tokens,
                                                batch_size=width)
            store.put_many([records[i]["id"] for i in chunk], batch, texts[:len(chunk)],
                           lengths[:len(chunk)])
            bar.update(len(chunk))
    kept = [store.get(r["id"], i) for r, i in zip(records, ids)]
    return [k[0] for k in kept], [k[1] for k in kept]


def _load(path: str, step: int | None, dtype: str):
    """The model, or for a checkpoint of a run or converted dir the one-line reason it cannot
    be loaded (a torn or corrupted step must not stop the other steps' evaluation)."""
    from jaxzero.io.loaded import LoadedModel
    if step is None:
        return LoadedModel(path, dtype=dtype), None
    try:
        return LoadedModel(path, dtype=dtype, step=step), None
    except Exception as err:   # orbax and tensorstore raise many types for a damaged step
        reason = " ".join(str(err).split())[:300]
        return None, f"{type(err).__name__}: {reason}"


def run(args) -> None:
    from jaxzero.parallel.distributed import require_one_process
    require_one_process("eval")
    from jaxzero.diagnosis.generations import GenerationStore
    from jaxzero.diagnosis.hypernyms import load_hypernyms
    from jaxzero.diagnosis.judge import RuleJudge
    from jaxzero.diagnosis.report import score_checkpoint, top5_prompt, write_report
    from jaxzero.io.model_dir import checkpoints_of
    records = _read_data(args.data)
    records = records[: args.limit] if args.limit else records
    protocol, hypernyms_path = _protocol(args)
    hypernyms = load_hypernyms(hypernyms_path) if hypernyms_path else None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_judge = _make_judge(args, out_dir, protocol) if protocol is not None else None
    if protocol is not None:
        print(f"judge: {model_judge.model_id}, protocol {protocol.version} ({protocol.source})")
    rows, skipped = [], []
    for model_arg in args.models:
        reward_cfg, reward_source = _reward_config(model_arg, args)
        print(f"{model_arg}: reward {reward_cfg.mode}/{reward_cfg.matcher} ({reward_source})")
        judge = model_judge or RuleJudge(reward_cfg.threshold, reward_cfg.matcher)
        for path, step in checkpoints_of(model_arg):
            name = f"{path}@{step}" if step is not None else str(path)
            model, error = _load(path, step, args.dtype)
            if model is None:
                print(f"jaxzero eval: skipping {name}: cannot load it ({error})",
                      file=sys.stderr)
                skipped.append({"checkpoint": name, "error": error})
                continue
            if args.top_k == 5:
                ids = model.encode([top5_prompt(r["case_text"]) for r in records], chat=True)
            else:
                ids = [r.get("prompt_token_ids") or model.encode([r["prompt"]], chat=True)[0]
                       for r in records]
            store = GenerationStore(out_dir, name, {"max_new_tokens": args.max_new_tokens,
                                                    "top_k": args.top_k, "dtype": args.dtype})
            texts, lengths = _generate(model, name, records, ids, store, args)
            row, _ = score_checkpoint(name, records, texts, lengths, judge=judge,
                                      hypernyms=hypernyms, reward_cfg=reward_cfg,
                                      top_k=args.top_k, step=step)
            rows.append(row)
            print(f"{name}: {len(records)} cases scored (generations in {store.path})")
    if not rows:
        raise JaxzeroError("no checkpoint could be loaded: " + "; ".join(
            f"{s['checkpoint']} ({s['error']})" for s in skipped))
    md, js = write_report(out_dir, rows, skipped)
    print(md.read_text())
    print(f"wrote {md} and {js}")
