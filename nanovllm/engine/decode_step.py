"""A decode step's forward: the whole batch in one piece, or in two halves on two CUDA streams.

Every sequence of a decode step computes one token, and the rows of the batch never meet before the
logits. At 16-128 sequences a step is a chain of ~260 latency-bound kernels, so on a single GPU the batch
of a small model (whose second pass over the weights is cheap) runs as two halves whose chains fill each
other's gaps: one half's matmuls run beside the other half's attention (docs/cuda_graphs.md, "Two halves on
two streams"). `DecodeStep` decides how a batch is cut and what each part's attention metadata is, and runs
the parts. Eager steps and the decode graphs (engine/cuda_graphs.py) both go through it, so that a batch runs
the same kernels on the same rows either way, and gives the same tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nanovllm.config import Config
from nanovllm.engine.step_input import ModelInput
from nanovllm.kernels.decode_attention import default_num_splits, default_split_by_length
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.utils.env import env_int

# Padded decode batches of 16..128 sequences (single GPU) run as two halves. H100, Qwen3-0.6B, 800-2000-token
# contexts (benchmarks/two_stream_decode.py, results/two_stream_decode-...-080911.json): graph GPU time -6.4/
# -8.0/-7.1/-4.2/-5.8/-3.4/-2.1% at 16/32/48/64/80/96/112 sequences, -1.2% at 128; at 192 and 256 the second
# pass over the weights costs more than the overlap saves (+1.5/+1.2%). NANOVLLM_TWO_STREAM_MAX_BATCH below 16
# (e.g. 0) turns it off.
TWO_STREAM_MIN_BATCH = 16
# 112 until session 32, whose H200 A/Bs of the default workload (two, 3 alternating rounds each) read
# +0.3 points of the floor for 128 and -0.1 for 144 (docs/performance.md "Session 32").
TWO_STREAM_MAX_BATCH = env_int("NANOVLLM_TWO_STREAM_MAX_BATCH", 128)
# The halves read the weights twice: worth it only where a pass over them is short next to the rest of the
# step. Qwen3-0.6B (1.2 GB in bf16, 2.4 GB in float32) gains as above; Qwen3-8B (16 GB) lost 30% at batch 64
# on an H200 (7.8k decode tok/s against 10.8-11.1k in one piece, results/tp_scaling-...-123114.json, TP=1).
# Models between (Qwen3-1.7B: 3.4 GB) are unmeasured and stay in one piece.
TWO_STREAM_MAX_WEIGHT_BYTES = 3 * 2**30
# A decode step's per-sequence tensors, as `DecodeStep.parts` and `DecodeStep.forward` take them (a dict)
DECODE_TENSORS = ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables")


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights on this rank (a tied weight once: `parameters()` lists it once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def two_stream_sizes(*, cuda: bool, tp_size: int, weight_bytes: int) -> range:
    """The padded decode batch sizes cut in two halves: 16..128 on a single GPU for a model of at most
    TWO_STREAM_MAX_WEIGHT_BYTES; none under TP, where the halves' all-reduces would share the peer buffers."""
    on = cuda and tp_size == 1 and weight_bytes <= TWO_STREAM_MAX_WEIGHT_BYTES
    return range(TWO_STREAM_MIN_BATCH, TWO_STREAM_MAX_BATCH + 1 if on else 0)


class DecodePart(NamedTuple):
    """Rows start:end of a decode step and their attention metadata."""

    start: int
    end: int
    meta: AttentionMetadata


def decode_graph_sizes(max_num_seqs: int) -> list[int]:
    """The padded decode batch sizes: 1, 2, 4, 8, 16, 32, 48, ... up to min(max_num_seqs, 512). A decode
    graph is captured for each; eager steps pad to them too (attention splits, two halves)."""
    max_bs = min(max_num_seqs, 512)
    return sorted({s for s in [1, 2, 4, 8, *range(16, max_bs, 16)] if s < max_bs} | {max_bs})


def pad_rows(t: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """A decode step's tensors with rows added up to `size` that every kernel skips (cache slot -1, length 0),
    as a graph replay pads its static buffers."""
    return {
        k: torch.cat([v, v.new_full((size - v.shape[0], *v.shape[1:]), -1 if k == "slot_mapping" else 0)])
        for k, v in t.items()
    }


class DecodeStep:
    """How one rank cuts and runs a decode batch (its model, its KV heads)."""

    def __init__(
        self, model: torch.nn.Module, config: Config, device: torch.device, num_kv_heads: int, tp_size: int
    ):
        self.model, self.config, self.device = model, config, device
        self.num_kv_heads = num_kv_heads
        self.sizes = decode_graph_sizes(config.max_num_seqs)
        cuda = device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 0
        max_seqs = config.max_num_seqs
        # Self-combining decode splits count themselves in here (kernels/decode_attention.py); zeros between
        # calls.
        # [max_num_seqs * num_kv_heads]
        self.counters = torch.zeros(max_seqs * num_kv_heads, dtype=torch.int32, device=device)
        # cu_seqlens_q of a decode step: 0, 1, ..., max_num_seqs (one new token per sequence)
        self.cu_seqlens = torch.arange(max_seqs + 1, dtype=torch.int32, device=device)
        weight_bytes = model_weight_bytes(model)
        self.two_stream_sizes = two_stream_sizes(cuda=cuda, tp_size=tp_size, weight_bytes=weight_bytes)
        self.side_stream = torch.cuda.Stream(device) if self.two_stream_sizes else None  # a graph's 2nd half

    def padded_size(self, num_seqs: int) -> int | None:
        """The decode batch size a step of num_seqs sequences pads to (None: more than the largest)."""
        return next((size for size in self.sizes if size >= num_seqs), None)

    def splits(self, num_seqs: int) -> tuple[int | None, bool | None]:
        """(split-KV count, whether the splits cut the sequences by length) for a decode step, from the
        padded batch size and max_model_len only, so eager steps and graph replays of the same batch cut
        the keys the same way (same tokens). (None, None) off CUDA: the kernel's defaults."""
        if self.device.type != "cuda":
            return None, None
        size = self.padded_size(num_seqs) or num_seqs
        return (
            default_num_splits(size, self.num_kv_heads, self.config.max_model_len, self.num_sms),
            default_split_by_length(size, self.num_kv_heads, self.num_sms),
        )

    def parts(self, t: dict[str, torch.Tensor], max_seq_len: int, halves: bool) -> list[DecodePart]:
        """A decode step's row ranges and their attention metadata, from its DECODE_TENSORS t (a graph's
        static buffers, or an eager step's): the whole batch, or its two halves. A part's split-KV count is
        that of a batch of its rows (so a half of 24 rows is split as the graph of 32 is)."""
        rows = t["seq_lens"].shape[0]
        cuts = [0, rows // 2, rows] if halves else [0, rows]
        parts = []
        for start, end in zip(cuts, cuts[1:]):
            num_splits, split_by_length = self.splits(end - start)
            meta = AttentionMetadata(
                slot_mapping=t["slot_mapping"][start:end],
                cu_seqlens_q=self.cu_seqlens[: end - start + 1],
                seq_lens=t["seq_lens"][start:end],
                block_tables=t["block_tables"][start:end],
                max_query_len=1,
                max_seq_len=max_seq_len,
                is_decode=True,
                decode_num_splits=num_splits,
                decode_split_by_length=split_by_length,
                # the self-combining splits' arrival counts: each part its own (a graph's halves run at once)
                decode_counters=self.counters[start * self.num_kv_heads :],
            )
            parts.append(DecodePart(start, end, meta))
        return parts

    def forward(
        self,
        t: dict[str, torch.Tensor],  # DECODE_TENSORS of the step's rows
        parts: list[DecodePart],
        hidden: torch.Tensor | None = None,  # [rows, hidden_size], written (None: a new one)
        side: torch.cuda.Stream | None = None,
    ) -> torch.Tensor:  # [rows, hidden_size]
        """The model's forward of each part's rows. The parts run one after the other; with `side` (graph
        capture) two halves run at once, the second on that stream, forked from the current stream before
        the first half starts and joined back after it."""

        def run(part: DecodePart) -> torch.Tensor:  # [end - start, hidden_size]
            rows = slice(part.start, part.end)
            return self.model(t["input_ids"][rows], t["positions"][rows], part.meta)

        if hidden is None and len(parts) == 1:
            return run(parts[0])
        if hidden is None:
            hidden = torch.empty(t["input_ids"].shape[0], self.config.hf_config.hidden_size,
                                 dtype=self.config.torch_dtype, device=self.device)  # fmt: skip
        if side is None or len(parts) == 1:
            for part in parts:
                hidden[part.start : part.end] = run(part)
            return hidden
        first, second = parts
        main = torch.cuda.current_stream(self.device)
        side.wait_stream(main)  # fork: the second half starts with the step
        hidden[first.start : first.end] = run(first)
        with torch.cuda.stream(side):
            hidden[second.start : second.end] = run(second)
        main.wait_stream(side)  # join: the LM head reads both halves
        return hidden

    def eager(self, inp: ModelInput, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A decode step without a graph (returns hidden [num_seqs, hidden_size]), cut as its graph would be:
        a batch whose graph size is cut in halves is padded to that size first, so that each half runs the
        same kernels (row counts pick them: GEMV, decode_linear, cuBLAS) and gives the same tokens as a
        replay."""
        n = inp.num_seqs
        t = {"input_ids": input_ids, "positions": positions}
        for k in ("slot_mapping", "seq_lens", "block_tables"):
            t[k] = getattr(inp, k).to(self.device, non_blocking=True)
        size = self.padded_size(n) or n
        halves = size in self.two_stream_sizes
        if halves and size > n:
            t = pad_rows(t, size)
        return self.forward(t, self.parts(t, inp.max_seq_len, halves))[:n]
