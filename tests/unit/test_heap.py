"""utils/heap.py: the objects that exist before a run stay out of garbage collections during it, and
become collectable again after it."""

from __future__ import annotations

import gc
import weakref

import pytest

from nanovllm.utils.heap import frozen_heap


class _Node:
    pass


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def _thawed():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_made_before_are_frozen_during_the_block_and_collected_after():
    before = _cycle()  # cyclic garbage from before the block: only a full collection frees it
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        during = _cycle()  # made inside: collected as usual
        gc.collect()
        assert during() is None
        assert before() is not None  # frozen: collections skip it
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before() is None


def test_the_heap_is_unfrozen_when_the_block_raises():
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("a failed run")
    assert gc.get_freeze_count() == 0


def test_an_earlier_freeze_does_not_stop_it():
    """Some Python builds freeze a few hundred objects at start-up: the block still freezes the rest."""
    gc.freeze()  # the earlier freeze
    before = _cycle()  # made after it: only the block's own freeze keeps it from collections
    with frozen_heap():
        gc.collect()
        assert before() is not None
    assert gc.get_freeze_count() == 0  # (Python cannot unfreeze only our part)
    gc.collect()
    assert before() is None


def test_nothing_is_frozen_while_the_collector_is_off():
    gc.disable()
    try:
        with frozen_heap():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
