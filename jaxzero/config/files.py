"""Run configs from YAML files: `base:` chains, dotted command-line overrides, saving."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxzero.config.schema import (SECTIONS, RunConfig, check_keys, config_from_dict, config_to_dict,
                            show_value)
from jaxzero.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-6` as a string; this loader reads it as a float, and rejects
    duplicate keys instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value in seen:
                raise ConfigError(f"duplicate key {key_node.value!r} at line "
                                  f"{key_node.start_mark.line + 1}")
            seen.add(key_node.value if isinstance(key_node, yaml.ScalarNode) else None)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    except ConfigError as err:  # the loader's own refusals (a duplicate key) name no file
        raise ConfigError(f"{where}: {err}") from None


def _read_layers(path: Path, seen: tuple[Path, ...]) -> dict:
    """The file's mapping merged over its `base:` chain, each layer's keys checked."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}"
                          + (f" (base of {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` chain loops: "
                          + " -> ".join(str(p) for p in (*seen, path.resolve())))
    raw = _parse_yaml(path.read_text(), str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {show_value(raw)}")
    base = raw.pop("base", None)
    try:
        check_keys(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path to another YAML file, got {show_value(base)}")
    return _merge(_read_layers(path.parent / base, (*seen, path.resolve())), raw)


def _merge(under: dict, over: dict) -> dict:
    out = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(raw: dict, text: str) -> dict:
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: write KEY=VALUE, e.g. rollout.n=8")
    section, _, field = key.partition(".")
    if "." in field:
        raise ConfigError(f"override {text!r}: keys are section.field, e.g. rollout.n")
    value = _parse_yaml(value_text, f"override {text!r}")
    patch = {section: {field: value} if field else value}
    try:
        check_keys(patch)
    except ConfigError as err:
        raise ConfigError(f"override {text!r}: {err}") from None
    return _merge(raw, patch)


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """A YAML config (and its `base:` chain) with dotted KEY=VALUE overrides applied in order.

    Override values are YAML: `rollout.n=8`, `grpo.clip_c=null`, `data.prompt_buckets=[128,256]`.
    """
    path, overrides = Path(path), list(overrides)
    raw = _read_layers(path, ())
    for text in overrides:
        raw = _apply_override(raw, text)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}{' with overrides' if overrides else ''}: {err}") from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Writes the full effective config (every field) as YAML that `load_config` reads back."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
