"""Which CUDA graphs a runner captures: every size on one rank or when NCCL does every all-reduce; under TP
with the peer all-reduce in use only the steps it takes, so that no graph holds an NCCL call
(engine/cuda_graphs.py `graph_sizes`, `TensorParallelGroup.graph_may_capture`), and a decode step whose
padded size got no graph runs eagerly (`CudaGraphs.decode_size`)."""

import torch

from nanovllm.engine.cuda_graphs import PREFILL_GRAPH_TOKENS, CudaGraphs, graph_sizes
from nanovllm.engine.decode_step import DecodeStep, decode_graph_sizes
from nanovllm.utils.distributed import TensorParallelGroup

DECODE = decode_graph_sizes(512)


def _tp2(with_peer: bool) -> TensorParallelGroup:
    return TensorParallelGroup(1, 2, backend=object(), peer_all_reduce=object() if with_peer else None)


def test_one_rank_and_nccl_only_capture_every_size():
    # one rank; no peer all-reduce; a peer all-reduce the torch reference ops do not use
    cases = [(TensorParallelGroup(0, 1), True), (_tp2(with_peer=False), True), (_tp2(with_peer=True), False)]
    for group, triton in cases:
        prefill = graph_sizes(PREFILL_GRAPH_TOKENS, group, 4096, torch.bfloat16, triton)
        assert prefill == list(PREFILL_GRAPH_TOKENS)
        assert graph_sizes(DECODE, group, 4096, torch.float32, triton) == DECODE


def test_peer_all_reduce_keeps_graphs_to_the_steps_it_takes():
    # 2 MiB of peer buffer a call: 1,024 rows of Qwen3-0.6B (1,024 wide) in bf16, 512 in fp32, 256 of Qwen3-8B
    peer = _tp2(with_peer=True)
    assert graph_sizes(PREFILL_GRAPH_TOKENS, peer, 1024, torch.bfloat16, True)[-1] == 1024
    assert graph_sizes(PREFILL_GRAPH_TOKENS, peer, 1024, torch.float32, True)[-1] == 512
    assert graph_sizes(PREFILL_GRAPH_TOKENS, peer, 4096, torch.bfloat16, True) == [16, 32, 64, 128, 256]
    assert graph_sizes(DECODE, peer, 4096, torch.bfloat16, True) == [s for s in DECODE if s <= 256]
    assert graph_sizes(DECODE, peer, 4096, torch.float32, True) == [s for s in DECODE if s <= 128]
    assert graph_sizes(DECODE, peer, 1024, torch.bfloat16, True) == DECODE
    assert graph_sizes(DECODE, peer, 32768, torch.bfloat16, True) == []  # rows wider than the kernel takes


def test_a_decode_step_without_its_graph_runs_eagerly():
    graphs = object.__new__(CudaGraphs)  # (no capture: the lookup alone)
    graphs.decode_step = object.__new__(DecodeStep)
    graphs.decode_step.sizes = [1, 2, 4, 8, 16]
    graphs.decode, graphs.prefill = {1: None, 2: None, 4: None}, {}  # the captured prefix
    assert [graphs.decode_size(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert graphs.decode_size(5) is None and graphs.decode_size(16) is None and graphs.decode_size(17) is None
    graphs.release()
    assert graphs.decode_size(1) is None
