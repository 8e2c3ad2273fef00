"""One rank's CUDA graphs: a decode graph per padded batch size, a graph per token count for the other steps.

A replay submits a whole forward (~260 kernels for Qwen3-0.6B) with one call, where an eager forward
launches each kernel from Python. The price: a replay reuses the recorded pointers and shapes, so a step's
inputs are copied into static buffers and the step is padded to the next captured size (padding rows: cache
slot -1, length 0, which every kernel skips). docs/cuda_graphs.md walks through it.

- Decode graphs, one per size of `DecodeStep.sizes` (1, 2, 4, 8, 16, 32, 48, ...), record `DecodeStep.forward`
  (two halves on two streams where `DecodeStep.two_stream_sizes` says so) and, on a single GPU, the LM head
  into a shared logits buffer.
- Prefill graphs, one per size of PREFILL_GRAPH_TOKENS within the token budget, record the forward of any step
  that is not all decode (prompts, chunks of prompts, mixed with decode tokens), with room for the most
  sequences and prefill attention work items a step of that many tokens can have; the LM head runs outside.
All are captured largest first into one memory pool. Under TP with the peer all-reduce, only the sizes whose
all-reduces it takes get a graph (`graph_sizes`: no graph holds an NCCL call); larger steps run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial

import torch

from nanovllm.config import Config
from nanovllm.engine.decode_step import DECODE_TENSORS, DecodeStep
from nanovllm.engine.step_input import ModelInput
from nanovllm.kernels.backend import HAS_TRITON, kernel_backend
from nanovllm.kernels.paged_attention import max_work_items
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.utils.distributed import TensorParallelGroup

logger = logging.getLogger("nanovllm")

# Token counts of the graphs for steps that are not all decode (a step pads to the next size). Eager, such a
# forward is ~9 launches per layer from Python, which on a slow host costs more than the GPU work below a few
# thousand tokens; a replay is one.
PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)

# Fills in (on the device) a step's input ids that the previous step sampled but the host has not read back:
# (input_ids [n] on the device, the step's input) -> input_ids
FillPending = Callable[[torch.Tensor, ModelInput], torch.Tensor]


def graph_sizes(
    sizes: Iterable[int], tp_group: TensorParallelGroup, hidden_size: int, dtype: torch.dtype, triton: bool
) -> list[int]:
    """The sizes (tokens of a step) a runner captures graphs for: all of them on one rank, or when NCCL does
    every all-reduce; under TP with the peer all-reduce in use (Triton kernels), those whose [size,
    hidden_size] all-reduces it takes (2 MiB: 1,024 tokens of Qwen3-0.6B in bf16, 256 of Qwen3-8B), so that no
    graph holds an NCCL call (`TensorParallelGroup.graph_may_capture`); larger steps run eagerly. A prefix of
    sorted sizes: a step larger than one that does not fit does not fit either."""
    return [s for s in sizes if tp_group.graph_may_capture(s, hidden_size, dtype, triton)]


def capture(forward: Callable[[], None], pool) -> torch.cuda.CUDAGraph:
    """A graph of forward(), recorded into the memory pool (None: a new one)."""
    forward()  # warm up (compiles kernels, moves tables to the device) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool):
        forward()
    torch.cuda.synchronize()
    return graph


class CudaGraphs:
    """Captures at construction; `replay_decode` / `replay_prefill` run a step through them."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: Config,
        decode: DecodeStep,
        max_blocks_per_seq: int,
        tile_tokens: int,  # the prefill attention kernel's query tile
        tp_group: TensorParallelGroup,
    ):
        # (nothing here refers back to the runner: a cycle would keep the graphs alive after the runner is
        # dropped, and under TP the group's abort waits for graphs that captured NCCL calls to be freed)
        self.model, self.config, self.decode_step = model, config, decode
        self.device = decode.device
        self.max_blocks_per_seq, self.tile_tokens = max_blocks_per_seq, tile_tokens
        self.decode: dict[int, torch.cuda.CUDAGraph] = {}  # batch size -> graph
        self.prefill: dict[int, torch.cuda.CUDAGraph] = {}  # tokens -> graph
        triton = config.kernel_backend != "torch" and HAS_TRITON
        capturable = partial(
            graph_sizes,
            tp_group=tp_group,
            hidden_size=config.hf_config.hidden_size,
            dtype=config.torch_dtype,
            triton=triton,
        )
        self.decode_sizes = capturable(decode.sizes)  # a prefix of decode.sizes
        self.prefill_sizes = capturable(t for t in PREFILL_GRAPH_TOKENS if t <= config.max_num_batched_tokens)
        # (the LM head inside the graphs: single rank, and a model that has one; runner "pooling" has none)
        with_lm_head = tp_group.size == 1 and model.lm_head is not None
        pool = self._capture_decode(with_lm_head) if self.decode_sizes else None
        # (not with the torch reference ops: their attention reads the lengths on the host)
        if self.prefill_sizes and triton:
            self._capture_prefill(pool)
        logger.info(
            "CUDA graphs: %d decode, %d prefill (up to %d tokens); %.2f GiB reserved after capture",
            len(self.decode),
            len(self.prefill),
            max(self.prefill, default=0),
            torch.cuda.memory_reserved(self.device) / 2**30,
        )

    def release(self) -> None:
        """Free every graph now, whoever still holds this object (a traceback's frame, a test's wrapper). No
        sync of its own (one could wait on a dead peer), though freeing a graph may still wait for work in
        flight: called from the TP watcher while rank 0 sat in an NCCL collective, it hung (session 20)."""
        self.decode.clear()
        self.prefill.clear()

    def _static(self, rows: int, seqs: int) -> dict[str, torch.Tensor]:
        """Zeroed static buffers for steps of up to `rows` tokens and `seqs` sequences (no cache slot: -1)."""
        dev, hidden_size = self.device, self.config.hf_config.hidden_size
        return {
            "input_ids": torch.zeros(rows, dtype=torch.int64, device=dev),
            "positions": torch.zeros(rows, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((rows,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.zeros(seqs, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros(seqs, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            "hidden": torch.zeros(rows, hidden_size, dtype=self.config.torch_dtype, device=dev),
        }

    @staticmethod
    def _stage(b: dict[str, torch.Tensor], inp: ModelInput, size: int, fill_pending: FillPending) -> None:
        """Copy the step's tokens (ids, pending ones filled in, positions, cache slots) and sequences
        (lengths, block tables) into static buffers b; tokens n..size are padding (slot -1)."""
        n, s = inp.input_ids.numel(), inp.num_seqs
        b["input_ids"][:n].copy_(inp.input_ids, non_blocking=True)
        fill_pending(b["input_ids"][:n], inp)
        b["positions"][:n].copy_(inp.positions, non_blocking=True)
        b["slot_mapping"][:n].copy_(inp.slot_mapping, non_blocking=True)
        b["slot_mapping"][n:size].fill_(-1)
        b["seq_lens"][:s].copy_(inp.seq_lens, non_blocking=True)
        b["block_tables"][:s, : inp.block_tables.shape[1]].copy_(inp.block_tables, non_blocking=True)

    # ---- decode -----------------------------------------------------------------------------

    def _capture_decode(self, with_lm_head: bool):
        """One graph per decode batch size, largest first; returns the memory pool. With the LM head (single
        rank; under TP its logits gather is a collective, which stays outside), into one shared buffer."""
        max_bs = self.decode_sizes[-1]
        self.decode_bufs = self._static(max_bs, max_bs)
        if with_lm_head:  # [max_bs, vocab rows of the LM head]
            vocab_rows = self.model.lm_head.weight.shape[0]
            dtype = self.config.torch_dtype
            self.decode_bufs["logits"] = torch.zeros(max_bs, vocab_rows, dtype=dtype, device=self.device)
        pool = None
        with kernel_backend(self.config.kernel_backend), torch.inference_mode():
            for size in reversed(self.decode_sizes):
                self.decode[size] = graph = capture(partial(self.decode_forward, size), pool)
                pool = graph.pool()
        return pool

    def decode_forward(self, size: int) -> None:
        """What a decode graph of `size` records: the forward of the buffers' first `size` rows."""
        b, step = self.decode_bufs, self.decode_step
        t = {k: b[k][:size] for k in DECODE_TENSORS}
        hidden = b["hidden"][:size]  # [size, hidden_size]
        parts = step.parts(t, self.config.max_model_len, halves=size in step.two_stream_sizes)
        step.forward(t, parts, hidden, step.side_stream)
        if "logits" in b:
            self.model.compute_logits(hidden, out=b["logits"][:size])

    def decode_size(self, num_seqs: int) -> int | None:
        """The graph a decode step of num_seqs sequences replays (None: none fits, or none was captured for
        its padded size; the step then runs eagerly, its attention split as the padded size's would be)."""
        size = self.decode_step.padded_size(num_seqs)
        return size if size in self.decode else None

    def replay_decode(
        self, inp: ModelInput, size: int, fill_pending: FillPending
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay the decode graph of `size` (`decode_size`) for this step: (hidden [n, hidden_size], and when
        the graph ran the LM head and every row samples, logits [n, vocab_size]; else None)."""
        n = inp.num_seqs
        b = self.decode_bufs
        self._stage(b, inp, size, fill_pending)
        b["seq_lens"][n:size].zero_()
        self.decode[size].replay()
        if "logits" not in b or inp.logits_indices.numel() != n:  # (a 1-token prefill chunk samples nothing)
            return b["hidden"][:n], None
        return b["hidden"][:n], b["logits"][:n, : self.config.hf_config.vocab_size]

    # ---- prefill and mixed steps ------------------------------------------------------------

    def _prefill_shape(self, size: int) -> tuple[int, int]:
        """(sequences, attention work items) a graph of `size` tokens is recorded for: the most a step of
        that many tokens can have."""
        num_seqs = min(size, self.config.max_num_seqs)
        return num_seqs, max_work_items(size, num_seqs, self.tile_tokens)

    def _capture_prefill(self, pool) -> None:
        """One graph per size in `prefill_sizes`, largest first, in the decode graphs' pool. The spare work
        items of a replay are -1 (skipped) and padding tokens have no cache slot (-1)."""
        max_tokens = self.prefill_sizes[-1]
        max_seqs, max_items = self._prefill_shape(max_tokens)
        dev = self.device
        self.prefill_bufs = b = self._static(max_tokens, max_seqs)
        b["cu_seqlens_q"] = torch.zeros(max_seqs + 1, dtype=torch.int32, device=dev)
        b["work_seq"] = torch.full((max_items,), -1, dtype=torch.int32, device=dev)
        b["work_tile"] = torch.zeros(max_items, dtype=torch.int32, device=dev)
        with kernel_backend(self.config.kernel_backend), torch.inference_mode():
            for size in reversed(self.prefill_sizes):
                self.prefill[size] = graph = capture(self._prefill_forward_of(size), pool)
                pool = graph.pool()

    def _prefill_forward_of(self, size: int) -> Callable[[], None]:
        """What the prefill graph of `size` tokens records, on the buffers' first rows."""
        b = self.prefill_bufs
        num_seqs, num_items = self._prefill_shape(size)
        meta = AttentionMetadata(
            slot_mapping=b["slot_mapping"][:size],
            cu_seqlens_q=b["cu_seqlens_q"][: num_seqs + 1],
            seq_lens=b["seq_lens"][:num_seqs],
            block_tables=b["block_tables"][:num_seqs],
            max_query_len=size,
            max_seq_len=self.config.max_model_len,
            is_decode=False,
            prefill_work=(b["work_seq"][:num_items], b["work_tile"][:num_items]),
        )

        def forward() -> None:  # hidden: [size, hidden_size]
            b["hidden"][:size] = self.model(b["input_ids"][:size], b["positions"][:size], meta)

        return forward

    def prefill_size(self, inp: ModelInput) -> int | None:
        """The captured token count a prefill or mixed step pads to (None: run it eagerly)."""
        if not self.prefill or inp.is_decode:
            return None
        n = inp.input_ids.numel()
        return next((size for size in self.prefill_sizes if size >= n), None)

    def replay_prefill(self, inp: ModelInput, size: int, fill_pending: FillPending) -> torch.Tensor:
        """Replay the graph of `size` tokens for this prefill or mixed step: hidden [n, hidden_size]."""
        n, s, k, b = inp.input_ids.numel(), inp.num_seqs, inp.work_seq.numel(), self.prefill_bufs
        _, num_items = self._prefill_shape(size)
        if k > num_items:  # (max_work_items bounds it; a graph must never drop tiles silently)
            raise RuntimeError(
                f"a step of {n} tokens has {k} attention work items; graph {size} holds {num_items}"
            )
        self._stage(b, inp, size, fill_pending)
        b["cu_seqlens_q"][: s + 1].copy_(inp.cu_seqlens_q, non_blocking=True)
        b["work_seq"][:k].copy_(inp.work_seq, non_blocking=True)
        b["work_seq"][k:num_items].fill_(-1)
        b["work_tile"][:k].copy_(inp.work_tile, non_blocking=True)
        self.prefill[size].replay()
        return b["hidden"][:n]
