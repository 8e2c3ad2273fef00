"""The reasoning state of a Grammar (vLLM's reasoning parser with structured outputs): while the model thinks,
every token is allowed (EOS and special tokens too); `</think>` takes the output to the DFA's start, where the
constraint begins. Its mask and successors are made with the grammar, without walking the vocabulary; on the
device (layers/constraint_masks.py) it is the slot that allows everything, and the device masks of overlapped
scheduling are checked here against the host's, on CPU torch. Also reasoning.py's tag lookup and its reading
of the prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm.layers.constraint_masks import _FREE, ConstraintMasks, DeviceGrammar
from nanovllm.layers.sampling_batch import SamplingRequest
from nanovllm.reasoning import prompt_ends_thinking, think_token_ids
from nanovllm.sampling_params import SamplingParams, StructuredOutputsParams
from nanovllm.structured.grammar import Grammar, GrammarMatcher, StructuredOutputCompiler, can_overlap
from nanovllm.structured.regex_dfa import compile_regex
from nanovllm.structured.vocab import TokenIndex

EOS, START, END = 1, 2, 3  # EOS has no bytes (a special token); the tags are added tokens, with their text
TOKENS = [None, None, b"<think>", b"</think>", b"1", b"2", b"12", b"a", b"ab", b" ", b"-"]
VOCAB_SIZE = len(TOKENS) + 3  # the logits are wider than the tokenizer: ids without bytes
ID = {t: i for i, t in enumerate(TOKENS) if t}
PATTERN = r"[0-9]+(-a)?"


def _grammar(reasoning_end_id: int | None = END) -> Grammar:
    dfa = compile_regex(PATTERN)
    return Grammar(dfa, TokenIndex(TOKENS, VOCAB_SIZE), TOKENS, reasoning_end_id)


def _allowed(grammar: Grammar, state: int) -> np.ndarray:  # [V] bool
    return np.unpackbits(grammar.packed_allowed(state))[:VOCAB_SIZE].astype(bool)


def test_the_reasoning_state_allows_everything_and_leaves_on_the_end_tag():
    grammar = _grammar()
    thinking, start = grammar.reasoning_state, grammar.start
    assert thinking == grammar.dfa.num_states  # a number no DFA state uses
    assert _allowed(grammar, thinking).all()  # EOS, special tokens and ids past the tokenizer included
    assert not grammar.is_accepting(thinking) and not grammar.is_complete(thinking)
    assert grammar.can_continue(thinking)
    expected = np.full(VOCAB_SIZE, thinking)
    expected[END] = start
    np.testing.assert_array_equal(grammar.next_states(thinking), expected)
    assert [grammar.next_state(thinking, t) for t in range(VOCAB_SIZE)] == expected.tolist()
    assert grammar.next_state(thinking, VOCAB_SIZE) == 0  # (past the logits: never sampled)
    assert set(grammar.successors(thinking)) == {thinking, start}
    # the DFA's states are untouched: from the start, the constraint (no tags, no EOS, no free tokens)
    assert {TOKENS[t] for t in np.flatnonzero(_allowed(grammar, start))} == {b"1", b"2", b"12"}
    assert grammar.next_state(start, END) == 0 and grammar.next_state(start, EOS) == 0


def test_a_thinking_matcher_accepts_anything_until_the_end_tag():
    grammar = _grammar()
    matcher = GrammarMatcher(grammar, thinking=True)
    assert matcher.is_thinking and not matcher.is_accepting and not matcher.is_terminated
    for token in (ID[b"ab"], EOS, START, VOCAB_SIZE - 1, ID[b"12"]):  # special, unknown, digits: all thinking
        assert matcher.accept(token) and matcher.is_thinking
    assert matcher.accept(END) and not matcher.is_thinking and matcher.state == grammar.start
    assert not matcher.accept(ID[b"ab"])  # the constraint applies now
    assert not matcher.accept(END)  # a second `</think>` is only text, which the regex does not allow
    assert matcher.accept(ID[b"12"]) and matcher.is_accepting
    assert GrammarMatcher(grammar).state == grammar.start  # a prompt that closed the thinking


def test_without_an_end_id_there_is_no_reasoning_state():
    grammar = _grammar(None)
    assert grammar.reasoning_state is None and not GrammarMatcher(grammar).is_thinking
    with pytest.raises(ValueError, match="reasoning end id"):
        GrammarMatcher(grammar, thinking=True)
    with pytest.raises(ValueError, match="reasoning_end_id"):
        StructuredOutputCompiler(None, VOCAB_SIZE).matcher(StructuredOutputsParams(regex="a"), thinking=True)
    for bad in (-1, VOCAB_SIZE):
        with pytest.raises(ValueError, match="reasoning_end_id must be a token id"):
            _grammar(bad)


def test_the_overlap_budget_does_not_count_the_reasoning_state():
    """Only the start's mask may be missing from a thinking state (the reasoning state's is made with the
    grammar and never evicted)."""
    grammar = _grammar()
    thinking = GrammarMatcher(grammar, thinking=True)
    grammar._allowed.pop(grammar.start, None)
    assert grammar.num_unready_successors(thinking.state) == 1
    grammar.packed_allowed(grammar.start)
    assert grammar.num_unready_successors(thinking.state) == 0 and can_overlap([thinking])


def _request(matcher: GrammarMatcher, pending_src: int | None = None, **params) -> SamplingRequest:
    return SamplingRequest(SamplingParams(**params), [], [], (EOS,), pending_src=pending_src, matcher=matcher)


def _expected_blocked(grammar: Grammar, state: int, ignore_eos: bool = False) -> torch.Tensor:  # [V] bool
    allowed = _allowed(grammar, state)
    if grammar.is_accepting(state) and not ignore_eos:
        allowed[EOS] = True
    return torch.from_numpy(~allowed)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_device_masks_of_thinking_rows_known_and_pending(ignore_eos):
    """Rows in the reasoning state: known (its mask: nothing blocked, EOS allowed whatever ignore_eos, as vLLM
    applies no mask while thinking) and with a pending token, each id of the logits once (the device's
    successor gather picks the state the host would reach: the start's mask after `</think>`)."""
    grammar = _grammar()
    masks = ConstraintMasks(torch.device("cpu"))
    prev_tokens = torch.arange(VOCAB_SIZE, dtype=torch.int64)  # [V]: row t's pending token is t
    # one row per pending token from the reasoning state, then known states: thinking and the start
    matchers = [GrammarMatcher(grammar, thinking=True) for _ in range(VOCAB_SIZE + 1)]
    matchers.append(GrammarMatcher(grammar))
    sources = [*range(VOCAB_SIZE), None, None]
    requests = [_request(m, src, ignore_eos=ignore_eos) for m, src in zip(matchers, sources)]
    blocked = torch.zeros(len(requests), VOCAB_SIZE, dtype=torch.bool)
    masks.block(blocked, requests, list(range(len(requests))), prev_tokens)
    thinking = grammar.reasoning_state
    states = [grammar.next_state(thinking, t) for t in range(VOCAB_SIZE)] + [thinking, grammar.start]
    for row, state in enumerate(states):
        assert torch.equal(blocked[row], _expected_blocked(grammar, state, ignore_eos)), (row, state)
    assert not blocked[VOCAB_SIZE].any()  # thinking: EOS, the tags, ids past the tokenizer all allowed
    assert blocked[END, EOS] and not blocked[END, ID[b"1"]]  # after `</think>`: the constraint


def test_the_device_successor_map_of_the_reasoning_state():
    """The reasoning state is the free slot (every token, never accepting): no slot of its own."""
    grammar = _grammar()
    table = DeviceGrammar(grammar, torch.device("cpu"))
    thinking = grammar.reasoning_state
    assert table.slot(thinking) == _FREE and thinking not in table.slots
    successors = table.successor_slots(thinking)  # [V] int16
    expected = torch.full((VOCAB_SIZE,), _FREE, dtype=torch.int16)
    expected[END] = table.slot(grammar.start)
    assert torch.equal(successors, expected) and expected[END] != _FREE
    bits = np.unpackbits(table.bits[_FREE].numpy())[:VOCAB_SIZE]  # [V]
    assert bits.all() and not table.accepting[_FREE]


class _CountingIndex(TokenIndex):
    """A TokenIndex that records the states whose tokens it walks."""

    def __init__(self, *args):
        super().__init__(*args)
        self.walked: list[int] = []

    def next_states(self, dfa, state):
        self.walked.append(state)
        return super().next_states(dfa, state)


def test_the_reasoning_state_is_never_walked(monkeypatch):
    """Its mask and successors are made with the grammar and kept past the cache's evictions; the device's
    slot and successor map for it read no transitions: neither the TokenIndex nor `Grammar.next_states` is
    asked for it, on the host or the device, known or pending."""
    index = _CountingIndex(TOKENS, VOCAB_SIZE)
    grammar = Grammar(compile_regex(PATTERN), index, TOKENS, END)
    thinking = grammar.reasoning_state
    asked = []
    next_states = grammar.next_states
    monkeypatch.setattr(grammar, "next_states", lambda state: asked.append(state) or next_states(state))
    monkeypatch.setattr(Grammar, "MAX_CACHED_STATES", 1)
    mask = grammar.packed_allowed(thinking)
    assert not mask.flags.writeable and np.unpackbits(mask)[:VOCAB_SIZE].all()
    assert grammar.successors(thinking) == (thinking, grammar.start)
    state = grammar.start
    for token in (ID[b"1"], ID[b"-"], ID[b"a"]):  # more states than the cache holds
        grammar.packed_allowed(state)
        state = grammar.next_state(state, token)
    assert grammar.packed_allowed(thinking) is mask and grammar.can_continue(thinking)
    grammar.num_unready_successors(thinking)
    masks = ConstraintMasks(torch.device("cpu"))
    requests = [_request(GrammarMatcher(grammar, thinking=True), src) for src in (None, 0, 1)]
    blocked = torch.zeros(len(requests), VOCAB_SIZE, dtype=torch.bool)
    masks.block(blocked, requests, [0, 1, 2], torch.tensor([ID[b"a"], END]))
    assert not blocked[0].any() and not blocked[1].any()  # thinking, and still after a thinking token
    assert torch.equal(blocked[2], _expected_blocked(grammar, grammar.start))  # after `</think>`
    assert thinking not in index.walked and thinking not in asked
    assert grammar.start in index.walked  # (the spies see the DFA's states)


class _Tokenizer:
    """A tokenizer with `<think>` and `</think>` as one token each (ids 7, 8) and SentencePiece's habit of
    encoding a text after a prefix space (id 4): `<think>` encodes to two ids, yet it is one token."""

    unk_token_id = 0
    vocab = {"<unk>": 0, "▁": 4, "<think>": 7, "</think>": 8}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab.get(token, self.unk_token_id)

    def decode(self, ids: list[int]) -> str:
        return "".join({v: k for k, v in self.vocab.items()}[i] for i in ids).replace("▁", " ")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [4, self.vocab[text]]


def test_think_token_ids_and_what_the_prompt_says():
    tokenizer = _Tokenizer()
    assert tokenizer.encode("<think>") == [4, 7]
    assert think_token_ids(tokenizer, "qwen3") == (7, 8) == think_token_ids(tokenizer, "deepseek_r1")
    assert think_token_ids(tokenizer, "qwen3", vocab_size=9) == (7, 8)
    with pytest.raises(
        ValueError, match=r"'qwen3': its tags' ids \(7, 8\) must be below the model's vocab_size 8"
    ):
        think_token_ids(tokenizer, "qwen3", vocab_size=8)  # the logits could never write `</think>`
    with pytest.raises(ValueError, match="unknown reasoning parser 'nope'"):
        think_token_ids(tokenizer, "nope")

    class Unknown(_Tokenizer):  # `</think>` not in the vocabulary: the unk id
        vocab = {"<unk>": 0, "<think>": 7}

    class NoUnk(Unknown):  # ... or None, without an unk token (Qwen's)
        unk_token_id = None

        def convert_tokens_to_ids(self, token):
            return self.vocab.get(token)

    class StandIn(_Tokenizer):  # an id whose text is not the tag
        def convert_tokens_to_ids(self, token):
            return 4 if token == "</think>" else 7

    for bad in (Unknown(), NoUnk(), StandIn()):
        with pytest.raises(
            ValueError, match="'qwen3' needs '</think>' to be one token of the model's tokenizer"
        ):
            think_token_ids(bad, "qwen3")
    ends = lambda prompt: prompt_ends_thinking(prompt, 7, 8)  # noqa: E731
    assert not ends([1, 2, 3])  # no tag: the model opens its thinking itself (Qwen3's default)
    assert not ends([1, 7, 2])  # the template opened it (DeepSeek-R1)
    assert ends([1, 7, 9, 8, 9, 9])  # Qwen3's enable_thinking=False: an empty thinking, closed
    assert not ends([7, 8, 1, 7])  # an earlier turn's thinking closed, this one opened
