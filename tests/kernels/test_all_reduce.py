"""The peer-memory all-reduce kernel, seen from one rank of 2, with the peer played by the test: its rows are
written into the tested rank's buffer before each call (the interpreter runs one rank at a time), where the
peer's kernel would store them. Both ranks on two real GPUs: tests/gpu/test_peer_all_reduce_gpu.py."""

import pytest
import torch

from nanovllm.kernels import all_reduce
from nanovllm.kernels.all_reduce import (
    EMPTY_16,
    EMPTY_32,
    NEG_ZERO_32,
    NUM_PROGRAMS,
    NUM_SLOTS,
    all_reduce_reference,
    all_reduce_rms_norm_reference,
    peer_all_reduce_triton,
)

WORLD = 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on the CPU
BITS = {2: torch.int16, 4: torch.int32}


class Buffers:
    """Both ranks' exchange buffers; the kernel runs as `rank`, the test plays the other."""

    def __init__(self, slot_numel: int, dtype: torch.dtype = torch.float16, rank: int = 0):
        self.slot_numel, self.dtype, self.rank, self.peer = slot_numel, dtype, rank, 1 - rank
        size = torch.empty((), dtype=dtype).element_size()
        # every rank's [NUM_SLOTS, WORLD parts, slot_numel] elements, every 16-bit half EMPTY
        halves = NUM_SLOTS * WORLD * slot_numel * size // 2
        self.raw = [torch.full((halves,), EMPTY_16, dtype=torch.int16, device=DEVICE) for _ in range(WORLD)]
        self.bits = [r.view(BITS[size]).view(NUM_SLOTS, WORLD, slot_numel) for r in self.raw]
        self.empty = EMPTY_16 if size == 2 else EMPTY_32
        self.epochs = torch.zeros(NUM_PROGRAMS, dtype=torch.int64, device=DEVICE)
        self.abort = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        self.buffer_ptrs = torch.tensor([r.data_ptr() for r in self.raw], device=DEVICE)

    def part(self, owner: int, epoch: int, writer: int, numel: int) -> torch.Tensor:
        """The bits of `writer`'s rows of call `epoch` in `owner`'s buffer."""
        return self.bits[owner][epoch % NUM_SLOTS, writer, :numel]

    def publish_peer(self, rows: torch.Tensor, epoch: int) -> None:
        """What the peer's kernel does before the tested rank may read: its rows into slot epoch % 3, part
        `peer`, of the tested rank's buffer."""
        self.part(self.rank, epoch, self.peer, rows.numel())[:] = rows.flatten().view(self.bits[0].dtype)

    def reduce(self, x: torch.Tensor, norm=None):
        return peer_all_reduce_triton(
            x, self.buffer_ptrs, self.epochs, self.abort, self.rank, self.slot_numel, norm
        )


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize(
    "rows,hidden,dtype",
    [(1, 64, torch.float16), (5, 40, torch.float32), (NUM_PROGRAMS + 3, 16, torch.float16)],
)
def test_sums_in_rank_order_rotating_slots(rows, hidden, dtype, rank):
    bufs = Buffers(slot_numel=rows * hidden + 8, dtype=dtype, rank=rank)
    gen = torch.Generator().manual_seed(rows)
    for epoch in (1, 2, 3, 4):  # every slot, then the first again
        mine, peer = (torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype) for _ in range(2))
        bufs.publish_peer(peer, epoch)
        want = all_reduce_reference([mine, peer] if rank == 0 else [peer, mine])
        got = bufs.reduce(mine.clone())
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        n = mine.numel()
        # This rank's rows went to its part of the slot in the peer's buffer; the peer's part of its own
        # buffer is EMPTY again (and nothing past the rows was touched).
        assert torch.equal(bufs.part(bufs.peer, epoch, rank, n), mine.flatten().view(bufs.bits[0].dtype))
        assert (bufs.bits[rank][:, bufs.peer] == bufs.empty).all()
        assert (bufs.bits[bufs.peer][:, rank, n:] == bufs.empty).all()
        assert bufs.epochs.tolist() == [epoch] * NUM_PROGRAMS


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_values_with_the_empty_bits_travel_as_values_that_add_the_same(dtype):
    # A value whose bits are EMPTY would read as "not arrived yet": fp16 -0.0 goes as +0.0, the fp32 denormal
    # 0x80008000 (-4.6e-41) as -0.0. The sum is what it would be (to within that denormal).
    bufs = Buffers(slot_numel=32, dtype=dtype)
    int_dtype = bufs.bits[0].dtype
    mine = torch.ones(2, 16, dtype=dtype, device=DEVICE)
    mine.view(int_dtype)[0, :4] = bufs.empty
    peer = torch.full((2, 16), 2.0, dtype=dtype, device=DEVICE)
    bufs.publish_peer(peer, 1)
    want = all_reduce_reference([mine, peer])
    got = bufs.reduce(mine.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-40)
    sent = bufs.part(bufs.peer, 1, 0, mine.numel()).view(2, 16)
    assert sent[0, :4].tolist() == [0 if dtype == torch.float16 else NEG_ZERO_32] * 4
    assert torch.equal(sent[1], mine[1].view(int_dtype))


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rms_norm(with_residual, rank):
    rows, hidden, eps = 3, 48, 1e-6
    bufs = Buffers(slot_numel=rows * hidden, rank=rank)
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
    with pytest.raises(ValueError, match="16- or 32-bit floats"):
        bufs.reduce(torch.zeros(4, 16, dtype=torch.float64, device=DEVICE))
    assert bufs.epochs.tolist() == [0] * NUM_PROGRAMS  # nothing was launched


def test_abort_flag_releases_a_rank_waiting_for_a_peer_that_never_comes(monkeypatch):
    monkeypatch.setattr(all_reduce, "ABORT_POLL_SPINS", 1)  # look at once (the interpreter is slow)
    bufs = Buffers(slot_numel=64)
    bufs.abort.fill_(1)  # the peer never stores its rows; without the abort flag this would spin forever
    bufs.reduce(torch.ones(1, 16, dtype=torch.float16, device=DEVICE))
    assert bufs.epochs.tolist() == [1] * NUM_PROGRAMS  # it ran, and came back
