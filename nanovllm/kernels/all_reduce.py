"""One-shot all-reduce through peer memory: every rank gets every rank's partial sums over NVLink and adds
them itself, in one kernel.

NCCL's ring all-reduce of the ~0.5-2 MB a decode step reduces costs ~15 us, mostly protocol latency. Here
each rank's exchange buffer has, per slot, one part per rank (part r holds rank r's rows), and the rows
travel one of two ways (the constexpr PUSH):

    push (default)  write my rows into part RANK of every peer's buffer (NVLink stores: posted, so many are
                    in flight at once), then add my own rows and the parts the peers wrote into my buffer
                    (local reads)
    pull            copy my rows into part RANK of my own buffer, then read part q of every peer q's buffer
                    (NVLink loads: each waits a round trip, so fewer bytes are in flight)

The protocol, per program p (a fixed number of programs, so program p of every rank meets program p of every
other):

    epoch = ++epochs[p]                       this rank's call count (device memory: CUDA graphs replay it)
    put my rows into slot (epoch % 2), part RANK (push: of every peer's buffer; pull: of mine)
    flags_of_rank_q[my_rank, p] = epoch       for every other rank q (system-scope release: rows first)
    wait until my_flags[q, p] >= epoch        for every other rank q (volatile loads, then acquire)
    rows = sum over q, in rank order, of rank q's rows (fp32, one rounding: equal on every rank)

Two slots make reuse safe: to reach call e+2 a rank must have seen every peer's flag of call e+1, posted
after that peer's call e was complete — the last reader of what this rank writes at e+2 (push: the peer
read its own buffer's slot e % 2, which this rank now writes into; pull: the peer read this rank's).

With NORM, the kernel goes on with the decoder's add + RMSNorm on the summed rows it already holds
(rows are whole per program), so the norm after a row-parallel layer costs no extra launch.
"""

import torch

from nanovllm.kernels.backend import INTERPRETER, tl, triton
from nanovllm.kernels.rmsnorm import rms_norm_torch

NUM_PROGRAMS = 64  # the grid (at most half the SMs: all resident at once); fixed for every call of a group
ABORT_POLL_SPINS = 1024  # spins between looks at the host's abort flag (over PCIe, slow)
PUSH = True  # write rows into the peers' buffers (True) or read them from there (False); see above

# ---------------------------------------------------------------- torch reference


def all_reduce_reference(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum every rank gets: the ranks' tensors added in rank order in fp32, rounded once."""
    acc = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for part in parts:
        acc += part.to(acc.device, torch.float32)
    return acc.to(parts[0].dtype)


def all_reduce_rms_norm_reference(
    parts: list[torch.Tensor], weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(sum + residual) * weight, sum + residual): the fused variant's results."""
    total = all_reduce_reference(parts)
    if residual is None:
        return rms_norm_torch(total, weight, eps), total
    return rms_norm_torch(total, weight, eps, residual)


# ---------------------------------------------------------------- Triton kernel


@triton.jit(do_not_specialize=["num_rows"])
def _peer_all_reduce_kernel(
    x_ptr,  # [num_rows, hidden] this rank's part; the sum (or, with NORM, sum + residual) is written here
    buffer_ptrs,  # [world] int64: every rank's exchange buffer, [2 slots, world parts, slot_numel]
    flag_ptrs,  # [world] int64: every rank's flags, [world, NUM_PROGRAMS] int64
    epoch_ptr,  # [NUM_PROGRAMS] int64: this rank's call count, per program
    abort_ptr,  # [1] int32 in pinned host memory: nonzero makes waiting programs give up
    residual_ptr,  # [num_rows, hidden] (HAS_RESIDUAL)
    weight_ptr,  # [hidden] (NORM)
    out_ptr,  # [num_rows, hidden] rms_norm(sum + residual) * weight (NORM)
    num_rows,
    hidden,
    slot_numel,
    eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    ABORT_POLL_SPINS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PUSH: tl.constexpr,
    SYS_FENCE: tl.constexpr,  # False only in the interpreter, which has no inline PTX
):
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    epoch = tl.load(epoch_ptr + pid) + 1
    tl.store(epoch_ptr + pid, epoch)
    slot = (epoch % 2) * WORLD * slot_numel
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden

    mine = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(dtype)) + slot  # my buffer's slot
    for row in range(pid, num_rows, NUM_PROGRAMS):
        offs = row * hidden + cols  # < slot_numel: int32 is enough
        x_row = tl.load(x_ptr + offs, mask=mask)
        if PUSH:
            for q in tl.static_range(WORLD):
                if q != RANK:
                    peer = tl.load(buffer_ptrs + q).to(tl.pointer_type(dtype)) + slot
                    tl.store(peer + RANK * slot_numel + offs, x_row, mask=mask)
        else:
            tl.store(mine + RANK * slot_numel + offs, x_row, mask=mask)
    if SYS_FENCE:
        # Every thread makes its own stores visible to the other GPUs: the release of the flag below orders
        # the posting thread's stores, and a CTA barrier alone did not always carry the others' (the 2-GPU
        # test saw stale rows once at commit 1198c57).
        tl.inline_asm_elementwise(
            "fence.acq_rel.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )
    tl.debug_barrier()  # every thread's rows are written before the flag says so

    for q in tl.static_range(WORLD):
        if q != RANK:
            flags = tl.load(flag_ptrs + q).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(flags + RANK * NUM_PROGRAMS + pid, epoch, sem="release", scope="sys")
    my_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int64))
    for q in tl.static_range(WORLD):
        if q != RANK:
            flag = my_flags + q * NUM_PROGRAMS + pid
            # Spin on volatile loads (uncached: they see the peer's write as soon as it lands), then one
            # acquire read, so that the rows read below are ordered after the flag.
            seen = tl.load(flag, volatile=True)
            spins = 0
            while seen < epoch:
                spins += 1
                if spins % ABORT_POLL_SPINS == 0:
                    if tl.load(abort_ptr, volatile=True) != 0:
                        seen = epoch  # the group is being torn down: stop waiting, the result is dropped
                if seen < epoch:
                    seen = tl.load(flag, volatile=True)
            tl.atomic_add(flag, 0, sem="acquire", scope="sys")
    tl.debug_barrier()  # no thread reads a peer's rows before the flags said they are there

    for row in range(pid, num_rows, NUM_PROGRAMS):
        offs = row * hidden + cols  # < slot_numel: int32 is enough
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for q in tl.static_range(WORLD):
            if PUSH and q == RANK:
                acc += tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:  # .cv: not an L1 copy left from when this slot last held other rows
                part = mine if PUSH else tl.load(buffer_ptrs + q).to(tl.pointer_type(dtype)) + slot
                acc += tl.load(part + q * slot_numel + offs, mask=mask, other=0.0, cache_modifier=".cv").to(
                    tl.float32
                )
        total = acc.to(dtype)
        if HAS_RESIDUAL:  # as rms_norm's residual path: the add rounded to the input dtype
            res = tl.load(residual_ptr + offs, mask=mask, other=0.0)
            total = (total.to(tl.float32) + res.to(tl.float32)).to(dtype)
        tl.store(x_ptr + offs, total, mask=mask)
        if NORM:
            t = total.to(tl.float32)
            variance = tl.sum(t * t, axis=0) / hidden
            normed = (t * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
            weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launcher


def peer_all_reduce_triton(
    x: torch.Tensor,
    buffer_ptrs: torch.Tensor,
    flag_ptrs: torch.Tensor,
    epochs: torch.Tensor,
    abort_flag: torch.Tensor,
    rank: int,
    slot_numel: int,
    norm: tuple[torch.Tensor, float, torch.Tensor | None] | None = None,
    num_programs: int = NUM_PROGRAMS,
    push: bool = PUSH,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sum x (contiguous, [..., hidden], numel <= slot_numel) over the ranks in place; returns x.
    Every rank's buffer holds [2 slots, world parts, slot_numel] elements of x's dtype.
    With norm = (weight, eps, residual or None), x becomes sum + residual and the result is
    (rms_norm(x) * weight, x): the decoder's add+norm, as `rms_norm(sum, weight, eps, residual)`.
    Every rank must call this with the same shape, in the same order as its other collectives, and the
    same num_programs and push every time (the flags and epochs hold num_programs entries per rank)."""
    world = buffer_ptrs.numel()
    hidden = x.shape[-1]
    if not x.is_contiguous() or x.numel() > slot_numel or hidden == 0:
        raise ValueError(f"x must be contiguous with 0 < numel <= {slot_numel}, got {tuple(x.shape)}")
    weight, eps, residual = norm if norm is not None else (x, 0.0, None)
    if norm is not None and weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}"
        )
    out = x
    if norm is not None:
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block_h = triton.next_power_of_2(hidden)
    _peer_all_reduce_kernel[(num_programs,)](
        x,
        buffer_ptrs,
        flag_ptrs,
        epochs,
        abort_flag,
        residual.contiguous() if residual is not None else x,
        weight,
        out,
        x.numel() // hidden,
        hidden,
        slot_numel,
        eps,
        RANK=rank,
        WORLD=world,
        BLOCK_H=block_h,
        NUM_PROGRAMS=num_programs,
        ABORT_POLL_SPINS=ABORT_POLL_SPINS,
        NORM=norm is not None,
        HAS_RESIDUAL=residual is not None,
        PUSH=push,
        SYS_FENCE=not INTERPRETER,
    )
    return (out, x) if norm is not None else x
