"""The built-in demo's data: 240 short, original case reports over 10 rare diseases (RDC
schema)."""

import importlib.resources
from pathlib import Path


def demo_cases_path() -> Path:
    """cases.jsonl, shipped as package data: one RareArena RDC record per line."""
    return Path(str(importlib.resources.files(__package__).joinpath("cases.jsonl")))
