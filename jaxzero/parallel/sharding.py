"""Device mesh and the partition rules of every Qwen2 parameter, optimizer state and activation.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters,
gradients and optimizer state sharded) and `tensor` (attention heads and the MLP width split
across devices). The batch goes over (data, fsdp).
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxzero.errors import ConfigError

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension of every activation and rollout array

# One rule per parameter, by its name; the suffix letters are its dimensions (model.py).
# FSDP shards the large model dimension D; tensor parallelism shards heads (N, K), the MLP
# width F and the vocab V. Head dim H and the norms stay whole.
PARAM_RULES: dict[str, tuple[str | None, ...]] = {
    "embed_VD":     ("tensor", "fsdp"),
    "lm_head_VD":   ("tensor", "fsdp"),
    "norm_D":       (None,),
    "attn_norm_D":  (None,),
    "mlp_norm_D":   (None,),
    "q_DNH":        ("fsdp", "tensor", None),
    "q_bias_NH":    ("tensor", None),
    "k_DKH":        ("fsdp", "tensor", None),
    "k_bias_KH":    ("tensor", None),
    "v_DKH":        ("fsdp", "tensor", None),
    "v_bias_KH":    ("tensor", None),
    "o_NHD":        ("tensor", None, "fsdp"),
    "gate_DF":      ("fsdp", "tensor"),
    "up_DF":        ("fsdp", "tensor"),
    "down_FD":      ("tensor", "fsdp"),
}


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, device_count: int) -> tuple[int, int, int]:
    """Fills in the one -1 axis and checks the product against the devices that exist."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    wild = [k for k, v in sizes.items() if v == -1]
    bad = [f"{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
    if bad or len(wild) > 1:
        raise ConfigError(f"mesh {sizes}: each axis is a positive size, and at most one is -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    asked = " × ".join(f"{k}={v}" for k, v in sizes.items())
    if wild:
        if device_count % fixed:
            raise ConfigError(
                f"mesh {asked}: the fixed axes take {fixed} devices, which does not divide the "
                f"{device_count} devices that exist (jax.device_count())")
        sizes[wild[0]] = device_count // fixed
    elif fixed != device_count:
        raise ConfigError(
            f"mesh {asked} = {fixed} devices, but {device_count} devices exist "
            "(jax.device_count()); set one axis to -1 to take the remaining devices")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all global devices (every host's, when multi-host)."""
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _leaf_name(path) -> str:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def _path_str(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def fit_spec(spec: tuple, shape: tuple[int, ...], mesh: Mesh, what: str = "") -> P:
    """Drops mesh axes from dimensions they do not divide (those dimensions are replicated)."""
    fitted = []
    for dim, axes in zip(shape, spec):
        axes_tuple = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        size = math.prod(mesh.shape[a] for a in axes_tuple)
        if axes_tuple and dim % size:
            log.info("%s: dimension %d does not divide over %s (%d devices); replicated there",
                     what, dim, axes_tuple, size)
            fitted.append(None)
        else:
            fitted.append(axes)
    return P(*fitted)


def param_specs(state, mesh: Mesh):
    """The PartitionSpec of each parameter, from PARAM_RULES, fitted to its shape."""
    def spec(path, leaf):
        name = _leaf_name(path)
        if name not in PARAM_RULES:
            raise KeyError(f"parameter {_path_str(path)} has no partition rule in PARAM_RULES")
        return fit_spec(PARAM_RULES[name], leaf.shape, mesh, _path_str(path))
    return jax.tree_util.tree_map_with_path(spec, state)


def param_shardings(state, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def follow_params(tree, params, mesh: Mesh):
    """Shardings for a tree (optimizer state, gradients) whose array leaves mirror parameters.

    A leaf whose path ends with a parameter's path and has its shape gets that parameter's
    sharding; anything else (step counts, scalars) is replicated.
    """
    by_path = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(
            param_specs(params, mesh), is_leaf=lambda x: isinstance(x, P))[0]:
        by_path[_dict_keys(path)] = spec
    shapes = {_dict_keys(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

    def sharding(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in by_path and shapes[suffix] == leaf.shape:
                return NamedSharding(mesh, by_path[suffix])
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(sharding, tree)


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch-leading arrays: dim 0 over (data, fsdp), the rest whole."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain(x: jax.Array, *spec) -> jax.Array:
    """A sharding constraint under an active mesh (`jax.set_mesh`); a no-op without one.

    The model calls this on its activations so the batch stays on (data, fsdp) inside jit;
    dimensions that do not divide are left unconstrained.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    fitted = []
    for dim, axes in zip(x.shape, spec):
        axes_tuple = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        size = math.prod(mesh.shape[a] for a in axes_tuple)
        fitted.append(axes if axes_tuple and dim % size == 0 else None)
    return jax.lax.with_sharding_constraint(x, P(*fitted))


def describe(state, mesh: Mesh) -> list[str]:
    """One line per parameter: its shape, spec and per-device shard shape (for logs and plan)."""
    lines = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        spec = fit_spec(PARAM_RULES[_leaf_name(path)], leaf.shape, mesh)
        shard = NamedSharding(mesh, spec).shard_shape(leaf.shape)
        lines.append(f"{_path_str(path):45s} {str(leaf.shape):22s} {str(spec):40s} {shard}")
    return lines


def bytes_per_device(tree, shardings) -> int:
    """Bytes each device holds for a tree of arrays or ShapeDtypeStructs under shardings."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(
            shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        total += int(np.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
    return total


def put_global(host_tree, shardings):
    """Places host arrays (the same values on every process) onto global shardings.

    Each process copies only the shards its own devices hold, so this works unchanged on one
    host or many.
    """
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, host_tree, shardings)


def to_host(x) -> np.ndarray:
    """The whole of a (possibly multi-host) global array, as numpy, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
