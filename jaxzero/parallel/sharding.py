"""The device mesh and one sharding table for parameters, activations, the KV cache and batches.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters,
gradients and optimizer state sharded) and `tensor` (attention heads, the MLP width and the
vocab split across devices). Rows of every batch go over (data, fsdp).

`ShardingConfig` is the table: one PartitionSpec per field, the field's suffix letters naming
its dimensions in the shape vocabulary of `jaxzero.model`. A spec is fitted to an array's shape
(`fit_spec`): a mesh axis that does not divide its dimension is dropped there, and
`undivided` lists every such drop once, for the start-up log.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxzero.errors import ConfigError
from jaxzero.parallel.trees import dict_keys, leaf_name, path_name

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the rows (B) of every activation, cache and batch array
# The decode copy's tensor-parallel axes: the ones a host's devices span (data goes between
# hosts), so its per-token all-reduces stay within a host.
HOST = ("fsdp", "tensor")
DECODE_LAYOUTS = ("replicated", "tensor")


def _axes_tuple(axes) -> tuple[str, ...]:
    return axes if isinstance(axes, tuple) else (axes,) if axes else ()


def letters(field: str) -> str:
    """`q_bias_NH` -> "NH": the dimensions a table field (or parameter name) is named for."""
    return field.rsplit("_", 1)[-1]


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """PartitionSpecs by the dimensions they shard (letters as in `jaxzero.model`).

    Parameter fields are named exactly as the model's parameters. Hashable, so it can sit in
    the model's static `ModelOptions` and in a static jit argument.
    """

    # parameters
    embed_VD: P
    lm_head_VD: P
    norm_D: P
    attn_norm_D: P
    mlp_norm_D: P
    q_DNH: P
    q_bias_NH: P
    k_DKH: P
    k_bias_KH: P
    v_DKH: P
    v_bias_KH: P
    o_NHD: P
    gate_DF: P
    up_DF: P
    down_FD: P
    # activations
    act_BTD: P       # the residual stream
    act_BTNH: P      # queries
    act_BTKH: P      # keys and values
    act_BTF: P       # the MLP's hidden layer
    scores_BKQTS: P    # attention scores and probabilities
    logits_BTV: P
    # the KV cache of the sampler
    cache_LBKSH: P
    cache_BS: P      # which slots hold a real token
    # batches: rows of the train step and the sampler
    rows_BT: P
    rows_B: P

    def __post_init__(self):
        for field in dataclasses.fields(self):
            spec = getattr(self, field.name)
            if not isinstance(spec, P):
                raise ConfigError(f"sharding table {field.name}: {spec!r} is not a PartitionSpec")
            if len(spec) > len(letters(field.name)):
                raise ConfigError(f"sharding table {field.name}: {spec} has more entries than "
                                  f"the {len(letters(field.name))} dimensions it names")
            for axes in spec:
                unknown = [a for a in _axes_tuple(axes) if a not in AXES]
                if unknown:
                    raise ConfigError(f"sharding table {field.name}: unknown mesh axes "
                                      f"{unknown}; the mesh has {AXES}")

    @classmethod
    def fsdp_tp(cls) -> "ShardingConfig":
        """FSDP over the model width D, tensor parallelism over heads (N, K), the MLP width F
        and the vocab V; head dim H and the norms stay whole; rows over (data, fsdp)."""
        return cls(
            embed_VD=P("tensor", "fsdp"), lm_head_VD=P("tensor", "fsdp"),
            norm_D=P(None), attn_norm_D=P(None), mlp_norm_D=P(None),
            q_DNH=P("fsdp", "tensor", None), q_bias_NH=P("tensor", None),
            k_DKH=P("fsdp", "tensor", None), k_bias_KH=P("tensor", None),
            v_DKH=P("fsdp", "tensor", None), v_bias_KH=P("tensor", None),
            o_NHD=P("tensor", None, "fsdp"),
            gate_DF=P("fsdp", "tensor"), up_DF=P("fsdp", "tensor"), down_FD=P("tensor", "fsdp"),
            act_BTD=P(BATCH, None, None), act_BTNH=P(BATCH, None, "tensor", None),
            act_BTKH=P(BATCH, None, "tensor", None), act_BTF=P(BATCH, None, "tensor"),
            scores_BKQTS=P(BATCH, "tensor", None, None, None), logits_BTV=P(BATCH, None, "tensor"),
            cache_LBKSH=P(None, BATCH, "tensor", None, None), cache_BS=P(BATCH, None),
            rows_BT=P(BATCH, None), rows_B=P(BATCH))

    @classmethod
    def replicated(cls) -> "ShardingConfig":
        """Every array whole on every device."""
        return cls(**{f.name: P() for f in dataclasses.fields(cls)})

    @classmethod
    def decode_replicated(cls) -> "ShardingConfig":
        """The rollout copy, whole on every device; rows over every device (all three axes):
        a decode step then moves no weight between devices."""
        rows = AXES
        return cls(**{**{name: P() for name in PARAM_NAMES},
                      "act_BTD": P(rows, None, None), "act_BTNH": P(rows, None, None, None),
                      "act_BTKH": P(rows, None, None, None), "act_BTF": P(rows, None, None),
                      "scores_BKQTS": P(rows, None, None, None, None),
                      "logits_BTV": P(rows, None, None),
                      "cache_LBKSH": P(None, rows, None, None, None), "cache_BS": P(rows, None),
                      "rows_BT": P(rows, None), "rows_B": P(rows)})

    @classmethod
    def decode_tensor(cls) -> "ShardingConfig":
        """The rollout copy for a model too large to replicate: heads (N, K), the MLP width F
        and the vocab V over a host's devices (HOST), the model width D whole, so a decode
        step all-reduces activations but gathers no weight; rows over `data`."""
        tp, rows = HOST, "data"
        return cls(
            embed_VD=P(tp, None), lm_head_VD=P(tp, None),
            norm_D=P(None), attn_norm_D=P(None), mlp_norm_D=P(None),
            q_DNH=P(None, tp, None), q_bias_NH=P(tp, None),
            k_DKH=P(None, tp, None), k_bias_KH=P(tp, None),
            v_DKH=P(None, tp, None), v_bias_KH=P(tp, None),
            o_NHD=P(tp, None, None),
            gate_DF=P(None, tp), up_DF=P(None, tp), down_FD=P(tp, None),
            act_BTD=P(rows, None, None), act_BTNH=P(rows, None, tp, None),
            act_BTKH=P(rows, None, tp, None), act_BTF=P(rows, None, tp),
            scores_BKQTS=P(rows, tp, None, None, None), logits_BTV=P(rows, None, tp),
            cache_LBKSH=P(None, rows, tp, None, None), cache_BS=P(rows, None),
            rows_BT=P(rows, None), rows_B=P(rows))

    def param_spec(self, name: str) -> P:
        """The spec of the parameter called `name` (its leaf name, e.g. `q_DNH`)."""
        if name not in PARAM_NAMES:
            raise KeyError(f"parameter {name!r} has no field in ShardingConfig; parameters: "
                           f"{', '.join(PARAM_NAMES)}")
        return getattr(self, name)


FSDP_TP = ShardingConfig.fsdp_tp()
# Every field but the activation, cache and batch ones is a parameter of the model.
PARAM_NAMES = tuple(f.name for f in dataclasses.fields(ShardingConfig) if not f.name.startswith(
    ("act_", "scores_", "logits_", "cache_", "rows_")))


def decode_table(layout: str) -> ShardingConfig:
    """The table of the rollout copy: 'replicated' or 'tensor' (see the factories)."""
    if layout == "replicated":
        return ShardingConfig.decode_replicated()
    if layout == "tensor":
        return ShardingConfig.decode_tensor()
    raise ConfigError(f"decode layout {layout!r}: use one of {DECODE_LAYOUTS}")


# A replicated rollout copy may take this share of a device; larger models go tensor-parallel.
REPLICATED_SHARE = 0.25


def choose_decode_layout(choice: str, copy_bytes: int, device_bytes: int | None, mesh: Mesh,
                         host_devices: int) -> str:
    """The rollout copy's layout: `choice` unless 'auto', which replicates a copy of
    `copy_bytes` when it takes at most REPLICATED_SHARE of a device (always when the device
    reports no memory, as CPUs do) and goes tensor-parallel otherwise. A tensor layout must
    fit within a host (HOST spans at most `host_devices`); where it cannot, auto replicates
    (the plan then says whether the copy fits)."""
    span = math.prod(mesh.shape[a] for a in HOST)
    if choice == "auto":
        small = device_bytes is None or copy_bytes <= REPLICATED_SHARE * device_bytes
        choice = "replicated" if small or span > host_devices else "tensor"
    if choice not in DECODE_LAYOUTS:
        raise ConfigError(f"rollout.decode_layout={choice!r}: use auto, replicated or tensor")
    if choice == "tensor" and span > host_devices:
        raise ConfigError(f"rollout.decode_layout=tensor splits the copy over the mesh's "
                          f"{'×'.join(HOST)} axes ({span} devices), more than one host's "
                          f"{host_devices}; use a mesh whose fsdp × tensor fits in a host, or "
                          "decode_layout: replicated")
    return choice


def device_memory_bytes() -> int | None:
    """One local device's memory (None where the backend reports none, as CPUs)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats or "bytes_limit" not in stats else int(stats["bytes_limit"])


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


# ----------------------------------------------------------------------------- fitting


class Dropped(NamedTuple):
    """A mesh axis left off a dimension it does not divide (that dimension is replicated)."""

    dim: int
    size: int
    axes: tuple[str, ...]
    devices: int


def fit_spec(spec: P, shape: Sequence[int | None], mesh) -> tuple[P, tuple[Dropped, ...]]:
    """`spec` with mesh axes dropped from dimensions they do not divide, and what was dropped.

    `mesh` is a Mesh or an AbstractMesh. A dimension of size None (one that depends on the
    call, e.g. rows whose divisibility the caller's shardings enforce) keeps its axes.
    """
    fitted, dropped = [], []
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        devices = math.prod(mesh.shape[a] for a in _axes_tuple(axes))
        if size is not None and size % devices:
            dropped.append(Dropped(dim, size, _axes_tuple(axes), devices))
            fitted.append(None)
        else:
            fitted.append(axes)
    return P(*fitted), tuple(dropped)


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """A sharding constraint from the table under the active mesh (`jax.set_mesh`), fitted to
    x's shape; without a mesh (a plain single-device call) there is nothing to constrain."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    fitted, _ = fit_spec(spec, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, fitted)


def traced_under(mesh: Mesh, fn):
    """`fn`, tracing under `mesh`, so that the table's activation constraints bind in jit
    however the jitted function is called or lowered (`jax.set_mesh` cannot enter a trace;
    the abstract mesh is what `constrain` reads)."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


# ----------------------------------------------------------------------------- parameters


# The model's decoder blocks are stored under this key, stacked: their parameters carry a
# leading L axis (the layer scan's), which is never sharded.
STACKED = "layers"


def _stacked(path) -> bool:
    return dict_keys(path)[:1] == (STACKED,)


def param_letters(path) -> str:
    """The dimensions of the parameter at `path`: its name's letters, after L when stacked."""
    return ("L" if _stacked(path) else "") + letters(leaf_name(path))


def param_rule(path, table: ShardingConfig = FSDP_TP) -> P:
    """The unfitted spec of the parameter at `path`: its table field's, after an unsharded L
    when stacked."""
    try:
        spec = table.param_spec(leaf_name(path))
    except KeyError as e:
        raise KeyError(f"parameter {path_name(path)}: {e.args[0]}") from None
    return P(None, *spec) if _stacked(path) else spec


def param_specs(state, mesh: Mesh, table: ShardingConfig = FSDP_TP):
    """The PartitionSpec of each parameter, from the table, fitted to its shape."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: fit_spec(param_rule(path, table), leaf.shape, mesh)[0], state)


def param_shardings(state, mesh: Mesh, table: ShardingConfig = FSDP_TP):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, mesh, table),
                        is_leaf=lambda x: isinstance(x, P))


def _follow(tree, params, mesh: Mesh, table: ShardingConfig):
    """follow_params' shardings, and the paths of non-scalar leaves that match no parameter."""
    specs = jax.tree_util.tree_flatten_with_path(param_specs(params, mesh, table),
                                                 is_leaf=lambda x: isinstance(x, P))[0]
    by_keys = {dict_keys(p): spec for p, spec in specs}
    shapes = {dict_keys(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    unmatched = []

    def sharding(path, leaf):
        keys = dict_keys(path)
        for start in range(len(keys)):
            if keys[start:] in by_keys and shapes[keys[start:]] == leaf.shape:
                return NamedSharding(mesh, by_keys[keys[start:]])
        if np.prod(leaf.shape) > 1:
            unmatched.append(f"{path_name(path)} {tuple(leaf.shape)}")
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(sharding, tree), unmatched


def follow_params(tree, params, mesh: Mesh, table: ShardingConfig = FSDP_TP):
    """Shardings for a tree (optimizer state, gradients) whose array leaves mirror parameters.

    A leaf whose dict-key path ends with a parameter's and has its shape gets that
    parameter's sharding; anything else is replicated (scalars such as step counts by design,
    larger leaves are reported by `undivided`).
    """
    return _follow(tree, params, mesh, table)[0]


def dims_of(params) -> dict[str, int]:
    """The size of each dimension letter the parameters name (`q_DNH` [64, 4, 16] gives D, N,
    H; a stacked decoder parameter L too), plus Q = N / K; raises if two parameters disagree on a letter."""
    dims: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        for letter, size in zip(param_letters(path), leaf.shape):
            if dims.setdefault(letter, size) != size:
                raise ValueError(f"{path_name(path)}: {letter}={size}, but another parameter "
                                 f"has {letter}={dims[letter]}")
    if "N" in dims and "K" in dims:
        dims["Q"] = dims["N"] // dims["K"]
    return dims


def undivided(params, mesh: Mesh, table: ShardingConfig = FSDP_TP, opt_state=None) -> list[str]:
    """Everything the table asks to shard that will be replicated instead, one line each.

    Every table field is fitted to the sizes the parameters fix (rows, lengths and slots
    depend on the call and are checked there); leaves of `opt_state` that follow no
    parameter are listed too. Empty when everything shards as the table says.
    """
    dims = dims_of(params)
    lines = []
    for field in dataclasses.fields(table):
        names = letters(field.name)
        _, dropped = fit_spec(getattr(table, field.name), [dims.get(c) for c in names], mesh)
        for d in dropped:
            lines.append(f"{field.name}: {names[d.dim]}={d.size} does not divide over "
                         f"{'×'.join(d.axes)} ({d.devices} devices); replicated along "
                         f"{names[d.dim]}")
    if opt_state is not None:
        lines += [f"optimizer state {leaf}: follows no parameter; replicated"
                  for leaf in _follow(opt_state, params, mesh, table)[1]]
    return lines


def describe(state, mesh: Mesh, table: ShardingConfig = FSDP_TP) -> list[str]:
    """One line per parameter: its shape, spec and per-device shard shape (for logs and plan)."""
    lines = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        spec, _ = fit_spec(param_rule(path, table), leaf.shape, mesh)
        shard = NamedSharding(mesh, spec).shard_shape(leaf.shape)
        lines.append(f"{path_name(path):45s} {str(leaf.shape):22s} {str(spec):40s} {shard}")
    return lines


# ----------------------------------------------------------------------------- arrays


def batch_sharding(mesh: Mesh, ndim: int = 2, table: ShardingConfig = FSDP_TP) -> NamedSharding:
    """Rows of a batch: [B] or [B, T] (dim 0 over the table's rows, the rest whole)."""
    if ndim not in (1, 2):
        raise ValueError(f"batches are [B] or [B, T]; got {ndim} dimensions")
    return NamedSharding(mesh, table.rows_B if ndim == 1 else table.rows_BT)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_on(tree, shardings):
    """ShapeDtypeStructs of a tree of arrays (or structs) placed on `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


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
    """The whole of a (possibly multi-host) global array, as numpy, on every process; every
    process must call it, since it may gather."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
