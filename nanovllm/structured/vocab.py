"""The vocabulary as bytes, and which tokens a byte automaton allows from a state.

Constraints (a regex, a choice, a JSON schema) are compiled to a DFA over bytes, not over characters or
token strings: a byte-level BPE token can hold half of a UTF-8 character, a SentencePiece vocabulary
spells a space '▁' and a byte '<0xNN>', and the token strings of the two families mean different
things. Mapped once to the bytes each token adds to a text, every tokenizer looks the same to the DFA.

A token is allowed from a state when walking its bytes leads to a live state (the DFA sends every
transition that cannot reach acceptance to the dead state 0). `TokenIndex` walks all tokens at once,
one byte position per numpy step. Tokens are sorted by length, longest first, so those still walking at
position j are a prefix of the order: step j touches only them, and a mask costs the sum of token
lengths (about 1M byte steps for a 151k-token vocabulary), not vocabulary x longest token. Once most
tokens are dead (a restrictive state kills almost all at their first byte), the walk carries on with
the live ones only.
"""

from __future__ import annotations

import json
import re
from typing import Protocol

import numpy as np

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ByteAutomaton(Protocol):
    transitions: np.ndarray  # [num_states, 256] int; state 0 is dead (0 -> 0 on every byte)
    accepting: np.ndarray  # [num_states] bool


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's alphabet: each byte is written as one printable character. Printable Latin-1
    bytes stand for themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD) are given the
    characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(0x100 + i) for i, b in enumerate(others)})
    return table


# str.translate table from the alphabet back to bytes (as the Latin-1 characters U+0000-U+00FF); a raw
# character outside the alphabet becomes U+FFFF, which Latin-1 cannot encode
_UNBYTE = {ord(ch): b for b, ch in _bytes_to_unicode().items()}
_UNBYTE.update({b: 0xFFFF for b in range(256) if b not in _UNBYTE})


def _decoder_steps(node: dict | None) -> list[dict]:
    """A tokenizer.json decoder as a flat list of its steps (a Sequence opened, recursively)."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get("decoders", []) for step in _decoder_steps(child)]
    return [node]


def _piece_decoder(decoder_json: dict | None):
    """How a regular (non-added) vocabulary piece becomes bytes, read from the tokenizer's decoder."""
    steps = _decoder_steps(decoder_json)
    types = [step.get("type") for step in steps]
    if "ByteLevel" in types:

        def byte_level(piece: str) -> bytes | None:
            try:
                return piece.translate(_UNBYTE).encode("latin-1")
            except UnicodeEncodeError:  # not written in the byte alphabet: its bytes are unknown
                return None

        return byte_level
    spaces = []  # the characters the decoder turns into a space: Metaspace's, or a Replace(x, " ")
    for step in steps:
        if step.get("type") == "Metaspace":
            spaces.append(step["replacement"])
        elif step.get("type") == "Replace" and step.get("content") == " " and "String" in step["pattern"]:
            spaces.append(step["pattern"]["String"])
    if spaces:
        byte_fallback = "ByteFallback" in types

        def sentencepiece(piece: str) -> bytes:
            match = _BYTE_FALLBACK.fullmatch(piece) if byte_fallback else None
            if match is not None:
                return bytes([int(match.group(1), 16)])
            for space in spaces:
                piece = piece.replace(space, " ")
            return piece.encode()  # the decoder's Strip drops a space only at a text's start: not here

        return sentencepiece
    raise ValueError(
        f"cannot map this tokenizer's tokens to bytes: its decoder is {types or 'absent'}; supported are "
        "byte-level BPE (a ByteLevel decoder) and SentencePiece-style (Metaspace, or Replace('▁', ' ') "
        "with optional ByteFallback)"
    )


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each id in range(len(tokenizer)) adds to a text when it appears mid-text (no leading
    space dropped), or None for special tokens and ids without bytes. Needs a fast (Rust) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"cannot map {type(tokenizer).__name__}'s tokens to bytes: structured outputs need a fast "
            "tokenizer (one with a tokenizer.json; load it with use_fast=True)"
        )
    decoder = backend.decoder  # (its JSON alone: the whole tokenizer's, merges and all, takes a second)
    to_bytes = _piece_decoder(None if decoder is None else json.loads(decoder.__getstate__()))
    num_ids = len(tokenizer)
    out: list[bytes | None] = [None] * num_ids
    for piece, token_id in backend.get_vocab(with_added_tokens=False).items():
        if token_id < num_ids:
            out[token_id] = to_bytes(piece)
    special = set(tokenizer.all_special_ids)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id < num_ids:  # an added token is never split by the model: its text is its content
            out[token_id] = added.content.encode()
        if added.special:
            special.add(token_id)
    for token_id in special:
        if 0 <= token_id < num_ids:
            out[token_id] = None
    return [b if b else None for b in out]


class TokenIndex:
    """A vocabulary prepared once per engine for mask computation: ids sorted by byte length (longest
    first) and the byte matrix stored by column, each column holding only the tokens that reach it."""

    def __init__(self, tokens: list[bytes | None], vocab_size: int):
        if vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {vocab_size}")
        self.vocab_size = vocab_size
        ids = [i for i in range(min(len(tokens), vocab_size)) if tokens[i]]  # ids past the logits: never
        lengths = np.array([len(tokens[i]) for i in ids], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")
        self.ids = np.array(ids, dtype=np.int64)[order]  # [num_tokens] vocabulary id, longest first
        lengths = lengths[order]
        max_len = int(lengths[0]) if len(lengths) else 0
        # num_longer[j]: tokens with a byte at position j, i.e. a prefix of the order
        self.num_longer = np.searchsorted(-lengths, -np.arange(max_len), side="left")
        padded = np.zeros((len(ids), max_len), dtype=np.uint8)  # [num_tokens, max_len]
        flat = np.frombuffer(b"".join(tokens[i] for i in self.ids.tolist()), dtype=np.uint8)
        padded[np.arange(max_len) < lengths[:, None]] = flat
        # columns[j]: [num_longer[j]] byte j of each token long enough, contiguous for the gather
        self.columns = [np.ascontiguousarray(padded[: self.num_longer[j], j]) for j in range(max_len)]

    def next_states(self, dfa: ByteAutomaton, state: int) -> np.ndarray:
        """[vocab_size] int32: the state each token's bytes lead to from `state`, 0 where that is dead
        (and for tokens without bytes or past the tokenizer)."""
        transitions, state = np.asarray(dfa.transitions), int(state)
        if transitions.ndim != 2 or transitions.shape[1] != 256:
            raise ValueError(f"dfa.transitions must be [num_states, 256], got {transitions.shape}")
        if not 0 <= state < transitions.shape[0]:
            raise ValueError(f"state must be in [0, {transitions.shape[0]}), got {state}")
        table = transitions.astype(np.int32, copy=False).reshape(-1)  # [num_states * 256]
        out = np.zeros(self.vocab_size, dtype=np.int32)
        num_tokens = len(self.ids)
        if state == 0 or num_tokens == 0:
            return out
        states = np.full(num_tokens, state, dtype=np.int32)  # [num_tokens] in length order
        index = np.empty(num_tokens, dtype=np.intp)  # scratch: state * 256 + byte
        live = None  # positions still walked once most are dead; None while a prefix of all is walked
        for j, column in enumerate(self.columns):
            if live is None:
                n = self.num_longer[j]
                np.multiply(states[:n], 256, out=index[:n])
                np.add(index[:n], column, out=index[:n])
                np.take(table, index[:n], out=states[:n], mode="clip")  # (in range: no check, faster)
                if np.count_nonzero(states[:n]) * 4 < n:  # from here on, walk the live ones alone
                    num_switched, live = n, np.flatnonzero(states[:n])
                    walked = states[live]  # [len(live)] their states
            else:
                k = np.searchsorted(live, self.num_longer[j])  # live is sorted: its first k reach byte j
                if k == 0:
                    break
                walked[:k] = table[walked[:k].astype(np.intp) * 256 + column[live[:k]]]
                keep = walked != 0
                live, walked = live[keep], walked[keep]
        if live is not None:
            states[:num_switched] = 0
            states[live] = walked
        out[self.ids] = states
        return out

    def allowed(self, dfa: ByteAutomaton, state: int) -> np.ndarray:
        """[vocab_size] bool: the tokens whose bytes keep the automaton live from `state`. Tokens without
        bytes (special, empty, past the tokenizer) never are: the engine allows EOS itself."""
        return self.next_states(dfa, state) != 0
