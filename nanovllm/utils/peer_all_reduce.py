"""The buffers behind the one-shot peer-memory all-reduce (nanovllm/kernels/all_reduce.py), shared
between the ranks' processes through CUDA IPC.

Each rank allocates an exchange buffer (2 slots) and a flag array on its own GPU, publishes their IPC
handles through the group's rendezvous store, and maps every other rank's into its own address space
(on its own device: the pointers reach the peer GPU over NVLink). The kernel gets a table of those
pointers. Small reductions (a decode step's activations) go this way; larger ones (prefill) to NCCL.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

from nanovllm.kernels.all_reduce import NUM_PROGRAMS, peer_all_reduce_triton

MAX_BYTES = 2 * 1024 * 1024  # per slot: 256 rows of a 4096-wide bf16 hidden state; above it NCCL wins


def peers_reachable(size: int) -> bool:
    """Whether every GPU of the group can read every other's memory directly."""
    return all(torch.cuda.can_device_access_peer(a, b) for a in range(size) for b in range(size) if a != b)


class PeerAllReduce:
    """One rank's side of the peer-memory all-reduce: its buffers and the table of everyone's."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        size: int,
        device: torch.device,
        num_programs: int | None = None,
    ):
        if num_programs is None:  # every program must be resident at once: well under the SM count
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_programs = min(NUM_PROGRAMS, sms // 2)
        self.rank, self.size, self.num_programs = rank, size, num_programs
        self.slot_bytes = MAX_BYTES
        self.buffer = torch.empty(2 * MAX_BYTES, dtype=torch.uint8, device=device)
        self.flags = torch.zeros(size * num_programs, dtype=torch.int64, device=device)
        self.epochs = torch.zeros(num_programs, dtype=torch.int64, device=device)
        self.abort_flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        torch.cuda.synchronize(device)  # the zeroed flags are in place before any peer can write them
        store.set(f"peer_all_reduce/{rank}", pickle.dumps((_share(self.buffer), _share(self.flags))))
        self._mapped: list[torch.UntypedStorage] = []  # peers' storages, kept open while in use
        buffer_ptrs, flag_ptrs = [], []
        for peer in range(size):
            if peer == rank:
                buffer_ptrs.append(self.buffer.data_ptr())
                flag_ptrs.append(self.flags.data_ptr())
                continue
            handles = pickle.loads(store.get(f"peer_all_reduce/{peer}"))
            for ptrs, handle in zip((buffer_ptrs, flag_ptrs), handles, strict=True):
                storage = _open(handle, device)
                self._mapped.append(storage)
                ptrs.append(storage.data_ptr())
        self.buffer_ptrs = torch.tensor(buffer_ptrs, dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor(flag_ptrs, dtype=torch.int64, device=device)

    def fits(self, x: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and x.is_contiguous()
            and x.dim() >= 1
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.numel() * x.element_size() <= self.slot_bytes
        )

    def __call__(
        self, x: torch.Tensor, norm: tuple[torch.Tensor, float, torch.Tensor | None] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sum x over the ranks, in place (x must `fit`); returns x. With norm = (weight, eps, residual):
        the add+norm that follows, fused (see `peer_all_reduce_triton`)."""
        slot_numel = self.slot_bytes // x.element_size()
        return peer_all_reduce_triton(
            x,
            self.buffer_ptrs,
            self.flag_ptrs,
            self.epochs,
            self.abort_flag,
            self.rank,
            slot_numel,
            norm,
            self.num_programs,
        )

    def abort(self) -> None:
        """Kernels waiting for a peer that is gone give up (their results are garbage)."""
        self.abort_flag.fill_(1)


def _share(t: torch.Tensor) -> tuple:
    """The IPC handle of t's allocation (what torch.multiprocessing sends for a CUDA tensor)."""
    _device, handle, size, offset, *ref_counting = t.untyped_storage()._share_cuda_()
    return (handle, size, offset, *ref_counting)


def _open(shared: tuple, device: torch.device) -> torch.UntypedStorage:
    """A peer's storage, mapped on *this* rank's device (which reaches it over NVLink); opening it on the
    peer's device instead would create a second CUDA context there."""
    return torch.UntypedStorage._new_shared_cuda(device.index, *shared)
