"""Setting up the peer all-reduce (utils/peer_all_reduce.connect_peers) on three ranks played by threads,
with the CUDA parts stood in for: all ranks use it or none does, and when none does, every IPC handle a
rank was given and never opened is counted down (else its maker's buffer is never freed, and the maker
ends with torch's "Producer process has been terminated before all shared CUDA tensors released")."""

from __future__ import annotations

import threading
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanovllm.utils import peer_all_reduce

SIZE = 3


class FakePeer:
    """A rank's buffer: handle (maker, receiver) for each other rank; opening `fail_from`'s raises."""

    fail_from: dict[int, int] = {}  # receiver rank -> the maker whose handle it cannot open

    def __init__(self, rank: int, size: int, device, num_programs: int):
        self.rank, self.size, self._mapped = rank, size, []

    def handles(self) -> list[tuple | None]:
        return [None if r == self.rank else ("ipc", 0, 0, f"{self.rank}->{r}", 0) for r in range(self.size)]

    def _map(self, handles, device) -> None:
        for maker, handle in enumerate(handles):
            if maker != self.rank:
                if self.fail_from.get(self.rank) == maker:
                    raise RuntimeError("cudaIpcOpenMemHandle failed")
                assert handle[3] == f"{maker}->{self.rank}"  # the handle made for this rank
                self._mapped.append(handle)


def _connect_all(monkeypatch, no_buffer: int | None = None, fail_from: dict[int, int] | None = None):
    released: list[str] = []
    monkeypatch.setattr(FakePeer, "fail_from", fail_from or {})
    monkeypatch.setattr(peer_all_reduce, "_release", lambda handle, device: released.append(handle[3]))
    monkeypatch.setattr(peer_all_reduce, "PeerAllReduce", FakePeer)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=8)
    )
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda d, peer: d.index != no_buffer)
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=20))
    results: dict[int, object] = {}

    def rank_main(rank: int) -> None:
        device = SimpleNamespace(index=rank)
        results[rank] = peer_all_reduce.connect_peers(store, rank, SIZE, device)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(SIZE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == SIZE
    return results, sorted(released)


def test_every_rank_maps_every_peer_and_releases_nothing(monkeypatch):
    results, released = _connect_all(monkeypatch)
    assert all(isinstance(p, FakePeer) and len(p._mapped) == SIZE - 1 for p in results.values())
    assert released == []


def test_a_rank_without_a_buffer_leaves_every_handle_counted_down(monkeypatch):
    results, released = _connect_all(monkeypatch, no_buffer=1)
    assert all(p is None for p in results.values())
    assert released == ["0->1", "0->2", "2->0", "2->1"]  # rank 1 made none; nobody opened any


def test_a_rank_that_fails_to_map_counts_down_the_handles_it_did_not_open(monkeypatch):
    results, released = _connect_all(monkeypatch, fail_from={2: 1})  # rank 2 opened 0's, failed on 1's
    assert all(p is None for p in results.values())
    assert released == ["1->2"]  # the ones it opened are let go with its PeerAllReduce
