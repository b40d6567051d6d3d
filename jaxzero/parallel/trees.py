"""Names of pytree leaves from their key paths, for rules, checkpoints and error messages."""

from __future__ import annotations

import jax


def _part(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)  # a plain key, as in the tuples of a flattened dict


def path_name(path) -> str:
    """`layers.0.attn.q_DNH`: the dotted name of a key path (or of a tuple of plain keys)."""
    return ".".join(_part(k) for k in path)


def dict_keys(path) -> tuple:
    """The dictionary keys of a path, skipping list indices and attributes: what an
    optimizer state shares with the parameters it mirrors."""
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def leaf_name(path) -> str:
    """The last dictionary key of a path: a parameter's name (`q_DNH`), "" if none."""
    keys = dict_keys(path)
    return str(keys[-1]) if keys else ""
