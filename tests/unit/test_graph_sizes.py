"""Which CUDA graphs a runner captures: every size on one rank or with NCCL only; under TP with the peer
all-reduce only the steps it takes, so that no graph holds an NCCL call (engine/cuda_graphs.py `graph_sizes`,
`TensorParallelGroup.graph_may_capture`)."""

import torch

from nanovllm.engine.cuda_graphs import PREFILL_GRAPH_TOKENS, graph_sizes
from nanovllm.engine.decode_step import decode_graph_sizes
from nanovllm.utils.distributed import TensorParallelGroup


def _tp2(with_peer: bool) -> TensorParallelGroup:
    return TensorParallelGroup(1, 2, backend=object(), peer_all_reduce=object() if with_peer else None)


def test_one_rank_and_nccl_only_capture_every_size():
    for group in (TensorParallelGroup(0, 1), _tp2(with_peer=False)):
        assert graph_sizes(PREFILL_GRAPH_TOKENS, group, 4096, torch.bfloat16) == list(PREFILL_GRAPH_TOKENS)
        assert graph_sizes(decode_graph_sizes(512), group, 4096, torch.float32) == decode_graph_sizes(512)


def test_peer_all_reduce_keeps_graphs_to_the_steps_it_takes():
    # 2 MiB of peer buffer a call: 1,024 rows of Qwen3-0.6B (1,024 wide) in bf16, 512 in fp32, 256 of Qwen3-8B
    peer = _tp2(with_peer=True)
    assert graph_sizes(PREFILL_GRAPH_TOKENS, peer, 1024, torch.bfloat16)[-1] == 1024
    assert graph_sizes(PREFILL_GRAPH_TOKENS, peer, 1024, torch.float32)[-1] == 512
    assert graph_sizes(PREFILL_GRAPH_TOKENS, peer, 4096, torch.bfloat16) == [16, 32, 64, 128, 256]
    decode = decode_graph_sizes(512)
    assert graph_sizes(decode, peer, 4096, torch.bfloat16) == [s for s in decode if s <= 256]
    assert graph_sizes(decode, peer, 4096, torch.float32) == [s for s in decode if s <= 128]
    assert graph_sizes(decode, peer, 1024, torch.bfloat16) == decode
