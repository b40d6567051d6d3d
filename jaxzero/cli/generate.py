"""`jaxzero generate`: completions from an HF dir, hub id, converted dir or training run."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from jaxzero.errors import JaxzeroError
from jaxzero.model.qwen2 import ModelOptions, abstract_model
from jaxzero.io.model_dir import load_params, resolve_source
from jaxzero.model.sampler import Sampler, finish_reasons
from jaxzero.parallel.sharding import make_mesh, param_shardings, to_host
from jaxzero.io.tokenizer import load_tokenizer, stop_token_ids


class LoadedModel:
    """A model ready to sample: its tokenizer, sharded parameters and a sampler factory."""

    def __init__(self, path: str, *, dtype: str = "bfloat16", step: int | None = None):
        import jax.numpy as jnp
        source = resolve_source(path)
        self.config = source.config
        self.tokenizer = load_tokenizer(source.tokenizer_dir)
        self.mesh = make_mesh(1, -1, 1)
        options = ModelOptions(param_dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype))
        self.graphdef, abstract = abstract_model(self.config, options)
        _, self.params = load_params(source.path, step=step, param_dtype=dtype,
                                     shardings=param_shardings(abstract, self.mesh))
        self._samplers: dict[int, Sampler] = {}

    def sampler(self, max_new_tokens: int, buckets=(128, 256, 512, 1024, 2048, 4096)) -> Sampler:
        if max_new_tokens not in self._samplers:
            pad = self.tokenizer.pad_token_id
            self._samplers[max_new_tokens] = Sampler(
                self.graphdef, self.config, max_new_tokens=max_new_tokens,
                stop_ids=stop_token_ids(self.tokenizer),
                pad_id=pad if pad is not None else self.tokenizer.eos_token_id,
                buckets=buckets, mesh=self.mesh)
        return self._samplers[max_new_tokens]

    def encode(self, texts: list[str], chat: bool) -> list[list[int]]:
        if chat:
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                        add_generation_prompt=True,
                                                        tokenize=False) for t in texts]
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]


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


def run_generate_cli(args) -> None:
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
            print(json.dumps({"prompt_index": p, "sample_index": s, "text": text,
                              "token_ids": token_ids,
                              "logprobs": [round(float(x), 6) for x in
                                           logprobs[row, : lengths[row]]],
                              "finish_reason": reasons[row]}, ensure_ascii=False))
        else:
            print(f"=== prompt {p} sample {s} ({reasons[row]}, {lengths[row]} tokens)\n{text}")
