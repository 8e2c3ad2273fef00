"""Keep the garbage collector's full passes off the objects that existed before a run.

A process that has built an engine holds a few hundred thousand objects the collector tracks (torch's and
transformers' modules, the model's). CPython's full (generation-2) collection walks every one of them —
~100-200 ms on a small CPU — whenever enough new objects have survived into the oldest generation. A run
that keeps many small outputs triggers that every few steps: prompt_logprobs keeps a `Logprob` per prompt
token, 16k per 16k-token batch. The pause stops the step loop, and with it the GPU.

`gc.freeze()` moves every object tracked at that moment into a permanent generation that collections skip;
objects made afterwards are collected as before. A frozen object that becomes garbage is still freed by its
reference count; only cycles among frozen objects wait until `gc.unfreeze()` (vLLM's engine core freezes
its heap after start-up for the same reason).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects that exist now out of garbage collections while the block runs (`LLM.generate`).
    Does nothing while the collector is off. Python cannot unfreeze selectively: a freeze made before the
    block (some Python builds freeze a few hundred objects at start-up) ends with it, as is safe — frozen
    objects are only ever collected late, never wrongly."""
    if not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # back into the oldest generation: collectable again, cycles included


def freeze_heap() -> None:
    """For a process that serves one engine until it exits (the server's engine core): collect what
    start-up left behind, then freeze the rest for good."""
    gc.collect()
    gc.freeze()
