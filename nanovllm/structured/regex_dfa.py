"""A regular expression compiled to a minimal DFA over bytes, for constrained decoding.

Constrained decoding walks each vocabulary token's bytes through the automaton, so the DFA reads UTF-8 bytes,
not characters: `compile_regex(p).matches(s.encode())` equals `re.fullmatch(p, s, flags=re.ASCII) is not None`
for every string s, and no byte string that is not well-formed UTF-8 is accepted. The pipeline:

1. Parse (regex_parse.py) into an AST of characters, character sets, concatenation, alternation and
   repetition. Classes name only ASCII characters, so a set holds either every non-ASCII character or none.
2. Thompson NFA whose edges carry byte sets: a character becomes the bytes of its UTF-8 encoding, and
   "every non-ASCII character" becomes a small automaton for exactly one well-formed multi-byte UTF-8
   sequence (no overlong forms, no surrogates, nothing above U+10FFFF).
3. Trim the NFA to the states from which its accepting state can be reached. Every DFA state built next is
   then live, and the empty set of NFA states is the one dead state.
4. Subset construction over byte classes: bytes that no NFA edge tells apart form one class, so each DFA
   state is expanded once per class rather than once per byte. It stops once it passes max_states.
5. Hopcroft minimisation, then breadth-first renumbering from the start: the dead state is 0, the start 1.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from nanovllm.structured.regex_parse import (
    Alternation,
    Char,
    CharSet,
    Concat,
    Node,
    RegexError,
    parse_regex,
)

__all__ = ["ByteDFA", "RegexError", "compile_regex"]

# A pattern whose repetitions expand past this many NFA states per allowed DFA state is refused before the
# NFA is built, so that `a{100000000}` fails at once instead of building a huge NFA first.
_MAX_NFA_STATES_PER_DFA_STATE = 16


def _byte_range(lo: int, hi: int) -> int:
    """The bytes lo..hi as a 256-bit mask."""
    return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)


_ALL_BYTES = _byte_range(0, 255)
_CONTINUATION = _byte_range(0x80, 0xBF)
# Well-formed multi-byte UTF-8 (RFC 3629): lead bytes, the first continuation byte where it is narrower than
# 80-BF, then how many more 80-BF bytes follow.
_UTF8_FORMS = [
    (_byte_range(0xC2, 0xDF), None, 1),
    (_byte_range(0xE0, 0xE0), _byte_range(0xA0, 0xBF), 1),  # E0 80-9F would be overlong
    (_byte_range(0xE1, 0xEC), None, 2),
    (_byte_range(0xED, 0xED), _byte_range(0x80, 0x9F), 1),  # ED A0-BF would encode a surrogate
    (_byte_range(0xEE, 0xEF), None, 2),
    (_byte_range(0xF0, 0xF0), _byte_range(0x90, 0xBF), 2),  # F0 80-8F would be overlong
    (_byte_range(0xF1, 0xF3), None, 3),
    (_byte_range(0xF4, 0xF4), _byte_range(0x80, 0x8F), 2),  # F4 90-BF would pass U+10FFFF
]


@dataclass(frozen=True, eq=False)
class ByteDFA:
    """A complete DFA over bytes. State 0 is the dead state: every byte keeps it there, and every transition
    into a state from which no accepting state can be reached goes to 0 instead."""

    transitions: np.ndarray  # [num_states, 256] int32: next state per byte
    accepting: np.ndarray  # [num_states] bool
    start: int  # 0 only when the pattern matches nothing

    @property
    def num_states(self) -> int:
        return self.transitions.shape[0]

    def advance(self, state: int, data: bytes) -> int:
        """The state after reading data from state (0 once dead)."""
        table = self.transitions
        for byte in data:
            if state == 0:
                break
            state = int(table[state, byte])
        return state

    def matches(self, data: bytes) -> bool:
        """Whether the whole of data matches the pattern."""
        return bool(self.accepting[self.advance(self.start, data)])

    def can_end(self, state: int) -> bool:
        """Whether the text read so far matches in full, so generation may stop here."""
        return bool(self.accepting[state])

    def is_final(self, state: int) -> bool:
        """Whether the text matches and no byte can extend it: generation must stop here."""
        return bool(self.accepting[state]) and not self.transitions[state].any()


def compile_regex(pattern: str, max_states: int = 10_000) -> ByteDFA:
    """The minimal byte-level DFA of pattern (full-match semantics). Raises RegexError for a pattern outside
    the supported subset (see regex_parse.py) or one whose DFA would have more than max_states states."""
    if max_states < 2:
        raise ValueError(f"max_states must be at least 2 (the dead state and the start), got {max_states}")
    tree = parse_regex(pattern)
    nfa_size = _nfa_size(tree)
    if nfa_size > _MAX_NFA_STATES_PER_DFA_STATE * max_states:
        raise RegexError(
            f"the regex's repetitions expand to about {nfa_size} NFA states, more than the "
            f"{_MAX_NFA_STATES_PER_DFA_STATE} x max_states={max_states} allowed; lower the repetition "
            "counts or raise max_states"
        )
    nfa = _NFA()
    entry, accept = nfa.build(tree)
    rows, accepting, class_of_byte = nfa.determinize(entry, accept, max_states)
    return _renumber(rows, accepting, _minimize(rows, accepting), class_of_byte)


def _nfa_size(node: Node) -> int:
    """An upper bound on the number of NFA states that _NFA.build makes for node."""
    if isinstance(node, Char):
        return len(chr(node.code).encode()) + 1
    if isinstance(node, CharSet):
        return 9 if node.non_ascii else 2
    if isinstance(node, (Concat, Alternation)):
        return sum(_nfa_size(item) for item in node.items) + 2
    copies = max(node.min_count, 1) if node.max_count is None else node.max_count
    return copies * _nfa_size(node.item) + 3


class _NFA:
    """A Thompson NFA: state q has epsilon edges eps[q] and byte edges edges[q] = [(byte mask, target)]."""

    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int]]] = []

    def state(self) -> int:
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node: Node) -> tuple[int, int]:
        """A fragment matching node: (entry, exit). The exit has no outgoing edges and the entry no incoming
        ones, so fragments compose without loops leaking into each other."""
        if isinstance(node, Char):
            entry = exit = self.state()
            for byte in chr(node.code).encode():
                nxt = self.state()
                self.edges[exit].append((1 << byte, nxt))
                exit = nxt
            return entry, exit
        if isinstance(node, CharSet):
            entry, exit = self.state(), self.state()
            if node.ascii_mask:
                self.edges[entry].append((node.ascii_mask, exit))
            if node.non_ascii:
                tails = [exit]  # tails[k]: k more continuation bytes, then exit
                for _ in range(3):
                    tails.append(self.state())
                    self.edges[tails[-1]].append((_CONTINUATION, tails[-2]))
                for lead, first, num_more in _UTF8_FORMS:
                    if first is None:
                        self.edges[entry].append((lead, tails[num_more]))
                    else:
                        after_lead = self.state()
                        self.edges[entry].append((lead, after_lead))
                        self.edges[after_lead].append((first, tails[num_more]))
            return entry, exit
        if isinstance(node, Concat):
            entry = exit = self.state()
            for item in node.items:
                item_entry, item_exit = self.build(item)
                self.eps[exit].append(item_entry)
                exit = item_exit
            return entry, exit
        if isinstance(node, Alternation):
            entry, exit = self.state(), self.state()
            for item in node.items:
                item_entry, item_exit = self.build(item)
                self.eps[entry].append(item_entry)
                self.eps[item_exit].append(exit)
            return entry, exit
        # Repeat: min_count copies, then a loop or (max - min) optional copies, each able to skip to the end.
        entry = exit = self.state()
        for _ in range(node.min_count):
            item_entry, item_exit = self.build(node.item)
            self.eps[exit].append(item_entry)
            exit = item_exit
        end = self.state()
        if node.max_count is None:
            if node.min_count == 0:
                item_entry, item_exit = self.build(node.item)
                self.eps[exit] += [item_entry, end]
            self.eps[item_exit] += [item_entry, end]  # loop on the last copy
        else:
            for _ in range(node.max_count - node.min_count):
                item_entry, item_exit = self.build(node.item)
                self.eps[exit] += [item_entry, end]
                exit = item_exit
            self.eps[exit].append(end)
        return entry, end

    def coreachable(self, accept: int) -> set[int]:
        """The states from which accept can be reached."""
        predecessors: list[list[int]] = [[] for _ in self.eps]
        for q, (eps, edges) in enumerate(zip(self.eps, self.edges)):
            for target in eps + [target for _, target in edges]:
                predecessors[target].append(q)
        found, stack = {accept}, [accept]
        while stack:
            for p in predecessors[stack.pop()]:
                if p not in found:
                    found.add(p)
                    stack.append(p)
        return found

    def determinize(
        self, entry: int, accept: int, max_states: int
    ) -> tuple[list[list[int]], list[bool], np.ndarray]:
        """Subset construction over the NFA trimmed to its live states: rows[state][byte class] -> state, with
        state 0 the dead (empty) set; which states accept; and each byte's class ([256] int)."""
        live = self.coreachable(accept)
        edges = [
            [(mask, t) for mask, t in self.edges[q] if t in live] if q in live else []
            for q in range(len(self.eps))
        ]
        classes = _byte_classes({mask for q_edges in edges for mask, _ in q_edges})
        class_of_byte = np.zeros(256, dtype=np.int64)  # [256]
        for k, c in enumerate(classes):
            class_of_byte[[b for b in range(256) if c >> b & 1]] = k
        # class_edges[q]: (the classes an edge covers, its target)
        class_edges = [
            [([k for k, c in enumerate(classes) if c & mask], t) for mask, t in q_edges] for q_edges in edges
        ]

        closures: dict[frozenset[int], frozenset[int]] = {}

        def close(states: frozenset[int]) -> frozenset[int]:
            """The epsilon closure of states, cut down to the states that matter: those with byte edges, and
            accept. Closures that agree on those behave the same, so they make one DFA state."""
            if states not in closures:
                seen, stack = set(states), list(states)
                while stack:
                    for r in self.eps[stack.pop()]:
                        if r in live and r not in seen:
                            seen.add(r)
                            stack.append(r)
                closures[states] = frozenset(q for q in seen if class_edges[q] or q == accept)
            return closures[states]

        dead: frozenset[int] = frozenset()
        sets = [dead] if entry not in live else [dead, close(frozenset([entry]))]
        index = {s: i for i, s in enumerate(sets)}
        rows = [[0] * len(classes)]
        i = 1
        while i < len(sets):
            targets: dict[int, set[int]] = defaultdict(set)
            for q in sets[i]:
                for class_ids, t in class_edges[q]:
                    for k in class_ids:
                        targets[k].add(t)
            row = [0] * len(classes)
            for k, k_targets in targets.items():
                target_set = close(frozenset(k_targets))
                j = index.get(target_set)
                if j is None:
                    if len(sets) == max_states:
                        raise RegexError(
                            f"the regex's DFA needs more than max_states={max_states} states (found while "
                            "building it, before minimisation); simplify the pattern or raise max_states"
                        )
                    j = index[target_set] = len(sets)
                    sets.append(target_set)
                row[k] = j
            rows.append(row)
            i += 1
        return rows, [accept in s for s in sets], class_of_byte


def _byte_classes(masks: set[int]) -> list[int]:
    """Partition the bytes 0-255 into classes (as masks), each inside or outside every one of masks."""
    classes = [_ALL_BYTES]
    for mask in masks:
        classes = [part for c in classes for part in (c & mask, c & ~mask) if part]
    return classes


def _minimize(rows: list[list[int]], accepting: list[bool]) -> list[int]:
    """Hopcroft's partition refinement: block_of[state], equal for exactly the equivalent states."""
    num_states, num_classes = len(rows), len(rows[0])
    # inverse[k][q]: the states that class k leads to q
    inverse: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(num_classes)]
    for p, row in enumerate(rows):
        for k, q in enumerate(row):
            inverse[k][q].append(p)
    blocks = [
        {q for q in range(num_states) if accepting[q]},
        {q for q in range(num_states) if not accepting[q]},
    ]
    blocks = [b for b in blocks if b]
    block_of = [0] * num_states
    for b, members in enumerate(blocks):
        for q in members:
            block_of[q] = b
    pending = {min(range(len(blocks)), key=lambda b: len(blocks[b]))}  # splitters still to apply
    while pending:
        splitter = list(blocks[pending.pop()])
        for k in range(num_classes):
            # Split every block into its states that class k leads into the splitter and the rest.
            inside: dict[int, set[int]] = defaultdict(set)
            for q in splitter:
                for p in inverse[k].get(q, ()):
                    inside[block_of[p]].add(p)
            for b, members in inside.items():
                if len(members) == len(blocks[b]):
                    continue
                # The smaller half moves to a new block; both ways cost O(len(members)).
                if 2 * len(members) <= len(blocks[b]):
                    blocks[b] -= members
                    small = members
                else:
                    small = blocks[b] - members
                    blocks[b] = members
                blocks.append(small)
                for q in small:
                    block_of[q] = len(blocks) - 1
                # If b was pending, both halves must be; if not, the smaller half suffices (Hopcroft).
                pending.add(len(blocks) - 1)
    return block_of


def _renumber(
    rows: list[list[int]], accepting: list[bool], block_of: list[int], class_of_byte: np.ndarray
) -> ByteDFA:
    """The minimal DFA, its states numbered breadth-first from the start (by byte), after the dead state 0."""
    num_blocks = max(block_of) + 1
    by_block = np.zeros((num_blocks, len(rows[0])), dtype=np.int64)  # [num_blocks, num_classes]
    block_accepts = np.zeros(num_blocks, dtype=bool)  # [num_blocks]
    for q, b in enumerate(block_of):
        by_block[b] = [block_of[t] for t in rows[q]]
        block_accepts[b] = accepting[q]
    by_byte = by_block[:, class_of_byte]  # [num_blocks, 256]
    order = [block_of[0]] + ([block_of[1]] if len(rows) > 1 else [])  # dead, then start
    new_id = {b: i for i, b in enumerate(order)}
    for b in order:  # (grows while it is walked)
        for t in dict.fromkeys(by_byte[b].tolist()):
            if t not in new_id:
                new_id[t] = len(order)
                order.append(t)
    relabel = np.array([new_id[b] for b in range(num_blocks)], dtype=np.int32)  # [num_blocks]
    transitions = relabel[by_byte[order]]  # [num_states, 256] int32
    accepts = block_accepts[order]  # [num_states]
    transitions.setflags(write=False)
    accepts.setflags(write=False)
    return ByteDFA(transitions, accepts, start=1 if len(rows) > 1 else 0)
