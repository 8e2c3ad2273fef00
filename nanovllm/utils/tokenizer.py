"""Tokenizer loading (transformers' AutoTokenizer, from the checkpoint directory)."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # many possible causes; the user needs the reason and the path
        raise ValueError(f"cannot load the tokenizer in {str(path)!r}: {e}") from e
