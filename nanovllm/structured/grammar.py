"""Structured outputs, engine side: a request's constraint compiled once into a byte DFA over the engine's
vocabulary (`Grammar`), and each sequence's place in it (`GrammarMatcher`).

Every constraint is a regular language over the output's bytes: a regex as given, a choice as the
alternation of its strings, a JSON schema through json_schema.py. The DFA is over bytes, not characters,
because tokens are byte strings: a token may hold half of a UTF-8 character. Each step a guided row may
sample only the tokens whose bytes keep the DFA alive from the sequence's state (vocab.py computes them,
once per state: `Grammar.packed_allowed`); an accepting state also allows the request's end tokens (EOS unless
ignore_eos, its stop_token_ids: SamplingBatch.build). The scheduler advances the state by each sampled
token (Scheduler.resolve) and ends the request once the output is complete and nothing may follow.

With a reasoning parser (nanovllm/reasoning.py) the constraint starts after the model's thinking: a Grammar
built with the `</think>` id has one more state, `reasoning_state`, which allows every token (EOS included),
stays put on all but the end id and goes to the DFA's start on it. A request whose prompt leaves the output
inside the thinking starts its matcher there. Its mask (all ones) and successors are made once, when the
grammar is built, without walking the vocabulary; the device's tables give it the slot that allows everything
(layers/constraint_masks.py).
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
    vocabulary) and the states they lead to. The reasoning state's are made in __init__ and kept apart from
    the cache: never evicted, never walked."""

    MAX_CACHED_STATES = 1024

    def __init__(
        self,
        dfa: ByteDFA,
        index: TokenIndex,
        tokens: list[bytes | None],
        reasoning_end_id: int | None = None,
    ):
        """reasoning_end_id: the thinking's end tag (`</think>`), which takes the reasoning state to the
        start; None: no reasoning state."""
        self.dfa, self.index, self.tokens = dfa, index, tokens
        self.reasoning_end_id = reasoning_end_id
        # The thinking: a state number no DFA state uses (they are 0 .. num_states - 1); None without one
        self.reasoning_state: int | None = None
        if reasoning_end_id is not None:
            if not 0 <= reasoning_end_id < index.vocab_size:
                raise ValueError(
                    f"reasoning_end_id must be a token id in [0, {index.vocab_size}) (the logits' width), "
                    f"got {reasoning_end_id!r}"
                )
            self.reasoning_state = dfa.num_states
        self._allowed: OrderedDict[int, np.ndarray] = OrderedDict()  # state -> packed [vocab_size] bits
        # state -> the live states its allowed tokens lead to (kept for every state seen; empty: no token)
        self._successors: dict[int, tuple[int, ...]] = {}
        self._ready: set[int] = set()  # states whose successors' masks were all computed
        self._thinking_mask: np.ndarray | None = None  # [ceil(vocab_size / 8)] uint8: the reasoning state's
        if self.reasoning_state is not None:
            # Every token allowed: all ones, the bits past vocab_size too (nothing reads them)
            self._thinking_mask = np.full(-(-index.vocab_size // 8), 255, dtype=np.uint8)
            self._thinking_mask.flags.writeable = False  # (shared by every caller)
            self._successors[self.reasoning_state] = (
                (self.reasoning_state, self.start) if self.start else (self.reasoning_state,)
            )

    @property
    def vocab_size(self) -> int:
        return self.index.vocab_size

    @property
    def start(self) -> int:
        """The state of an output that starts with the constraint (no thinking first)."""
        return self.dfa.start

    def next_states(self, state: int) -> np.ndarray:  # [vocab_size] int32
        """The state each token leads to from `state`, 0 (dead) where the token is not allowed. Every reader
        of transitions comes here: the reasoning state is not in the DFA's tables."""
        if state == self.reasoning_state:
            out = np.full(self.vocab_size, state, dtype=np.int32)  # thinking goes on, whatever the token ...
            out[self.reasoning_end_id] = self.start  # ... but its end tag: the constraint starts
            return out
        return self.index.next_states(self.dfa, state)

    def packed_allowed(self, state: int) -> np.ndarray:  # [ceil(vocab_size / 8)] uint8, np.packbits'
        """The tokens that keep the output matchable from `state` (end tokens not included), as bits."""
        if state == self.reasoning_state:
            return self._thinking_mask
        packed = self._allowed.get(state)
        if packed is None:
            next_states = self.next_states(state)  # [vocab_size], 0 = not allowed
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
        # (the reasoning state's mask is made in __init__ and never evicted: never missing)
        thinking = self.reasoning_state
        missing = sum(1 for s in self.successors(state) if s not in self._allowed and s != thinking)
        if not missing:
            self._ready.add(state)  # (a mask dropped from the cache later is recomputed when asked for)
        return missing

    def next_state(self, state: int, token_id: int) -> int:
        """The state after the token's bytes (0, the dead state, for a token that breaks the constraint or
        has no bytes: special tokens, ids past the tokenizer's vocabulary). From the reasoning state: the
        start after its end tag, itself after any other id of the logits (special tokens too)."""
        if state == self.reasoning_state:
            if token_id == self.reasoning_end_id:
                return self.start
            return state if 0 <= token_id < self.vocab_size else 0
        data = self.tokens[token_id] if 0 <= token_id < len(self.tokens) else None
        return self.dfa.advance(state, data) if data else 0

    def is_accepting(self, state: int) -> bool:
        """The output so far is a whole match (never while thinking: the constraint has not begun)."""
        return state != self.reasoning_state and bool(self.dfa.accepting[state])


class GrammarMatcher:
    """A sequence's place in its grammar. Only the scheduler advances it (`accept`, as the sequence's
    tokens are resolved); the runner reads its state. Preemption keeps it: the output it matched stays."""

    __slots__ = ("grammar", "state")

    def __init__(self, grammar: Grammar, thinking: bool = False):
        """thinking: the output starts inside the model's thinking (the grammar's reasoning state)."""
        if thinking and grammar.reasoning_state is None:
            raise ValueError("a matcher can start in the thinking only on a grammar with a reasoning end id")
        self.grammar = grammar
        self.state = grammar.reasoning_state if thinking else grammar.start

    @property
    def is_thinking(self) -> bool:
        """The constraint has not begun: the model is still thinking."""
        return self.state == self.grammar.reasoning_state

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
    the first constrained request. With `reasoning_end_id` (the engine's reasoning parser's `</think>`) every
    grammar has the reasoning state, so one cached grammar serves requests that start thinking or not."""

    MAX_GRAMMARS = 32

    def __init__(self, tokenizer, vocab_size: int, reasoning_end_id: int | None = None):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.reasoning_end_id = reasoning_end_id
        self._tokens: list[bytes | None] | None = None
        self._index: TokenIndex | None = None
        self._grammars: OrderedDict[tuple, Grammar] = OrderedDict()

    def matcher(self, params: StructuredOutputsParams, thinking: bool = False) -> GrammarMatcher:
        """A fresh matcher for a request, in the reasoning state if `thinking` (the output starts inside
        the model's thinking: only with a reasoning_end_id); ParamError naming structured_outputs if the
        constraint cannot be compiled or no output can follow it."""
        if thinking and self.reasoning_end_id is None:
            raise ValueError("thinking=True needs a compiler built with a reasoning_end_id")
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
        return GrammarMatcher(grammar, thinking)

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
        start = dfa.start
        if start == 0:
            raise ParamError(f"{_FIELD}: the constraint matches no output at all", _FIELD)
        grammar = Grammar(dfa, self._index, self._tokens, self.reasoning_end_id)
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
