"""Structured outputs, engine side: a request's constraint compiled once into a byte DFA over the engine's
vocabulary (`Grammar`), and each sequence's place in it (`GrammarMatcher`).

Every constraint is a regular language over the output's bytes: a regex as given, a choice as the
alternation of its strings, a JSON schema through json_schema.py. The DFA is over bytes, not characters,
because tokens are byte strings: a token may hold half of a UTF-8 character. Each step a guided row may
sample only the tokens whose bytes keep the DFA alive from the sequence's state (vocab.py computes them,
once per state: `Grammar.packed_allowed`); an accepting state also allows the request's end tokens (EOS unless
ignore_eos, its stop_token_ids: SamplingBatch.build). The scheduler advances the state by each sampled
token (Scheduler.resolve) and ends the request once the output is complete and nothing may follow.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

from nanovllm.sampling_params import ParamError, StructuredOutputsParams
from nanovllm.structured.json_schema import SchemaError, choice_regex, schema_to_regex
from nanovllm.structured.regex_dfa import ByteDFA, RegexError, compile_regex
from nanovllm.structured.vocab import TokenIndex, token_bytes

_FIELD = "structured_outputs"


class Grammar:
    """One compiled constraint, shared by every request that asks for it: its DFA and, per state visited,
    the vocabulary's allowed tokens (the last MAX_CACHED_STATES states; 19 KB each, bit-packed, at a 152k
    vocabulary) and the states they lead to."""

    MAX_CACHED_STATES = 1024

    def __init__(self, dfa: ByteDFA, index: TokenIndex, tokens: list[bytes | None]):
        self.dfa, self.index, self.tokens = dfa, index, tokens
        self._allowed: OrderedDict[int, np.ndarray] = OrderedDict()  # state -> packed [vocab_size] bits
        # state -> the live states its allowed tokens lead to (kept for every state seen; empty: no token)
        self._successors: dict[int, tuple[int, ...]] = {}
        self._ready: set[int] = set()  # states whose successors' masks were all computed

    @property
    def vocab_size(self) -> int:
        return self.index.vocab_size

    def packed_allowed(self, state: int) -> np.ndarray:  # [ceil(vocab_size / 8)] uint8, np.packbits'
        """The tokens that keep the output matchable from `state` (end tokens not included), as bits."""
        packed = self._allowed.get(state)
        if packed is None:
            next_states = self.index.next_states(self.dfa, state)  # [vocab_size], 0 = not allowed
            allowed = next_states != 0
            packed = np.packbits(allowed)
            self._allowed[state] = packed
            self._successors[state] = tuple(np.unique(next_states[allowed]).tolist())
            if len(self._allowed) > self.MAX_CACHED_STATES:
                self._allowed.popitem(last=False)
        else:
            self._allowed.move_to_end(state)
        return packed

    def successors(self, state: int) -> tuple[int, ...]:
        """The live states the tokens allowed from `state` lead to (found once a state: asked every step)."""
        successors = self._successors.get(state)
        if successors is None:
            self.packed_allowed(state)
            successors = self._successors[state]
        return successors

    def can_continue(self, state: int) -> bool:
        """Some token is allowed from `state`."""
        return bool(self.successors(state))

    def is_complete(self, state: int) -> bool:
        """The output is a whole match and no token can extend it: nothing may follow."""
        return self.is_accepting(state) and not self.can_continue(state)

    def num_unready_successors(self, state: int) -> int:
        """How many states one token from `state` have no mask computed yet: an overlapped step computes
        them all before its token is known (layers/constraint_masks.py), a waiting one only the state the
        token leads to."""
        if state in self._ready:
            return 0
        missing = sum(1 for s in self.successors(state) if s not in self._allowed)
        if not missing:
            self._ready.add(state)  # (a mask dropped from the cache later is recomputed when asked for)
        return missing

    def next_state(self, state: int, token_id: int) -> int:
        """The state after the token's bytes (0, the dead state, for a token that breaks the constraint or
        has no bytes: special tokens, ids past the tokenizer's vocabulary)."""
        data = self.tokens[token_id] if 0 <= token_id < len(self.tokens) else None
        return self.dfa.advance(state, data) if data else 0

    def is_accepting(self, state: int) -> bool:
        return bool(self.dfa.accepting[state])


class GrammarMatcher:
    """A sequence's place in its grammar. Only the scheduler advances it (`accept`, as the sequence's
    tokens are resolved); the runner reads its state. Preemption keeps it: the output it matched stays."""

    __slots__ = ("grammar", "state")

    def __init__(self, grammar: Grammar):
        self.grammar, self.state = grammar, grammar.dfa.start

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False (the state unchanged) if the token breaks the constraint."""
        state = self.grammar.next_state(self.state, token_id)
        if state == 0:
            return False
        self.state = state
        return True

    @property
    def is_accepting(self) -> bool:
        """The output so far is a whole match: the end tokens may come next."""
        return self.grammar.is_accepting(self.state)

    @property
    def is_terminated(self) -> bool:
        """The output is a whole match and no token can extend it: the request is done."""
        return self.grammar.is_complete(self.state)


# An overlapped step may compute at most this many new masks first (each takes 1-4 ms of host time at a
# 152k vocabulary); past it the engine waits for the step in flight, and computes only the masks visited.
MAX_NEW_MASKS_OVERLAPPED = 4


def can_overlap(matchers: Iterable[GrammarMatcher]) -> bool:
    """Whether the next step may be built before the tokens in flight are known: the masks of every state
    those tokens could lead to are computed, but for at most MAX_NEW_MASKS_OVERLAPPED in all."""
    seen, missing = set(), 0
    for m in matchers:
        key = (id(m.grammar), m.state)
        if key not in seen:
            seen.add(key)
            missing += m.grammar.num_unready_successors(m.state)
            if missing > MAX_NEW_MASKS_OVERLAPPED:
                return False
    return True


class StructuredOutputCompiler:
    """Compiles StructuredOutputsParams into Grammars for one engine (its tokenizer and its logits' width),
    keeping the last MAX_GRAMMARS: requests tend to repeat a schema. The vocabulary's bytes are read on
    the first constrained request."""

    MAX_GRAMMARS = 32

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._tokens: list[bytes | None] | None = None
        self._index: TokenIndex | None = None
        self._grammars: OrderedDict[tuple, Grammar] = OrderedDict()

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        """A fresh matcher for a request; ParamError naming structured_outputs if the constraint cannot
        be compiled or no output can follow it."""
        try:
            key = _cache_key(params)
        except (TypeError, ValueError) as e:  # (json.dumps of a dict holding bytes, a NaN ...)
            raise ParamError(f"{_FIELD}.json is not a JSON schema: {e}", _FIELD) from None
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = self._compile(params)
            self._grammars[key] = grammar
            if len(self._grammars) > self.MAX_GRAMMARS:
                self._grammars.popitem(last=False)
        else:
            self._grammars.move_to_end(key)
        return GrammarMatcher(grammar)

    def _compile(self, params: StructuredOutputsParams) -> Grammar:
        try:
            if params.whitespace:  # (alone first: an error then names it, not the JSON regex around it)
                compile_regex(params.whitespace)
            dfa = compile_regex(constraint_regex(params))
        except (RegexError, SchemaError) as e:
            raise ParamError(f"{_FIELD}: {e}", _FIELD) from None
        except (RecursionError, TypeError, AttributeError) as e:  # a malformed schema from Python code
            raise ParamError(
                f"{_FIELD}: cannot compile this constraint ({type(e).__name__}: {e})", _FIELD
            ) from None
        if self._index is None:
            self._tokens = token_bytes(self.tokenizer)
            self._index = TokenIndex(self._tokens, self.vocab_size)
        grammar = Grammar(dfa, self._index, self._tokens)
        start = dfa.start
        if start == 0:
            raise ParamError(f"{_FIELD}: the constraint matches no output at all", _FIELD)
        if not grammar.can_continue(start):
            what = (
                "only the empty output"
                if grammar.is_accepting(start)
                else "no output this vocabulary can spell"
            )
            raise ParamError(f"{_FIELD}: the constraint matches {what}", _FIELD)
        return grammar


def constraint_regex(params: StructuredOutputsParams) -> str:
    """The regex a constraint stands for (RegexError / SchemaError if it cannot be written as one)."""
    if params.regex is not None:
        return params.regex
    if params.choice is not None:
        return choice_regex(params.choice)
    if params.json is not None:
        return schema_to_regex(params.json, params.whitespace)
    return schema_to_regex({"type": "object"}, params.whitespace)  # json_object: any JSON object


def _cache_key(params: StructuredOutputsParams) -> tuple:
    spec = params.json
    if isinstance(spec, dict):  # (a str schema is keyed by its text: equal text, equal grammar)
        spec = json.dumps(spec, sort_keys=True, allow_nan=False)
    choice = None if params.choice is None else tuple(params.choice)
    return (spec, params.regex, choice, bool(params.json_object), params.whitespace)
