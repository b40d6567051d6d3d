"""Rotary position embeddings: inverse frequencies (default and YaRN) and their application.

The frequencies are host constants, computed once per config in transformers' float32 op
order (`modeling_rope_utils`); only theta's powers are rounded differently (correctly, where
torch's float32 power is an ulp off now and then), so an inverse frequency is within 2 ulp of
transformers' and equal to it given the same powers.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jaxzero.model.config import Qwen2Config, YarnScaling


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """The YaRN paper's attention temperature, 0.1·mscale·ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, mscale: float | None,
                          mscale_all_dim: float | None) -> float:
    """The cos/sin multiplier transformers derives when `attention_factor` is not given: the
    ratio of two mscales when both mscale and mscale_all_dim are set (and non-zero), else the
    plain mscale of `factor` (mscale alone is ignored, as there)."""
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def _yarn_blend(dim: int, theta: float, original: int, beta_fast: float,
                beta_slow: float, truncate: bool) -> np.ndarray:
    """The weight of the unscaled (extrapolated) frequency per pair [dim/2] float32: 1 for
    pairs that turn more than beta_fast times over the original context, 0 below beta_slow
    turns, a linear ramp between (the correction range in float64, the ramp in float32)."""
    def dim_of(turns):  # the pair index at which a frequency turns `turns` times
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = (np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.float32(1) - np.clip(ramp, np.float32(0), np.float32(1))


def powers(theta: float, dim: int) -> np.ndarray:
    """theta^(2i/dim) for i < dim/2 [dim/2] float32: the exponent divided in float32 as
    transformers does, the power in float64 and rounded once (correctly rounded; torch's
    float32 power is off by an ulp now and then)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float64(np.float32(theta)) ** exponent.astype(np.float64)).astype(np.float32)


def frequencies_from_powers(powers_h: np.ndarray, theta: float,
                            yarn: YarnScaling | None) -> np.ndarray:
    """Inverse frequencies [h] float32 from `powers` [h], in transformers' float32 op order
    (default rope: 1/power; YaRN: a blend of 1/power and 1/(factor·power))."""
    unscaled_h = np.float32(1) / powers_h
    if yarn is None:
        return unscaled_h
    scaled_h = np.float32(1) / (np.float32(yarn.factor) * powers_h)
    keep_h = _yarn_blend(2 * len(powers_h), theta, yarn.original_max_position_embeddings,
                         yarn.beta_fast, yarn.beta_slow, yarn.truncate)
    return scaled_h * (np.float32(1) - keep_h) + unscaled_h * keep_h


@functools.lru_cache(maxsize=64)
def inverse_frequencies(config: Qwen2Config) -> np.ndarray:
    """The rotation rate of each head-dim pair [H/2] float32 (read-only)."""
    out = frequencies_from_powers(powers(config.rope_theta, config.head_dim),
                                  config.rope_theta, config.yarn)
    out.setflags(write=False)
    return out


def attention_scaling(config: Qwen2Config) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor, 1 without scaling."""
    return 1.0 if config.yarn is None else config.yarn.attention_factor


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, config: Qwen2Config) -> jax.Array:
    """Rotary embedding in Qwen2's rotate-half layout, computed in float32 (x_BTNH may be
    x_BTKH: any head count)."""
    h = x_BTNH.shape[-1]
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inverse_frequencies(config)
    scale = np.float32(attention_scaling(config))
    cos = (jnp.cos(angles_BTh) * scale)[:, :, None, :]
    sin = (jnp.sin(angles_BTh) * scale)[:, :, None, :]
    x32 = x_BTNH.astype(jnp.float32)
    x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)
