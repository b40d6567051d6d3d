"""A model ready to sample: its tokenizer, parameters on a mesh, and samplers by token budget."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxzero.io.identity import identify
from jaxzero.io.model_dir import load_params
from jaxzero.model.qwen2 import ModelOptions, abstract_model
from jaxzero.model.sampler import Sampler
from jaxzero.parallel.sharding import make_mesh, param_shardings


class LoadedModel:
    """A model ready to sample: its tokenizer, sharded parameters and a sampler factory."""

    def __init__(self, path: str, *, dtype: str = "bfloat16", step: int | None = None):
        self.identity = identify(path)
        self.config = self.identity.config
        self.tokenizer = self.identity.tokenizer
        self.mesh = make_mesh(1, -1, 1)
        options = ModelOptions(param_dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(dtype),
                               platform=jax.default_backend())
        self.graphdef, abstract = abstract_model(self.config, options)
        _, self.params = load_params(self.identity.source.path, step=step, param_dtype=dtype,
                                     shardings=param_shardings(abstract, self.mesh))
        self._samplers: dict[int, Sampler] = {}

    def sampler(self, max_new_tokens: int, buckets=(128, 256, 512, 1024, 2048, 4096)) -> Sampler:
        if max_new_tokens not in self._samplers:
            self._samplers[max_new_tokens] = Sampler(
                self.graphdef, self.config, max_new_tokens=max_new_tokens,
                stop_ids=self.identity.stop_ids, pad_id=self.identity.pad_id,
                buckets=buckets, mesh=self.mesh)
        return self._samplers[max_new_tokens]

    def encode(self, texts: list[str], chat: bool) -> list[list[int]]:
        return self.identity.encode(texts, chat=chat)

    def greedy_texts(self, prompt_ids: list[list[int]], *, max_new_tokens: int,
                     batch_size: int) -> tuple[list[str], list[int]]:
        """Greedy completions and their token counts, `batch_size` prompts per sampler call."""
        import jax

        from jaxzero.diagnosis.evaluate import generate_texts
        sampler = self.sampler(max_new_tokens)
        greedy = lambda params, chunk: sampler.generate(params, chunk, key=jax.random.key(0),
                                                        n=1, temperature=0.0)
        return generate_texts(greedy, self.params, prompt_ids, self.tokenizer, batch_size)
