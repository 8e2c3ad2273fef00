"""The one-pass token logprob / rank / log-sum-exp kernel (prompt_logprobs) against its torch reference: the
Triton interpreter on CPU (fp32, fp16), the real thing under the `gpu` marker (bf16, Qwen3's vocabulary)."""

import pytest
import torch

from nanovllm.kernels.token_logprobs import token_logprobs_torch, token_logprobs_triton
from nanovllm.layers.sampler import score_tokens

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _logits(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return (3 * torch.randn(rows, vocab, generator=generator, device=device)).to(dtype)


def check(rows: int, vocab: int, dtype: torch.dtype, device: str) -> None:
    logits = _logits(rows, vocab, dtype, device)
    tokens = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(1)).to(device)
    tokens[-1] = vocab - 1  # the last column, in the tail tile
    tokens[0] = logits[0].float().argmax()  # rank 1
    before = logits.clone()
    got = token_logprobs_triton(logits, tokens)
    want = token_logprobs_torch(logits, tokens)
    assert torch.equal(logits, before)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4)  # logprob
    assert torch.equal(got[1], want[1])  # rank: the same comparisons of the same values
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-4)  # log-sum-exp
    assert got[1][0] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 5), (3, 2048), (5, 5000)])  # < 1, = 1, 3 tiles (a tail)
def test_token_logprobs_kernel(rows: int, vocab: int, dtype: torch.dtype) -> None:
    check(rows, vocab, dtype, "cpu")


def test_score_tokens_matches_log_softmax() -> None:
    logits = _logits(4, 300, torch.float32, "cpu")
    tokens = torch.tensor([0, 17, 299, 5])
    chosen, top_ids, top_logprobs, ranks = score_tokens(logits, tokens, 3)
    raw = logits.log_softmax(-1)
    torch.testing.assert_close(chosen, raw.gather(1, tokens[:, None]).squeeze(1))
    values, ids = raw.topk(3, dim=-1)
    assert torch.equal(top_ids, ids)
    torch.testing.assert_close(top_logprobs, values)
    assert torch.equal(ranks, (raw >= chosen[:, None]).sum(-1))
    none = score_tokens(logits, tokens, 0)
    assert none[1].shape == none[2].shape == (4, 0)


@pytest.mark.parametrize("kernel", [token_logprobs_torch, token_logprobs_triton])
def test_tied_tokens_all_take_the_last_place_of_the_tie(kernel) -> None:
    # vLLM's rank (batched_count_greater_than: x >= the token's value): a tie for first is rank 2 for both
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 3.0, 3.0, 0.0], [5.0, 2.0, 2.0, 2.0]])
    tokens = torch.tensor([1, 2, 3])
    assert kernel(logits, tokens)[1].tolist() == [2, 2, 4]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows", [1, 256])
def test_token_logprobs_kernel_gpu(rows: int) -> None:
    check(rows, 151_936, torch.bfloat16, "cuda")
