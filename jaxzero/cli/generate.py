"""`jaxzero generate`: completions from an HF dir, hub id, converted dir or training run."""

from __future__ import annotations

import json
import math
from pathlib import Path

from jaxzero.errors import JaxzeroError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample completions with the jitted KV-cache sampler")
    p.add_argument("model", help="HF dir, hub id or jaxzero checkpoint/run dir")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 means off")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per completion")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=run)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise JaxzeroError(f"--prompts-file {path}: no such file")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not prompts:
        raise JaxzeroError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file F")
    return prompts


def run(args) -> None:
    from jaxzero.parallel.distributed import require_one_process
    require_one_process("generate")
    import jax

    from jaxzero.io.loaded import LoadedModel
    from jaxzero.model.sampler import finish_reasons
    from jaxzero.parallel.sharding import to_host
    prompts = _prompts(args)
    model = LoadedModel(args.model, dtype=args.dtype, step=args.step)
    ids = model.encode(prompts, args.chat)
    sampler = model.sampler(args.max_new_tokens)
    out = sampler.generate(model.params, ids, key=jax.random.key(args.seed), n=args.n,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    tokens, lengths = to_host(out.tokens), to_host(out.lengths)
    logprobs, reasons = to_host(out.logprobs), finish_reasons(to_host(out.stopped))
    for row in range(tokens.shape[0]):
        p, s = divmod(row, args.n)
        token_ids = tokens[row, : lengths[row]].tolist()
        text = model.tokenizer.decode(token_ids, skip_special_tokens=True)
        if args.json:
            print(json_record(p, s, text, token_ids, logprobs[row, : lengths[row]],
                              reasons[row]))
        else:
            print(f"=== prompt {p} sample {s} ({reasons[row]}, {lengths[row]} tokens)\n{text}")


def json_record(prompt_index: int, sample_index: int, text: str, token_ids: list[int],
                logprobs, finish_reason: str) -> str:
    """One completion as a JSON line; a non-finite log-prob (a model that emits NaN) is null,
    since JSON has no NaN."""
    return json.dumps({"prompt_index": prompt_index, "sample_index": sample_index,
                       "text": text, "token_ids": token_ids,
                       "logprobs": [round(float(x), 6) if math.isfinite(x) else None
                                    for x in logprobs],
                       "finish_reason": finish_reason}, ensure_ascii=False, allow_nan=False)
