"""The peer-memory all-reduce kernel, seen from one rank of 2, with the peer played by the test: its rows
and flags are written into the buffers before each call (the interpreter runs one rank at a time), where
the peer's kernel would put them — the tested rank's buffer (push) or the peer's own (pull).
Both ranks on two real GPUs: tests/gpu/test_peer_all_reduce_gpu.py."""

import pytest
import torch

from nanovllm.kernels import all_reduce
from nanovllm.kernels.all_reduce import (
    NUM_PROGRAMS,
    all_reduce_reference,
    all_reduce_rms_norm_reference,
    peer_all_reduce_triton,
)

WORLD = 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on the CPU


class Buffers:
    """Both ranks' buffers and flags; the kernel runs as `rank`, the test plays the other."""

    def __init__(self, slot_numel: int, dtype: torch.dtype = torch.float16, push: bool = True, rank: int = 0):
        self.slot_numel, self.push, self.rank, self.peer = slot_numel, push, rank, 1 - rank
        # every rank's [2 slots, WORLD parts, slot_numel]
        self.buffers = [torch.zeros(2, WORLD, slot_numel, dtype=dtype, device=DEVICE) for _ in range(WORLD)]
        self.flags = [
            torch.zeros(WORLD * NUM_PROGRAMS, dtype=torch.int64, device=DEVICE) for _ in range(WORLD)
        ]
        self.epochs = torch.zeros(NUM_PROGRAMS, dtype=torch.int64, device=DEVICE)
        self.abort = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        self.buffer_ptrs = torch.tensor([b.data_ptr() for b in self.buffers], device=DEVICE)
        self.flag_ptrs = torch.tensor([f.data_ptr() for f in self.flags], device=DEVICE)

    def part(self, owner: int, epoch: int, writer: int, numel: int) -> torch.Tensor:
        """Where `writer`'s rows of call `epoch` are in `owner`'s buffer."""
        return self.buffers[owner][epoch % 2, writer, :numel]

    def publish_peer(self, rows: torch.Tensor, epoch: int) -> None:
        """What the peer's kernel does before the tested rank may read: its rows into slot epoch % 2 (of
        the tested rank's buffer when pushing, of its own when pulling), then its flag in the rank's flags."""
        self.part(self.rank if self.push else self.peer, epoch, self.peer, rows.numel())[:] = rows.flatten()
        self.flags[self.rank].view(WORLD, NUM_PROGRAMS)[self.peer] = epoch

    def sent(self, epoch: int, numel: int) -> torch.Tensor:
        """The tested rank's rows of call `epoch`, where its kernel put them for the peer."""
        return self.part(self.peer if self.push else self.rank, epoch, self.rank, numel)

    def reduce(self, x: torch.Tensor, norm=None):
        return peer_all_reduce_triton(
            x,
            self.buffer_ptrs,
            self.flag_ptrs,
            self.epochs,
            self.abort,
            self.rank,
            self.slot_numel,
            norm,
            push=self.push,
        )


@pytest.mark.parametrize("push,rank", [(True, 0), (True, 1), (False, 0), (False, 1)])
@pytest.mark.parametrize(
    "rows,hidden,dtype",
    [(1, 64, torch.float16), (5, 40, torch.float32), (NUM_PROGRAMS + 3, 16, torch.float16)],
)
def test_sums_in_rank_order_alternating_slots(rows, hidden, dtype, push, rank):
    bufs = Buffers(slot_numel=rows * hidden + 8, dtype=dtype, push=push, rank=rank)
    gen = torch.Generator().manual_seed(rows)
    for epoch in (1, 2, 3):
        mine, peer = (torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype) for _ in range(2))
        bufs.publish_peer(peer, epoch)
        want = all_reduce_reference([mine, peer] if rank == 0 else [peer, mine])
        got = bufs.reduce(mine.clone())
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # This rank's rows went to its part of the slot (in the peer's buffer when pushing), and its
        # flags to the peer's flag array.
        torch.testing.assert_close(bufs.sent(epoch, mine.numel()), mine.flatten(), rtol=0, atol=0)
        assert bufs.flags[bufs.peer].view(WORLD, NUM_PROGRAMS)[rank].tolist() == [epoch] * NUM_PROGRAMS
        assert bufs.epochs.tolist() == [epoch] * NUM_PROGRAMS


@pytest.mark.parametrize("push,rank", [(True, 1), (False, 0)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rms_norm(with_residual, push, rank):
    rows, hidden, eps = 3, 48, 1e-6
    bufs = Buffers(slot_numel=rows * hidden, push=push, rank=rank)
    gen = torch.Generator().manual_seed(7)
    mine, peer, residual = (
        torch.randn(rows, hidden, generator=gen).to(DEVICE, torch.float16) for _ in range(3)
    )
    weight = torch.randn(hidden, generator=gen).to(DEVICE, torch.float16)
    residual = residual if with_residual else None
    bufs.publish_peer(peer, 1)
    want = all_reduce_rms_norm_reference([mine, peer] if rank == 0 else [peer, mine], weight, eps, residual)
    x = mine.clone()
    out, new_residual = bufs.reduce(x, norm=(weight, eps, residual))
    assert new_residual is x  # written in place
    torch.testing.assert_close(out, want[0], rtol=0, atol=0)
    torch.testing.assert_close(new_residual, want[1], rtol=0, atol=0)


def test_launcher_rejects_what_does_not_fit():
    bufs = Buffers(slot_numel=64)
    x = torch.zeros(4, 16, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="numel"):
        bufs.reduce(torch.zeros(5, 16, dtype=torch.float16, device=DEVICE))  # 80 > 64 elements
    with pytest.raises(ValueError, match="contiguous"):
        bufs.reduce(torch.zeros(16, 4, dtype=torch.float16, device=DEVICE).t())
    with pytest.raises(ValueError, match="weight"):
        bufs.reduce(x, norm=(torch.ones(8, dtype=torch.float16, device=DEVICE), 1e-6, None))
    with pytest.raises(ValueError, match="residual"):
        bufs.reduce(x, norm=(torch.ones(16, dtype=torch.float16, device=DEVICE), 1e-6, x.float()))
    assert bufs.epochs.tolist() == [0] * NUM_PROGRAMS  # nothing was launched


def test_abort_flag_releases_a_rank_waiting_for_a_peer_that_never_comes(monkeypatch):
    monkeypatch.setattr(all_reduce, "ABORT_POLL_SPINS", 1)  # look at once (the interpreter is slow)
    bufs = Buffers(slot_numel=64)
    bufs.abort.fill_(1)  # the peer never publishes; without the abort flag this would spin forever
    bufs.reduce(torch.ones(1, 16, dtype=torch.float16, device=DEVICE))
    assert bufs.epochs.tolist() == [1] * NUM_PROGRAMS  # it ran, and came back
