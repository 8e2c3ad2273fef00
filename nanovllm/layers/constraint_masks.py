"""Structured outputs' token masks on the device, for SamplingBatch.build.

A constrained row may sample only the tokens its grammar allows from the sequence's state
(structured/grammar.py). Under overlapped scheduling the row's last token is still on the device when its
next step is built, so the state is not known yet on the host: only the state before that token is. The
mask is then chosen on the device: from the known state s, every token leads to some state s'
(`successor_slots(s)`, a [V] map computed once per state), so the row's mask is the table row of the state
its pending token leads to — one gather, no wait. Rows whose state is known read their state's row.

Per grammar, `DeviceGrammar` keeps a bit-packed table of the states seen so far (a slot each, 19 KB at a
152k vocabulary) and whether each accepts; slot 0 allows everything: the successor of a token the state
did not allow (never sampled) and of a complete match (the request ends when that token is read back, so
the step's token for it is discarded, as after an EOS under overlap). Slot 0 is also a grammar's reasoning
state's (the model still thinking: structured/grammar.py), which allows every token and never accepts; its
successor map, made without reading the grammar's transitions, sends the end tag to the start's slot and
every other token back to slot 0.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

from nanovllm.utils.transfer import to_device

if TYPE_CHECKING:
    from nanovllm.layers.sampling_batch import SamplingRequest
    from nanovllm.structured.grammar import Grammar

_FREE = 0  # the slot that allows every token and never accepts


class DeviceGrammar:
    """One grammar's allowed-token bits on the device, by slot (at most MAX_SLOTS: 19 KB each at a 152k
    vocabulary, then ConstraintMasks starts a fresh table), and its states' successor maps (the last
    MAX_SUCCESSOR_MAPS: [V] int16 each, 0.3 MB)."""

    MAX_SLOTS = 2048
    MAX_SUCCESSOR_MAPS = 64

    def __init__(self, grammar: Grammar, device: torch.device):
        self.grammar, self.device = grammar, device
        num_bytes = -(-grammar.vocab_size // 8)
        self.bits = torch.full((16, num_bytes), 255, dtype=torch.uint8, device=device)  # [capacity, V/8]
        self.accepting = torch.zeros(16, dtype=torch.bool, device=device)  # [capacity]
        self.slots: dict[int, int] = {}  # state -> its row in bits
        self._successors: OrderedDict[int, torch.Tensor] = OrderedDict()

    def slot(self, state: int) -> int:
        """The state's row, its bits copied to the device on first use (the reasoning state's: _FREE)."""
        if state == self.grammar.reasoning_state:
            return _FREE
        slot = self.slots.get(state)
        if slot is None:
            slot = len(self.slots) + 1  # (after _FREE)
            if slot == len(self.bits):  # double the table
                self.bits = torch.cat([self.bits, torch.empty_like(self.bits)])
                self.accepting = torch.cat([self.accepting, torch.empty_like(self.accepting)])
            packed = self.grammar.packed_allowed(state)  # [V/8]
            self.bits[slot] = to_device(packed, self.device)
            self.accepting[slot] = self.grammar.is_accepting(state)
            self.slots[state] = slot
        return slot

    def successor_slots(self, state: int) -> torch.Tensor:  # [V] int16
        """For each token, the slot of the state it leads to from `state` (_FREE where the token is not
        allowed, or where it completes the match)."""
        hit = self._successors.get(state)
        if hit is not None:
            self._successors.move_to_end(state)
            return hit
        grammar = self.grammar
        if state == grammar.reasoning_state:  # every token back to _FREE (its slot) but the end tag
            mapped = torch.full((grammar.vocab_size,), _FREE, dtype=torch.int16, device=self.device)
            mapped[grammar.reasoning_end_id] = self._successor_slot(grammar.start)
        else:
            next_states = grammar.next_states(state)  # [V] int32, 0 = not allowed
            states, inverse = np.unique(next_states, return_inverse=True)
            # (slots stay below MAX_SLOTS and a step's new ones: int16)
            slots = np.array([self._successor_slot(s) for s in states.tolist()], dtype=np.int16)
            mapped = to_device(slots[inverse], self.device)
        self._successors[state] = mapped
        if len(self._successors) > self.MAX_SUCCESSOR_MAPS:
            self._successors.popitem(last=False)
        return mapped

    def _successor_slot(self, state: int) -> int:
        """The slot a token leading to `state` picks: _FREE for the dead state and a complete match."""
        return _FREE if state == 0 or self.grammar.is_complete(state) else self.slot(state)


class ConstraintMasks:
    """The engine's DeviceGrammars (the last MAX_GRAMMARS grammars used), kept in SamplingStaging."""

    MAX_GRAMMARS = 8

    def __init__(self, device: torch.device):
        self.device = device
        self._grammars: OrderedDict[int, DeviceGrammar] = OrderedDict()

    def of(self, grammar: Grammar) -> DeviceGrammar:
        hit = self._grammars.get(id(grammar))
        # (a table holds its grammar, so the id is not reused meanwhile; a full one starts again)
        if hit is not None and hit.grammar is grammar and len(hit.slots) < DeviceGrammar.MAX_SLOTS:
            self._grammars.move_to_end(id(grammar))
            return hit
        table = DeviceGrammar(grammar, self.device)
        self._grammars[id(grammar)] = table
        if len(self._grammars) > self.MAX_GRAMMARS:
            self._grammars.popitem(last=False)
        return table

    def block(
        self,
        blocked: torch.Tensor,  # [B, V] bool, True = ruled out
        requests: list[SamplingRequest],
        rows: list[int],  # the constrained rows
        prev_tokens: torch.Tensor | None,  # [num_prev] int64: the previous step's sampled ids
    ) -> None:
        """Rule out of each constrained row what its state does not allow; an accepting state also allows the
        row's end tokens (EOS unless ignore_eos, stop_token_ids), so the model may end there."""
        by_grammar: dict[int, list[int]] = {}
        for i in rows:
            by_grammar.setdefault(id(requests[i].matcher.grammar), []).append(i)
        for group in by_grammar.values():
            table = self.of(requests[group[0]].matcher.grammar)
            known = [table.slot(requests[i].matcher.state) for i in group]
            slots = to_device(known, self.device, torch.int64)  # [n]
            # A pending token decides the state: its successor's slot, one gather per state (rows in a state
            # share its map), so the host's work grows with the states in use, not the rows.
            pending: dict[int, list[tuple[int, int]]] = {}  # state -> (position in group, source row)
            for k, i in enumerate(group):
                if requests[i].pending_src is not None:
                    pending.setdefault(requests[i].matcher.state, []).append((k, requests[i].pending_src))
            for state, items in pending.items():
                positions, sources = zip(*items)
                if prev_tokens is None or max(sources) >= len(prev_tokens):
                    raise RuntimeError(f"pending tokens from rows {sources} of no sampled ids")
                tokens = prev_tokens.index_select(0, to_device(sources, self.device, torch.int64))
                successors = table.successor_slots(state).index_select(0, tokens).long()
                slots.index_copy_(0, to_device(positions, self.device, torch.int64), successors)
            vocab_size = blocked.shape[1]
            bits = table.bits.index_select(0, slots)  # [n, V/8]
            shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=self.device)  # (np.packbits' order)
            allowed = ((bits.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab_size].bool()  # [n, V]
            index = to_device(group, self.device, torch.int64)  # [n]
            # [n, V]: what the constraint alone rules out (the ends it allows must clear nothing else)
            ruled_out = ~allowed
            _allow_ends(ruled_out, requests, group, table.accepting.index_select(0, slots), self.device)
            blocked.index_put_((index,), blocked.index_select(0, index) | ruled_out)


def _allow_ends(
    ruled_out: torch.Tensor,  # [n, V] bool: what the constraint rules out of each row of the group
    requests: list[SamplingRequest],
    group: list[int],  # rows of one grammar
    accepting: torch.Tensor,  # [n] bool: whether each row's state accepts
    device: torch.device,
) -> None:
    """Where a row's state accepts, its end tokens are allowed (EOS unless ignore_eos, stop_token_ids)."""
    pairs = []  # (position in group, token)
    for k, i in enumerate(group):
        r = requests[i]
        ends = set(r.params.stop_token_ids or ()).union(() if r.params.ignore_eos else r.eos_token_ids)
        pairs += [(k, t) for t in sorted(ends) if t < ruled_out.shape[1]]
    if not pairs:
        return
    local, ids = zip(*pairs)
    local = to_device(local, device, torch.int64)
    ids = to_device(ids, device, torch.int64)
    ruled_out.index_put_((local, ids), ruled_out[local, ids] & ~accepting.index_select(0, local))
