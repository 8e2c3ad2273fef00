"""Tensor-parallel groups: a rank, a size and the collectives the parallel layers and the runner use.

Every engine owns its own group, built straight from a c10d backend (gloo on CPU, NCCL on CUDA)
over its own rendezvous store: there is no process-wide default process group, so two engines in
one process (or on one host) never share a port or a name. On GPUs that reach each other's memory,
small all-reduces go through peer memory instead of NCCL (utils/peer_all_reduce.py).

Layers learn their rank and size when they are built: the model runner is constructed inside
`building_with(group)`, and each parallel layer keeps the group it saw (`get_tp_group()`) for its
forward. Outside that scope the group is the single-rank one, where every collective is a no-op.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist

from nanovllm.kernels.backend import HAS_TRITON, use_triton
from nanovllm.utils.peer_all_reduce import PeerAllReduce, connect_peers, fits_shape

RENDEZVOUS_HOST = "127.0.0.1"  # the launcher starts every rank on this host (multi-node: out of scope)


class TensorParallelGroup:
    """This process's rank in one engine's tensor-parallel group, and the group's collectives."""

    def __init__(
        self,
        rank: int,
        size: int,
        backend: dist.Backend | None = None,
        peer_all_reduce: PeerAllReduce | None = None,
    ):
        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size}), got {rank}")
        if size > 1 and backend is None:
            raise ValueError("a group of more than one rank needs a communication backend")
        self.rank, self.size, self.backend = rank, size, backend
        self.peer_all_reduce = peer_all_reduce  # small CUDA reductions: one-shot over NVLink

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        if self.size == 1:
            return x
        if self._takes_peer(x):
            return self.peer_all_reduce(x)
        self.backend.allreduce([x]).wait()
        return x

    def graph_may_capture(self, rows: int, hidden: int, dtype: torch.dtype, triton: bool) -> bool:
        """Whether a CUDA graph may capture a step whose all-reduces are [rows, hidden] of dtype, run with the
        Triton kernels or not: always on one rank or when NCCL does every all-reduce (no peer all-reduce, or
        the torch reference ops); with the peer all-reduce in use, only where it takes them. NCCL's abort
        waits until every graph holding one of its calls is freed, and freeing a graph waits for the device:
        a worker dying while rank 0 waits in an NCCL collective then hangs rank 0 (session 20,
        docs/tensor_parallel.md). With NCCL doing everything that risk stays, for the graphs' speed."""
        peer_in_use = self.peer_all_reduce is not None and triton
        return self.size == 1 or not peer_in_use or fits_shape(rows * hidden, hidden, dtype)

    def _takes_peer(self, x: torch.Tensor) -> bool:
        """Whether x goes through peer memory rather than NCCL (the same answer on every rank: it
        depends only on x's shape, dtype and layout, and the kernel backend)."""
        return self.peer_all_reduce is not None and self.peer_all_reduce.fits(x) and use_triton(x)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank src's x into every rank's x, in place; returns x. (NCCL: queued on the current stream,
        the host does not wait.)"""
        if self.size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank = src
            self.backend.broadcast([x], opts).wait()
        return x

    def gather(self, x: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        """Every rank's x (same shape everywhere), in rank order, on rank dst; None on the others."""
        if self.size == 1:
            return [x]
        opts = dist.GatherOptions()
        opts.rootRank = dst
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == dst else []
        self.backend.gather([parts] if self.rank == dst else [], [x.contiguous()], opts).wait()
        return parts if self.rank == dst else None

    def abort(self) -> None:
        """Make collectives in flight fail instead of waiting for a rank that is gone (NCCL never
        notices a dead peer by itself; gloo does, when the peer's sockets close)."""
        if self.peer_all_reduce is not None:
            self.peer_all_reduce.abort()
        if self.backend is not None:
            try:
                self.backend.abort()
            except Exception:  # not every backend implements abort; this is best effort
                pass

    def close_peer_memory(self) -> None:
        """Let the peer all-reduce's mappings of the other ranks' buffers go, and this rank's buffer (the
        workers before they exit, then rank 0: no process ends holding a buffer that is shared through CUDA
        IPC; utils/peer_all_reduce.py). NCCL takes every all-reduce afterwards. This waits for the device:
        where a rank may be gone, abort the group first (`destroy`)."""
        if self.peer_all_reduce is not None:
            self.peer_all_reduce.close()
            self.peer_all_reduce = None

    def destroy(self) -> None:
        """Release the communicators; the group cannot be used afterwards. Aborts rather than shuts
        down: that never waits for the other ranks, which may be gone already."""
        self.abort()
        # after NCCL's abort: a collective queued on this rank with a rank that is gone would never let the
        # device synchronize
        self.close_peer_memory()
        self.backend = None  # gloo frees its sockets when the backend is collected


SINGLE_RANK = TensorParallelGroup(0, 1)
# A context variable, not a plain global: engines built at the same time in two threads each see
# their own group.
_building: ContextVar[TensorParallelGroup] = ContextVar("nanovllm_tp_group", default=SINGLE_RANK)


def get_tp_group() -> TensorParallelGroup:
    """The group of the model being built (the single-rank group outside `building_with`)."""
    return _building.get()


def get_tp_rank() -> int:
    return _building.get().rank


def get_tp_size() -> int:
    return _building.get().size


@contextmanager
def building_with(group: TensorParallelGroup) -> Iterator[TensorParallelGroup]:
    """Layers built inside this block split their weights for `group` and communicate through it."""
    token = _building.set(group)
    try:
        yield group
    finally:
        _building.reset(token)


# ---- rendezvous: rank 0 hosts the store, the other ranks connect to it --------------------------


def create_rendezvous(world_size: int, timeout_s: float) -> dist.TCPStore:
    """The store every rank meets at, hosted by rank 0 on a port the OS picks (`store.port`):
    nothing fixed, nothing to race for between choosing a free port and binding it."""
    return dist.TCPStore(
        RENDEZVOUS_HOST,
        0,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def connect_rendezvous(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(
        host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


def new_tp_group(
    store: dist.Store,
    rank: int,
    size: int,
    device: torch.device,
    timeout_s: float,
    custom_all_reduce: bool = True,
) -> TensorParallelGroup:
    """Join the group: blocks until all `size` ranks have called this with the same store.
    `custom_all_reduce`: small CUDA all-reduces go through peer memory where every GPU reaches every
    other (NVLink), not NCCL. Every rank must pass the same value."""
    if size == 1:
        return SINGLE_RANK
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.PrefixStore("tp", store)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
        opts._timeout = timeout
        opts.global_ranks_in_group = list(range(size))
        backend = dist.ProcessGroupNCCL(store, rank, size, opts)
        peer = None
        if custom_all_reduce and HAS_TRITON:
            peer = connect_peers(dist.PrefixStore("peer", store), rank, size, device)
        return TensorParallelGroup(rank, size, backend, peer)
    backend = dist.ProcessGroupGloo(store, rank, size, timeout)
    return TensorParallelGroup(rank, size, backend)
