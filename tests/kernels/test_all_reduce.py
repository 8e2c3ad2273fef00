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
    peer_all_reduce_triton,
)
from tests.sm90 import compile_sm90

WORLD = 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on the CPU
INT_DTYPES = {2: torch.int16, 4: torch.int32}


@pytest.fixture(autouse=True)
def _give_up_at_once(monkeypatch):
    # With the abort flag up (Buffers sets it), a kernel that finds no row where it looks gives up after one
    # spin, so a test fails instead of hanging; with the rows in place it never spins.
    monkeypatch.setattr(all_reduce, "ABORT_POLL_SPINS", 1)


class Buffers:
    """Both ranks' exchange buffers (slot_bytes per part, as PeerAllReduce sizes them); the kernel runs as
    `rank`, the test plays the other."""

    def __init__(self, slot_bytes: int, rank: int = 0):
        self.slot_bytes, self.rank, self.peer = slot_bytes, rank, 1 - rank
        num_halves = NUM_SLOTS * WORLD * slot_bytes // 2  # every 16-bit half EMPTY, as allocated
        self.raw = [
            torch.full((num_halves,), EMPTY_16, dtype=torch.int16, device=DEVICE) for _ in range(WORLD)
        ]
        self.epochs = torch.zeros(NUM_PROGRAMS, dtype=torch.int64, device=DEVICE)
        self.abort = torch.ones(1, dtype=torch.int32, device=DEVICE)  # see _give_up_at_once
        self.buffer_ptrs = torch.tensor([r.data_ptr() for r in self.raw], device=DEVICE)

    def bits(self, owner: int, dtype: torch.dtype) -> torch.Tensor:
        """`owner`'s buffer as [NUM_SLOTS, WORLD parts, slot_numel] integers of dtype's size."""
        int_dtype = INT_DTYPES[dtype.itemsize]
        return self.raw[owner].view(int_dtype).view(NUM_SLOTS, WORLD, self.slot_bytes // dtype.itemsize)

    @staticmethod
    def empty(dtype: torch.dtype) -> int:
        return EMPTY_16 if dtype.itemsize == 2 else EMPTY_32

    def publish_peer(self, rows: torch.Tensor, epoch: int) -> None:
        """What the peer's kernel does before the tested rank may read: its rows into slot epoch % 3, part
        `peer`, of the tested rank's buffer."""
        part = self.bits(self.rank, rows.dtype)[epoch % NUM_SLOTS, self.peer]
        part[: rows.numel()] = rows.flatten().view(part.dtype)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        slot_numel = self.slot_bytes // x.element_size()
        return peer_all_reduce_triton(
            x, self.buffer_ptrs, self.epochs, self.abort, self.rank, slot_numel, buffers_aligned=True
        )  # (torch's allocations are aligned, as the engine's are)

    def check_after(self, mine: torch.Tensor, epoch: int) -> None:
        """After call `epoch`: this rank's rows are in its part of the slot in the peer's buffer, and its own
        buffer is all EMPTY again (the peer's part restored, its own part never written)."""
        n, dtype = mine.numel(), mine.dtype
        sent = self.bits(self.peer, dtype)[epoch % NUM_SLOTS, self.rank]
        assert torch.equal(sent[:n], mine.flatten().view(sent.dtype))
        assert (sent[n:] == self.empty(dtype)).all()
        assert (self.bits(self.rank, dtype) == self.empty(dtype)).all()


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize(
    "rows,hidden,dtype",
    [(1, 64, torch.float16), (5, 40, torch.float32), (NUM_PROGRAMS + 3, 16, torch.float16)],
)
def test_sums_in_rank_order_rotating_slots(rows, hidden, dtype, rank):
    bufs = Buffers(slot_bytes=(rows * hidden + 8) * dtype.itemsize, rank=rank)
    gen = torch.Generator().manual_seed(rows)
    for epoch in (1, 2, 3, 4):  # every slot, then the first again
        mine, peer = (torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype) for _ in range(2))
        bufs.publish_peer(peer, epoch)
        want = all_reduce_reference([mine, peer] if rank == 0 else [peer, mine])
        got = bufs.reduce(mine.clone())
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        bufs.check_after(mine, epoch)
        assert bufs.epochs.tolist() == [epoch] * NUM_PROGRAMS


def test_16_and_32_bit_calls_share_one_buffer():
    bufs = Buffers(slot_bytes=4 * 64)
    gen = torch.Generator().manual_seed(3)
    for epoch, dtype in enumerate(
        (torch.float16, torch.float32, torch.float32, torch.float16, torch.float32), 1
    ):
        mine, peer = (torch.randn(3, 16, generator=gen).to(DEVICE, dtype) for _ in range(2))
        bufs.publish_peer(peer, epoch)
        torch.testing.assert_close(
            bufs.reduce(mine.clone()), all_reduce_reference([mine, peer]), rtol=0, atol=0
        )
        bufs.check_after(mine, epoch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_values_with_the_empty_bits_travel_as_values_that_add_the_same(dtype):
    # A value whose bits are EMPTY would read as "not arrived yet": fp16 -0.0 goes as +0.0, the fp32 denormal
    # 0x80008000 (-4.6e-41) as -0.0. Both ranks must still get the same bits (each adds its own rows swapped
    # the same way), next to a peer value of 0.0 that would show a difference.
    empty = Buffers.empty(dtype)
    int_dtype = INT_DTYPES[dtype.itemsize]

    def as_sent(t: torch.Tensor) -> torch.Tensor:  # what the peer's kernel stores for t
        bits = t.view(int_dtype)
        return bits.masked_fill(bits == empty, 0 if dtype == torch.float16 else NEG_ZERO_32).view(dtype)

    a = torch.ones(2, 16, dtype=dtype, device=DEVICE)
    a.view(int_dtype)[0, :4] = empty
    b = torch.full((2, 16), 2.0, dtype=dtype, device=DEVICE)
    b[0] = 0.0
    results = []
    for rank, (mine, peer) in enumerate([(a, b), (b, a)]):
        bufs = Buffers(slot_bytes=32 * dtype.itemsize, rank=rank)
        bufs.publish_peer(
            peer.clone().view(int_dtype).masked_fill(peer.view(int_dtype) == empty, 0).view(dtype), 1
        )
        results.append(bufs.reduce(mine.clone()))
        if rank == 0:
            sent = bufs.bits(bufs.peer, dtype)[1, 0, : mine.numel()].view(2, 16)
            assert sent[0, :4].tolist() == [0 if dtype == torch.float16 else NEG_ZERO_32] * 4
            assert torch.equal(sent[1], mine[1].view(int_dtype))
    assert torch.equal(results[0].view(int_dtype), results[1].view(int_dtype))
    torch.testing.assert_close(results[0], all_reduce_reference([a, b]), rtol=0, atol=1e-40)


def test_launcher_rejects_what_does_not_fit():
    bufs = Buffers(slot_bytes=64 * 2)
    with pytest.raises(ValueError, match="numel"):
        bufs.reduce(torch.zeros(5, 16, dtype=torch.float16, device=DEVICE))  # 80 > 64 elements
    with pytest.raises(ValueError, match="contiguous"):
        bufs.reduce(torch.zeros(16, 4, dtype=torch.float16, device=DEVICE).t())
    with pytest.raises(ValueError, match="numel"):
        bufs.reduce(
            torch.zeros(0, 16, dtype=torch.float16, device=DEVICE)
        )  # no rows: nothing would be exchanged
    with pytest.raises(ValueError, match="16- or 32-bit floats"):
        bufs.reduce(torch.zeros(4, 16, dtype=torch.float64, device=DEVICE))
    assert bufs.epochs.tolist() == [0] * NUM_PROGRAMS  # nothing was launched


def test_abort_flag_releases_a_rank_waiting_for_a_peer_that_never_comes():
    bufs = Buffers(slot_bytes=64 * 2)  # abort flag up; the peer never stores its rows
    bufs.reduce(torch.ones(1, 16, dtype=torch.float16, device=DEVICE))
    assert bufs.epochs.tolist() == [1] * NUM_PROGRAMS  # it ran, and came back


# Compiled for an H100 (sm_90) on any machine, as a launch with 16-byte aligned pointers would be: the wait
# loop's barriers for rows of a given width as the launcher blocks them (or as given), and the widths of the
# kernel's global stores and volatile loads (rows sent, polls).
def _compiled(
    hidden: int, block_h: int = 0, dtype: str = "fp32", aligned: bool = False, cache_dir: str | None = None
) -> dict:
    wide = dtype == "fp32"
    constants = dict(
        RANK=0,
        WORLD=2,
        BLOCK_H=block_h or all_reduce.row_block(hidden),
        NUM_PROGRAMS=NUM_PROGRAMS,
        ABORT_POLL_SPINS=1024,
        INT_DTYPE="tl.int32" if wide else "tl.int16",
        EMPTY=EMPTY_32 if wide else EMPTY_16,
        EMPTY_SENT_AS=NEG_ZERO_32 if wide else 0,
        NUM_SLOTS=NUM_SLOTS,
        ALIGNED=aligned,
    )
    pointer = "*fp32" if wide else "*bf16"
    types = dict(x_ptr=pointer, buffer_ptrs="*i64", epoch_ptr="*i64", abort_ptr="*i32")
    divisible = [n for n, t in types.items() if t.startswith("*")] + ["slot_numel"]
    divisible += ["hidden"] * (hidden % 16 == 0)  # as a launch specializes it
    kernel = all_reduce._peer_all_reduce_kernel
    return compile_sm90(kernel, constants, types, divisible, cache_dir, num_warps=all_reduce.NUM_WARPS)


def _barriers(hidden: int, block_h: int = 0) -> int:
    return _compiled(hidden, block_h)["barriers"]


def test_rows_are_aligned_only_where_every_offset_keeps_16_bytes():
    assert all_reduce.rows_aligned(True, 4096, 1 << 20, 2) and all_reduce.rows_aligned(True, 1004, 1 << 20, 4)
    assert not all_reduce.rows_aligned(False, 4096, 1 << 20, 2)  # a buffer address off 16 bytes
    assert not all_reduce.rows_aligned(True, 1004, 1 << 20, 2)  # 2,008-byte rows
    assert not all_reduce.rows_aligned(True, 4096, (1 << 20) + 4, 2)  # parts of odd size


@pytest.mark.slow
def test_aligned_rows_move_in_16_byte_stores_and_polls():
    # The buffers' addresses come from a table, so Triton cannot see their alignment; without the ALIGNED
    # hint a bf16 row crossed NVLink in 2-byte stores and was polled 2 bytes at a time (see rows_aligned).
    plain = _compiled(4096, dtype="bf16", aligned=False)["memory_ops"]
    assert plain.get("st.global.b16", 0) > 0 and plain.get("ld.volatile.global.b16", 0) > 0
    for dtype in ("bf16", "fp32"):
        widths = _compiled(4096, dtype=dtype, aligned=True)["memory_ops"]
        narrow = {op: n for op, n in widths.items() if not op.endswith((".v4.b32", ".b64"))}
        # what is left narrow: the epoch and the buffer table (b64), and the abort flag's poll (one b32)
        assert narrow == {"ld.volatile.global.b32": 1}, widths
        assert widths["st.global.v4.b32"] > 0 and widths["ld.volatile.global.v4.b32"] > 0


@pytest.mark.slow
def test_every_warp_of_a_program_leaves_the_wait_together():
    # In a row block narrower than the program's 256 threads, every warp holds a copy of the row and its
    # tl.sum reduces within the warp (no barrier): one warp could take the rows and put EMPTY back while
    # another still waits for them, forever (tests/gpu/test_peer_all_reduce_gpu.py's rows of 8 hung both GPUs
    # so). The launcher blocks rows at least as wide as the threads, so the sum crosses the warps.
    assert _barriers(8, block_h=8) == 0  # the old block for 8-wide rows: each warp on its own
    assert all(_barriers(hidden) > 0 for hidden in (8, 100))
