"""A model ready to sample: its tokenizer, parameters on a mesh, and samplers by token budget."""

from __future__ import annotations

import jax.numpy as jnp

from jaxzero.io.model_dir import load_params, resolve_source
from jaxzero.io.tokenizer import load_tokenizer, stop_token_ids
from jaxzero.model.qwen2 import ModelOptions, abstract_model
from jaxzero.model.sampler import Sampler
from jaxzero.parallel.sharding import make_mesh, param_shardings


class LoadedModel:
    """A model ready to sample: its tokenizer, sharded parameters and a sampler factory."""

    def __init__(self, path: str, *, dtype: str = "bfloat16", step: int | None = None):
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

    def greedy_texts(self, prompt_ids: list[list[int]], *, max_new_tokens: int,
                     batch_size: int) -> tuple[list[str], list[int]]:
        """Greedy completions and their token counts, `batch_size` prompts per sampler call."""
        import jax

        from jaxzero.diagnosis.evaluate import generate_texts
        sampler = self.sampler(max_new_tokens)
        greedy = lambda params, chunk: sampler.generate(params, chunk, key=jax.random.key(0),
                                                        n=1, temperature=0.0)
        return generate_texts(greedy, self.params, prompt_ids, self.tokenizer, batch_size)
