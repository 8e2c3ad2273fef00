"""The buffers behind the one-shot peer-memory all-reduce (nanovllm/kernels/all_reduce.py), shared
between the ranks' processes through CUDA IPC.

Each rank allocates an exchange buffer (3 slots of one part per rank, every 16-bit half EMPTY) on its own
GPU, publishes an IPC handle to it for each other rank through the group's rendezvous store, and maps every
other rank's into its own address space (on its own device: the pointers reach the peer GPU over NVLink).
The kernel gets a table of those pointers. Small reductions (a decode step's activations) go this way;
larger ones (prefill) to NCCL.

torch counts every handle it gives out in a shared-memory counter that the process which opens it counts
down when it lets the mapping go, and keeps a shared buffer past its own release until its count is down.
A process that ends with a shared buffer still held prints "Producer process has been terminated before all
shared CUDA tensors released". So each peer gets a handle of its own (one handle opened by two peers would
be counted down twice), and at shutdown every worker lets its mappings go (`PeerAllReduce.close`) before it
exits, then rank 0 does, and its buffer is freed, even when the process is exiting with the group kept.

Setting up is all or nothing: every rank reports through the store whether it could reach and map
every peer, and the group uses peer memory only if all could (ranks that disagreed on the collective
would wait for each other forever). A rank that maps nothing counts down the handles it never opened.
"""

from __future__ import annotations

import logging
import pickle

import torch
import torch.distributed as dist

from nanovllm.kernels.all_reduce import EMPTY_16, NUM_PROGRAMS, NUM_SLOTS, peer_all_reduce_triton

logger = logging.getLogger(__name__)

MAX_SLOT_BYTES = 2 * 1024 * 1024  # 256 rows of a 4096-wide bf16 hidden state (a decode step); more: NCCL
MAX_HIDDEN = 16384  # a program holds one whole row in registers


def fits_shape(numel: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether a contiguous CUDA tensor of numel elements in rows of `hidden` fits the peer buffers."""
    return (
        0 < hidden <= MAX_HIDDEN
        and dtype in (torch.bfloat16, torch.float16, torch.float32)
        and 0 < numel * dtype.itemsize <= MAX_SLOT_BYTES
    )


class PeerAllReduce:
    """One rank's side of the peer-memory all-reduce: its buffer and the table of everyone's.
    Build it with `connect_peers`, which every rank of the group calls."""

    def __init__(self, rank: int, size: int, device: torch.device, num_programs: int):
        self.rank, self.size, self.num_programs = rank, size, num_programs
        # [NUM_SLOTS, size parts, MAX_SLOT_BYTES]: part r of a slot holds rank r's rows; EMPTY (16-bit
        # halves 0x8000) wherever no row is waiting, as the kernel leaves it after every call
        num_halves = NUM_SLOTS * size * MAX_SLOT_BYTES // 2
        self.buffer = torch.full((num_halves,), EMPTY_16, dtype=torch.int16, device=device)
        self.epochs = torch.zeros(num_programs, dtype=torch.int64, device=device)
        self.abort_flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        torch.cuda.synchronize(device)  # the buffer is EMPTY before any peer can write into it
        self._mapped: list[torch.UntypedStorage] = []  # peers' storages, kept open while in use
        self.buffer_ptrs: torch.Tensor | None = None  # [size] int64, set by _map
        self.buffers_aligned = False  # every buffer_ptrs address a multiple of 16, set by _map

    def handles(self) -> list[tuple | None]:
        """An IPC handle to this rank's buffer for each rank (None for this one): each is counted once."""
        return [None if r == self.rank else _share(self.buffer) for r in range(self.size)]

    def _map(self, handles: list[tuple | None], device: torch.device) -> None:
        """Open every peer's buffer (handles[peer]: the handle that peer made for this rank; handles[rank]
        is ignored) and build the pointer table."""
        buffer_ptrs = []
        for peer, handle in enumerate(handles):
            if peer == self.rank:
                buffer_ptrs.append(self.buffer.data_ptr())
                continue
            storage = _open(handle, device)
            self._mapped.append(storage)
            buffer_ptrs.append(storage.data_ptr())
        self.buffer_ptrs = torch.tensor(buffer_ptrs, dtype=torch.int64, device=device)
        self.buffers_aligned = all(ptr % 16 == 0 for ptr in buffer_ptrs)  # (allocations always are)

    def fits(self, x: torch.Tensor) -> bool:
        """Whether x goes through peer memory (else NCCL): a small, contiguous [..., hidden] tensor."""
        contiguous_cuda = x.is_cuda and x.is_contiguous() and x.dim() >= 1
        return contiguous_cuda and fits_shape(x.numel(), x.shape[-1], x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        if not self.fits(x):
            raise ValueError(
                f"{tuple(x.shape)} {x.dtype} does not fit the peer all-reduce (see PeerAllReduce.fits)"
            )
        return peer_all_reduce_triton(
            x,
            self.buffer_ptrs,
            self.epochs,
            self.abort_flag,
            self.rank,
            MAX_SLOT_BYTES // x.element_size(),
            self.num_programs,
            buffers_aligned=self.buffers_aligned,
        )

    def abort(self) -> None:
        """Kernels waiting for a peer that is gone give up (their results are garbage)."""
        self.abort_flag.fill_(1)

    def close(self) -> None:
        """Let the peers' buffers go once this rank's kernels are done (any still waiting for a peer give up
        first: this never waits for a rank that is gone). Each peer's count of its handles goes down, so the
        peer can free its buffer and exit cleanly. No reduction can run afterwards."""
        self.abort()
        torch.cuda.synchronize(self.buffer.device)
        self._mapped.clear()
        self.buffer_ptrs = None


def connect_peers(
    store: dist.Store,
    rank: int,
    size: int,
    device: torch.device,
    num_programs: int | None = None,
) -> PeerAllReduce | None:
    """Every rank of the group calls this; all get a PeerAllReduce, or all get None (some GPU cannot reach
    another's memory, or CUDA IPC failed somewhere). Rank 0's num_programs holds for all."""
    # Rank 0 picks the grid (program p of a rank exchanges rows with program p of the others): every program
    # must be resident at once, so no more programs than SMs.
    if rank == 0:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        store.set("num_programs", str(num_programs or min(NUM_PROGRAMS, sms)))
    num_programs = int(store.get("num_programs"))
    store.set(f"device/{rank}", str(device.index))
    devices = [int(store.get(f"device/{r}")) for r in range(size)]
    peer = None
    try:
        if all(torch.cuda.can_device_access_peer(device, d) for d in devices if d != device.index):
            peer = PeerAllReduce(rank, size, device, num_programs)
    except Exception:
        logger.warning(
            "rank %d: peer all-reduce buffers failed; NCCL for every all-reduce", rank, exc_info=True
        )
    # handles/r: the list of rank r's handles, one for each rank, or None where rank r has no buffer
    store.set(f"handles/{rank}", pickle.dumps(peer.handles() if peer is not None else None))
    published = [pickle.loads(store.get(f"handles/{r}")) for r in range(size)]
    mine = [h[rank] if h is not None and r != rank else None for r, h in enumerate(published)]  # made for us
    mapped = False
    if all(h is not None for h in published):
        try:
            peer._map(mine, device)
            mapped = True
        except Exception:
            logger.warning(
                "rank %d: mapping a peer's buffers failed; NCCL for every all-reduce", rank, exc_info=True
            )
    if not mapped:  # the handles made for this rank that it never opened still count: their buffers would
        # outlive every release (those it opened are let go with `peer`)
        num_opened = len(peer._mapped) if peer is not None else 0
        try:
            for handle in [h for h in mine if h is not None][num_opened:]:
                _release(handle, device)
        except Exception:  # (raising here would leave the other ranks waiting for mapped/{rank})
            logger.warning("rank %d: releasing unopened IPC handles failed", rank, exc_info=True)
    store.set(f"mapped/{rank}", "1" if mapped else "0")
    if all(store.get(f"mapped/{r}") == b"1" for r in range(size)):
        return peer
    return None


def _share(t: torch.Tensor) -> tuple:
    """The IPC handle of t's allocation (what torch.multiprocessing sends for a CUDA tensor)."""
    _device, handle, size, offset, *ref_counting = t.untyped_storage()._share_cuda_()
    return (handle, size, offset, *ref_counting)


def _release(shared: tuple, device: torch.device) -> None:
    """Count down a handle that will never be opened (as torch.multiprocessing does for a duplicate)."""
    _handle, _size, _offset, ref_counter_handle, ref_counter_offset, *_event = shared
    torch.UntypedStorage._release_ipc_counter(ref_counter_handle, ref_counter_offset, device=device)


def _open(shared: tuple, device: torch.device) -> torch.UntypedStorage:
    """A peer's storage, mapped on *this* rank's device (which reaches it over NVLink); opening it on the
    peer's device instead would create a second CUDA context there."""
    return torch.UntypedStorage._new_shared_cuda(device.index, *shared)
