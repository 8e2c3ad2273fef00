"""The waiting queue, ordered by the scheduling policy (vLLM's `scheduling_policy`).

- "fcfs": arrival order; a preempted request goes back to the front (it has waited already).
- "priority": by (priority, arrival), a lower value first; a preempted request goes back by that key
  like any other. Low priorities can wait for ever while higher ones keep coming, as in vLLM.

Iterating the queue gives the order the scheduler admits in.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

from nanovllm.engine.sequence import Sequence


def priority_key(seq: Sequence) -> tuple[int, int]:
    """Served first = smallest: the priority value, then arrival (sequence ids are given in arrival order)."""
    return seq.priority, seq.seq_id


def check_priority(priority: int, policy: str) -> None:
    """A request's priority: an int, and under "fcfs" only 0 (vLLM refuses any other there)."""
    if type(priority) is not int:
        raise TypeError(f"priority must be an int, got {priority!r}")
    if priority != 0 and policy != "priority":
        raise ValueError(
            f"priority={priority} needs scheduling_policy='priority' (this engine runs {policy!r}, where "
            "every priority must be 0)"
        )


class WaitingQueue:
    def __init__(self, policy: str):
        self.by_priority = policy == "priority"
        self._seqs: deque[Sequence] = deque()  # in admission order

    def add(self, seq: Sequence) -> None:
        """A new request."""
        if self.by_priority:
            bisect.insort(self._seqs, seq, key=priority_key)  # (after equal keys: none, ids are unique)
        else:
            self._seqs.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """A preempted request."""
        if self.by_priority:
            self.add(seq)
        else:
            self._seqs.appendleft(seq)

    def peek(self) -> Sequence:
        return self._seqs[0]

    def pop(self) -> Sequence:
        return self._seqs.popleft()

    def remove(self, seq: Sequence) -> None:
        self._seqs.remove(seq)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)
