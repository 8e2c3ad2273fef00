"""Switches read from the environment once, at import: what a benchmark flips to measure what a mechanism
buys."""

from __future__ import annotations

import os


def env_int(name: str, default: int, maximum: int | None = None) -> int:
    """The non-negative integer in environment variable `name` (default when unset); ValueError otherwise."""
    text = os.environ.get(name, str(default))
    if not text.isdecimal() or (maximum is not None and int(text) > maximum):
        bound = "a non-negative integer" if maximum is None else f"an integer in 0..{maximum}"
        raise ValueError(f"{name} must be {bound}, got {text!r}")
    return int(text)
