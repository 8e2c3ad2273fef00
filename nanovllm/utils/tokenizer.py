"""Tokenizer loading (transformers' AutoTokenizer, from the checkpoint directory), and a fast decode."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece, as SentencePiece spells them


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # many possible causes; the user needs the reason and the path
        raise ValueError(f"cannot load the tokenizer in {str(path)!r}: {e}") from e


class TokenDecoder:
    """`tokenizer.decode(ids, skip_special_tokens=...)` for lists of ints (`decode`), the same text, and which
    ids are silent: left out of every decode, so that a text never depends on them (`is_silent`).

    For a fast tokenizer that neither overrides decoding nor cleans up spaces, `decode` is the Rust
    tokenizer's own: transformers' decode first type-checks every id in Python, which costs more than the
    decode (~0.3 us per id: 2x the time of a 600-token output, 2.7x of a detokenizer's 6-token window). The
    engine decodes on the host between launching a step and the next, so this time can idle the GPU. The
    Rust decode drops the ids it does not know and, when it skips special tokens, its special ones (which
    need not be transformers' `all_special_ids`) before it decodes the rest: those are the silent ids. Other
    tokenizers have none (unknown).

    `byte_ids`: with a byte-fallback decoder (Llama 2, Mistral), the pieces that spell one byte ("<0xE4>").
    The decoder reads a run of them as one: valid UTF-8, or one "\ufffd" per byte of the run. So a byte
    piece can change the text of the ones before it ("<0xC3><0x9F>" is "ß", "<0xC3><0x9F><0xC3>" is three
    "\ufffd"), and text decoded one token at a time must wait for the run's end."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend = None  # the Rust tokenizer, where `decode` is its own
        cls = type(tokenizer)
        if (
            isinstance(tokenizer, PreTrainedTokenizerFast)
            and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is PreTrainedTokenizerFast._decode
            and not tokenizer.clean_up_tokenization_spaces
        ):
            self._backend = tokenizer.backend_tokenizer
            self.decode = functools.partial(self._backend.decode, skip_special_tokens=skip_special_tokens)
        else:
            self.decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
        self._num_ids = 0  # the ids it knows are below this (0: silent ids are not known)
        self._dropped: frozenset[int] = frozenset()  # the special ids it drops
        self._read_vocabulary()
        self.byte_ids: frozenset[int] = frozenset()
        if self._backend is not None and _has_byte_fallback(json.loads(self._backend.decoder.__getstate__())):
            vocab = self._backend.get_vocab(with_added_tokens=False)
            self.byte_ids = frozenset(i for piece, i in vocab.items() if _BYTE_PIECE.fullmatch(piece))

    def is_silent(self, token_id: int) -> bool:
        if token_id < self._num_ids:
            return token_id in self._dropped
        if self._backend is None:
            return False
        self._read_vocabulary()  # (tokens added since: their ids come after the ones it had)
        return token_id >= self._num_ids or token_id in self._dropped

    def _read_vocabulary(self) -> None:
        """The vocabulary's size and the special ids it drops, if the size changed since the last read."""
        size = self._backend.get_vocab_size(with_added_tokens=True) if self._backend is not None else 0
        if size == self._num_ids:
            return
        self._num_ids = size
        if self.skip_special_tokens:
            added = self._backend.get_added_tokens_decoder()
            self._dropped = frozenset(i for i, token in added.items() if token.special)


def _has_byte_fallback(decoder: dict | None) -> bool:
    """Whether a tokenizer.json decoder (or a Sequence of them) includes ByteFallback."""
    if not decoder:
        return False
    return decoder.get("type") == "ByteFallback" or any(map(_has_byte_fallback, decoder.get("decoders", [])))
