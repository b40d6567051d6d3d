"""jaxzero: R1-Zero-style GRPO for Qwen2.5 in pure JAX."""

__version__ = "0.1.0"
