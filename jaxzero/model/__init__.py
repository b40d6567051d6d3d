"""The Qwen2 model: its architecture config, rotary embeddings (default, YaRN), the NNX modules
with a KV cache, and the sampler.

The shape vocabulary of the whole package is stated once, in `qwen2.py`'s docstring.
"""

from jaxzero.model.config import PRESETS, Qwen2Config
from jaxzero.model.qwen2 import KVCache, ModelOptions, Qwen2ForCausalLM, abstract_model, init_model
from jaxzero.model.sampler import SampleOutput, Sampler, SamplingParams

__all__ = ["PRESETS", "KVCache", "ModelOptions", "Qwen2Config", "Qwen2ForCausalLM",
           "SampleOutput", "Sampler", "SamplingParams", "abstract_model", "init_model"]
