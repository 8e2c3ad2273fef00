"""One-shot all-reduce through peer memory: every rank writes its partial sums into every peer's buffer over
NVLink and adds what the peers wrote into its own, in one kernel, with no flags: the rows signal themselves.

NCCL's ring all-reduce of the ~0.5-2 MB a decode step reduces costs ~15 us, mostly protocol latency. Here
each rank's exchange buffer has, per slot, one part per rank (part r holds rank r's rows). Every 16-bit half
of a buffer holds EMPTY (0x8000, the bits of a 16-bit -0.0) wherever no row is waiting. Per program p (a
fixed number of programs, so program p of every rank meets program p of every other):

    epoch = ++epochs[p]                       this rank's call count (device memory: CUDA graphs replay it)
    store my rows into slot (epoch % 3), part RANK, of every peer's buffer
                                              (NVLink stores, posted: all of them are in flight at once)
    for every other rank q: poll part q of my slot until no element of the row is EMPTY (volatile loads),
                            take the row, and put EMPTY back
    rows = sum over q, in rank order, of rank q's rows (fp32, one rounding: equal on every rank)

A value whose bits are EMPTY is sent as a neighbour that adds the same (or within 5e-41): a 16-bit -0.0 as
+0.0, the fp32 denormal -4.6e-41 (0x80008000) as -0.0; a rank adds its own rows swapped the same way, so
every rank sums the same values. Each element is its own arrival signal, so no store needs ordering
against another: no memory fence, no flag, and no round trip after the data (a flag protocol must fence
every writer thread at system scope before it posts the flag). Reuse is safe: a peer writes slot e % 3
again only in call e+3, which it reaches after taking this rank's rows of call e+2, which this rank stores
after its call e (the one that emptied slot e % 3) completed. (Two slots would do by the same argument;
the third is margin.) Every call must have at least one row on every rank: a call without rows exchanges
nothing, so it would not hold the ranks together.
"""

import torch

from nanovllm.kernels.backend import tl, triton

# The grid: one program per SM at most, so that all are resident at once (each waits for its peer's program
# of the same index); fixed for every call of a group. At 256 rows x 4096 (2 MiB), 128 programs of 8 warps
# reduce in 13.7 us and 64 programs in 15.6-17.0 (2 x H100); from 1 to 128 rows they tie.
NUM_PROGRAMS = 128
NUM_WARPS = 8  # 5-10% faster than 4 from 1 to 128 rows
# A program's row block is never narrower than its threads. In a narrower one, several warps hold copies of
# the same elements and each polls on its own, with no cross-warp reduction in tl.sum to make them agree:
# one warp could see the whole row, put EMPTY back, and leave another polling forever for rows that came
# and went (the 2-GPU test's rows of 8 hung both ranks that way). With every element in one thread, tl.sum
# reduces across all warps, so they all leave the wait in the same spin.
MIN_BLOCK_H = 32 * NUM_WARPS
ABORT_POLL_SPINS = 1024  # spins between looks at the host's abort flag (over PCIe, slow)
NUM_SLOTS = 3
EMPTY_16 = -32768  # int16 0x8000: a buffer's every 16-bit half between calls
EMPTY_32 = -2147450880  # int32 0x80008000: two EMPTY_16 halves, the empty word of a 32-bit row
NEG_ZERO_32 = -2147483648  # int32 0x80000000, the bits of fp32 -0.0: what an fp32 EMPTY value is sent as

# ---------------------------------------------------------------- torch reference


def all_reduce_reference(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum every rank gets: the ranks' tensors added in rank order in fp32, rounded once."""
    acc = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for part in parts:
        acc += part.to(acc.device, torch.float32)
    return acc.to(parts[0].dtype)


# ---------------------------------------------------------------- Triton kernel


@triton.jit
def _as_sent(x_ptr, offs, mask, INT_DTYPE: tl.constexpr, EMPTY: tl.constexpr, EMPTY_SENT_AS: tl.constexpr):
    """This rank's elements at offs as integers, as it sends them (and adds them itself): EMPTY swapped."""
    bits = tl.load(x_ptr + offs, mask=mask, other=0.0).to(INT_DTYPE, bitcast=True)
    return tl.where(bits == EMPTY, EMPTY_SENT_AS, bits)


@triton.jit(do_not_specialize=["num_rows"])
def _peer_all_reduce_kernel(
    x_ptr,  # [num_rows, hidden] this rank's part; the sum is written here
    buffer_ptrs,  # [world] int64: every rank's buffer, [NUM_SLOTS, world parts, slot_numel] INT_DTYPE
    epoch_ptr,  # [NUM_PROGRAMS] int64: this rank's call count, per program
    abort_ptr,  # [1] int32 in pinned host memory: nonzero makes waiting programs give up
    num_rows,
    hidden,
    slot_numel,  # elements of x's dtype per part
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    ABORT_POLL_SPINS: tl.constexpr,
    INT_DTYPE: tl.constexpr,  # tl.int16 or tl.int32: x's elements as integers
    EMPTY: tl.constexpr,  # EMPTY_16 or EMPTY_32
    EMPTY_SENT_AS: tl.constexpr,  # what a value with EMPTY's bits is sent as: 0 or NEG_ZERO_32
    NUM_SLOTS: tl.constexpr,
    ALIGNED: tl.constexpr,  # every row starts at a 16-byte aligned address: 16-byte stores and polls
):
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr + pid) + 1
    tl.store(epoch_ptr + pid, epoch)
    slot = (epoch % NUM_SLOTS) * WORLD * slot_numel
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    mine = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(INT_DTYPE)) + slot

    for row in range(pid, num_rows, NUM_PROGRAMS):
        offs = row * hidden + cols  # < slot_numel: int32 is enough
        bits = _as_sent(x_ptr, offs, mask, INT_DTYPE, EMPTY, EMPTY_SENT_AS)
        for q in tl.static_range(WORLD):
            if q != RANK:
                peer = tl.load(buffer_ptrs + q).to(tl.pointer_type(INT_DTYPE)) + slot
                dst = peer + RANK * slot_numel + offs
                if ALIGNED:  # (Triton knows nothing of a table's addresses: it would go element by element)
                    dst = tl.multiple_of(dst, 16)
                tl.store(dst, bits, mask=mask)

    dtype = x_ptr.dtype.element_ty
    for row in range(pid, num_rows, NUM_PROGRAMS):
        offs = row * hidden + cols
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for q in tl.static_range(WORLD):
            if q == RANK:  # as sent to the peers (an EMPTY value swapped), so that every rank adds the same
                own = _as_sent(x_ptr, offs, mask, INT_DTYPE, EMPTY, EMPTY_SENT_AS)
                acc += own.to(dtype, bitcast=True).to(tl.float32)
            else:
                part = mine + q * slot_numel + offs
                if ALIGNED:
                    part = tl.multiple_of(part, 16)
                # volatile: uncached loads, which see the peer's stores as they land
                bits = tl.load(part, mask=mask, other=0, volatile=True)
                num_spins = 0
                while tl.sum((bits == EMPTY).to(tl.int32), axis=0) > 0:
                    num_spins += 1
                    if num_spins % ABORT_POLL_SPINS == 0:
                        if tl.load(abort_ptr, volatile=True) != 0:
                            bits = tl.zeros_like(bits)  # torn down: stop waiting, the result is dropped
                    if tl.sum((bits == EMPTY).to(tl.int32), axis=0) > 0:
                        bits = tl.load(part, mask=mask, other=0, volatile=True)
                tl.store(part, tl.full([BLOCK_H], EMPTY, INT_DTYPE), mask=mask)
                acc += bits.to(dtype, bitcast=True).to(tl.float32)
        tl.store(x_ptr + offs, acc.to(dtype), mask=mask)


# ---------------------------------------------------------------- launcher


def rows_aligned(buffers_aligned: bool, hidden: int, slot_numel: int, element_size: int) -> bool:
    """Whether every row the kernel sends or polls starts at a 16-byte aligned address: the buffers' bases
    are, and every offset is a multiple of a part (slot_numel) or of a row (hidden). Then rows move in 16-byte
    stores and polls: 0.7-1.6 us less a call than element by element (1-256 rows x 4096 bf16, 2 x H200)."""
    return buffers_aligned and (hidden * element_size) % 16 == 0 and (slot_numel * element_size) % 16 == 0


def row_block(hidden: int) -> int:
    """BLOCK_H for rows of `hidden` elements: a power of two, and no fewer than a program's threads."""
    return max(triton.next_power_of_2(hidden), MIN_BLOCK_H)


def peer_all_reduce_triton(
    x: torch.Tensor,
    buffer_ptrs: torch.Tensor,
    epochs: torch.Tensor,
    abort_flag: torch.Tensor,
    rank: int,
    slot_numel: int,
    num_programs: int = NUM_PROGRAMS,
    buffers_aligned: bool = False,
) -> torch.Tensor:
    """Sum x (contiguous, [..., hidden], 16- or 32-bit floats, numel <= slot_numel) over the ranks in place;
    returns x. Every rank's buffer holds [NUM_SLOTS, world parts, slot_numel] elements of x's size, all
    EMPTY before the first call (they are again after every call).
    Every rank must call this with the same shape, in the same order as its other collectives, and the
    same num_programs every time (the epochs hold num_programs entries).
    buffers_aligned: every address in buffer_ptrs is a multiple of 16 (the caller knows them on the host;
    the kernel cannot); see `rows_aligned`."""
    hidden = x.shape[-1]
    if x.element_size() not in (2, 4) or not x.is_floating_point():
        raise ValueError(f"the peer all-reduce takes 16- or 32-bit floats, got {x.dtype}")
    if not x.is_contiguous() or not 0 < x.numel() <= slot_numel:
        # (zero rows would exchange nothing, and a peer could then run two calls ahead into a live slot)
        raise ValueError(f"x must be contiguous with 0 < numel <= {slot_numel}, got {tuple(x.shape)}")
    wide = x.element_size() == 4
    _peer_all_reduce_kernel[(num_programs,)](
        x,
        buffer_ptrs,
        epochs,
        abort_flag,
        x.numel() // hidden,
        hidden,
        slot_numel,
        RANK=rank,
        WORLD=buffer_ptrs.numel(),
        BLOCK_H=row_block(hidden),
        NUM_PROGRAMS=num_programs,
        ABORT_POLL_SPINS=ABORT_POLL_SPINS,
        INT_DTYPE=tl.int32 if wide else tl.int16,
        EMPTY=EMPTY_32 if wide else EMPTY_16,
        EMPTY_SENT_AS=NEG_ZERO_32 if wide else 0,
        NUM_SLOTS=NUM_SLOTS,
        ALIGNED=rows_aligned(buffers_aligned, hidden, slot_numel, x.element_size()),
        num_warps=NUM_WARPS,
    )
    return x
