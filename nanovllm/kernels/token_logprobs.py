"""Each row's log-probability of one given token, its rank and the row's log-sum-exp, from raw logits in
one pass (prompt_logprobs: every prompt token is scored by the logits of the position before it).

    lse[r]     = log(sum_v exp(logits[r, v]))                  (fp32, online over vocabulary tiles)
    logprob[r] = logits[r, t_r] - lse[r]
    rank[r]    = #{v : logits[r, v] >= logits[r, t_r]}         (1: the row's most likely token; as vLLM,
                                                               tied tokens all take the last place of the tie)

The torch reference takes an fp32 copy of the logits ([R, V] x 4 bytes, 156 MB for 256 rows of Qwen3's
vocabulary) and reads it three times; the kernel reads the logits once, in their own dtype, and keeps
three numbers a row. Callers get the top alternatives' logprobs as `top logits - lse` (layers/sampler.py).
"""

import torch

from nanovllm.kernels.backend import tl, triton, use_triton

BLOCK_V = 2048  # vocabulary columns a program reads per iteration
NUM_WARPS = 8

# ---------------------------------------------------------------- torch reference


def token_logprobs_torch(
    logits: torch.Tensor, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [R, V] (any float dtype), token_ids [R] -> (logprob [R] fp32, rank [R] int64, lse [R] fp32)."""
    x = logits.float()
    chosen = x.gather(1, token_ids[:, None].long()).squeeze(1)  # [R]
    lse = torch.logsumexp(x, dim=-1)  # [R]
    rank = (x >= chosen[:, None]).sum(dim=-1)  # [R] int64
    return chosen - lse, rank, lse


# ---------------------------------------------------------------- Triton kernel


@triton.jit
def _token_logprobs_kernel(
    logits_ptr,
    row_stride,
    token_ids_ptr,
    logprob_ptr,
    rank_ptr,
    lse_ptr,
    vocab_size,
    BLOCK_V: tl.constexpr,
):
    # One program per row. Each lane keeps a running max and a sum of exp(x - max) over the columns it
    # sees (so -inf lanes, the tail's padding, need care), and counts the columns above the chosen logit.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    token = tl.load(token_ids_ptr + row).to(tl.int64)
    chosen = tl.load(base + token).to(tl.float32)
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    at_least = tl.zeros([BLOCK_V], tl.int32)  # columns whose logit is >= the token's
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        seen = new_max != float("-inf")  # (exp(-inf - -inf) would be NaN)
        scale = tl.where(seen, tl.exp(run_max - new_max), 0.0)
        run_sum = run_sum * scale + tl.where(seen, tl.exp(x - new_max), 0.0)
        run_max = new_max
        at_least += (x >= chosen).to(tl.int32)
    row_max = tl.max(run_max, axis=0)
    total = tl.sum(tl.where(run_max != float("-inf"), run_sum * tl.exp(run_max - row_max), 0.0), axis=0)
    lse = row_max + tl.log(total)
    tl.store(logprob_ptr + row, chosen - lse)
    tl.store(rank_ptr + row, tl.sum(at_least, axis=0).to(tl.int64))
    tl.store(lse_ptr + row, lse)


# ---------------------------------------------------------------- launcher


def token_logprobs_triton(
    logits: torch.Tensor, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows, vocab_size = logits.shape
    if token_ids.shape != (num_rows,):
        raise ValueError(f"token_ids must have shape ({num_rows},), got {tuple(token_ids.shape)}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    logprob = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    rank = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows:
        _token_logprobs_kernel[(num_rows,)](
            logits,
            logits.stride(0),
            token_ids,
            logprob,
            rank,
            lse,
            vocab_size,
            BLOCK_V=BLOCK_V,
            num_warps=NUM_WARPS,
        )
    return logprob, rank, lse


# ---------------------------------------------------------------- op


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [R, V] (raw, any float dtype; never written), token_ids [R] -> (the token's logprob [R] fp32,
    its rank [R] int64, the row's log-sum-exp [R] fp32). Rank counts the logits strictly above the token's."""
    if use_triton(logits):
        return token_logprobs_triton(logits, token_ids)
    return token_logprobs_torch(logits, token_ids)
