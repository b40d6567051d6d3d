"""DiagnosisZero's task for the GRPO engine: RareArena cases, the matching reward, the response
analysis, the greedy eval, and the built-in demo's data and warm-up."""

from __future__ import annotations

from pathlib import Path

from jaxzero.diagnosis import reward
from jaxzero.diagnosis.analysis import analyze_response, summarize
from jaxzero.diagnosis.evaluate import evaluate_records
from jaxzero.diagnosis.rarearena import prepare_data, read_prepared, with_prompt_ids
from jaxzero.parallel import distributed
from jaxzero.rl.task import Evaluation, Sample, Task


def reward_kwargs(reward_cfg) -> dict:
    """The matching reward's settings, from the config's reward section."""
    r = reward_cfg
    return dict(mode=r.mode, format_score=r.format_score, score=r.score,
                threshold=r.threshold, matcher=r.matcher)


def load_records(cfg, run_dir: Path, tokenizer
                 ) -> tuple[list[dict], list[dict], dict[str, Path | None]]:
    """(train, test) records, each with prompt_token_ids, and the files they came from; the
    demo prepares its packaged cases into run_dir/data first (on the main process, the
    others wait): see `demo_files`."""
    train_file, test_file = cfg.data.train_file, cfg.data.test_file
    if train_file is None:  # the demo (config validation guarantees it)
        files = demo_files(cfg, run_dir, tokenizer)
        train_file, test_file = files["train"], files["test"]
    train = with_token_ids(train_file, tokenizer, cfg.data.max_prompt_length)
    test = with_token_ids(test_file, tokenizer, cfg.data.max_prompt_length) \
        if test_file else []
    return train, test, {"train": Path(train_file), "test": Path(test_file) if test_file else None}


def demo_files(cfg, run_dir: Path, tokenizer) -> dict[str, Path]:
    """The demo's data files under run_dir/data: its packaged cases prepared and split as
    DiagnosisZero splits (data/prepared/), then train.jsonl and test.jsonl of the diseases
    GRPO learns and warmup.jsonl of every training case (`demo.demo_splits`)."""
    from jaxzero.diagnosis.demo import SPLITS, demo_splits
    from jaxzero.diagnosis.demo_data import demo_cases_path
    out = run_dir / "data"
    files = {name: out / f"{name}.jsonl" for name in SPLITS}

    def prepare():
        if not all(f.exists() for f in files.values()):
            prepare_data(demo_cases_path(), out / "prepared", tokenizer=tokenizer,
                         max_prompt_length=cfg.data.max_prompt_length, force=True)
            demo_splits(out / "prepared", out, cfg.demo.familiar_diseases)

    if distributed.is_main_process():
        prepare()
    distributed.sync("demo data")
    # Nothing to do where the run directory is the main process's; a remote run directory's
    # mirror on another host gets the same files here (the preparation is deterministic).
    prepare()
    return files


def with_token_ids(path, tokenizer, max_len):
    """Prepared records, tokenized here if prepared without a tokenizer; prompts over max_len
    are dropped and counted, as DiagnosisZero drops them."""
    records, dropped = with_prompt_ids(read_prepared(path), tokenizer, max_len, source=path)
    if dropped and distributed.is_main_process():
        print(f"{path}: dropped {dropped} prompts over data.max_prompt_length={max_len} tokens")
    return records


def _warmup(cfg, run_dir: Path, train: list[dict], tokenizer):
    """The demo's supervised warm-up, as a Task.warmup hook (None for real models): over the
    demo's warmup.jsonl, or over the training records when the config names its own files."""
    if not (cfg.model.demo and cfg.demo.warmup_steps):
        return None

    def warmup(graphdef, params, mesh, log):  # a fresh run's only: a resume reads nothing here
        from jaxzero.diagnosis.demo import run_warmup
        records = train if cfg.data.train_file else with_token_ids(
            run_dir / "data" / "warmup.jsonl", tokenizer, cfg.data.max_prompt_length)
        familiar = cfg.demo.familiar_diseases
        log(f"demo warm-up: {cfg.demo.warmup_steps} supervised steps over {len(records)} "
            f"training cases, {len(familiar)} familiar diseases answered rightly and the "
            "others at random (the first step compiles)")
        params, _ = run_warmup(
            graphdef, params, mesh, records=records, tokenizer=tokenizer, familiar=familiar,
            steps=cfg.demo.warmup_steps, lr=cfg.demo.warmup_lr,
            batch_size=cfg.demo.warmup_batch,
            prompt_len=max(cfg.data.prompt_buckets), response_len=cfg.rollout.max_new_tokens,
            logit_chunk=cfg.grpo.logit_chunk, seed=cfg.trainer.seed, log=log)
        return params

    return warmup


def analyze(texts) -> dict[str, float]:
    """format/ rates of a batch of responses (think/answer tags, language mixing)."""
    return {f"format/{k}": v for k, v in summarize([analyze_response(t) for t in texts]).items()}


def make_task(cfg, run_dir: Path, tokenizer) -> Task:
    """The diagnosis task of a run config: a TaskFactory for the trainer."""
    train, test, sources = load_records(cfg, Path(run_dir), tokenizer)
    kwargs = reward_kwargs(cfg.reward)
    shown = cfg.trainer.eval_examples_logged

    def decode(ids):
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    def score(texts, labels):
        return reward.score_batch(texts, labels, **kwargs)

    def evaluate(generate, params, records) -> Evaluation:
        result = evaluate_records(generate, params, list(records), tokenizer,
                                  reward_kwargs=kwargs)
        samples = tuple(Sample(p, c, s, lab) for p, c, s, lab in zip(
            result.prompts[:shown], result.completions[:shown], result.scores[:shown],
            result.labels[:shown]))
        return Evaluation(result.metrics, len(result.completions), samples)

    return Task(name="diagnosis", train_records=train, test_records=test, decode=decode,
                reward=score, target=lambda r: r["labels"], prompt_text=lambda r: r["prompt"],
                analyze=analyze, evaluate=evaluate, correct_score=cfg.reward.score,
                warmup=_warmup(cfg, Path(run_dir), train, tokenizer),
                sources=sources)
