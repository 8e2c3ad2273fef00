"""Turns a scheduled batch into tensors, runs the model, samples.

Owns the model, the KV cache and the CUDA graphs of one rank. The scheduler's `ScheduledBatch`
comes in; `prepare` flattens it into a `ModelInput` record of host tensors (engine/step_input.py;
what a tensor-parallel worker receives too); `execute` runs the forward and returns the sampled
tokens; `launch` queues both and returns a `LaunchedStep` without waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

import torch

from nanovllm.config import Config
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.step_input import HostInputs, LaunchedStep, ModelInput
from nanovllm.kernels.backend import HAS_TRITON, kernel_backend
from nanovllm.kernels.decode_attention import default_num_splits, default_split_by_length
from nanovllm.kernels.paged_attention import MAX_GRID_Y, max_work_items, prefill_tile_tokens
from nanovllm.layers.attention import Attention, AttentionMetadata
from nanovllm.layers.sampler import Sampler, SamplerOutput
from nanovllm.layers.sampling_batch import (
    SamplingBatch,
    SamplingRequest,
    SamplingStaging,
    takes_plain_argmax,
)
from nanovllm.models import get_model_class
from nanovllm.models.decoder import head_dim_of, num_kv_heads_of
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.distributed import get_tp_group
from nanovllm.utils.env import env_int
from nanovllm.utils.loader import iter_checkpoint, iter_random_weights, load_weights

logger = logging.getLogger("nanovllm")

CPU_KV_CACHE_MAX_BYTES = 4 << 30  # the CPU path sizes its cache from this, not from free memory
# Token counts of the graphs for steps that are not all decode (prompts, chunks of prompts, mixed with
# decode tokens; a step pads to the next size). Eager, such a forward is ~9 launches per layer from
# Python, which on a slow host costs more than the GPU work below a few thousand tokens; a replay is one.
PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)
# Decode graphs of 16..112 sequences (single GPU) run the batch as two halves on two CUDA streams: at these
# sizes a step is a chain of latency-bound kernels, and two independent chains fill each other's gaps
# (one half's matmuls run beside the other half's attention). H100, Qwen3-0.6B, 800-2000-token contexts
# (benchmarks/two_stream_decode.py, results/two_stream_decode-...-080911.json): graph GPU time -6.4/-8.0/
# -7.1/-4.2/-5.8/-3.4/-2.1% at 16/32/48/64/80/96/112 sequences, -1.2% at 128; at 192 and 256 the second pass
# over the weights costs more than the overlap saves (+1.5/+1.2%). Eager steps pad and cut the batch the
# same way (same kernels, same tokens). NANOVLLM_TWO_STREAM_MAX_BATCH below 16 (e.g. 0) turns it off.
TWO_STREAM_MIN_BATCH = 16
TWO_STREAM_MAX_BATCH = env_int("NANOVLLM_TWO_STREAM_MAX_BATCH", 112)
# A decode step's per-sequence tensors, as `_decode_parts` and `_decode_forward` take them (a dict of these)
DECODE_TENSORS = ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables")


class DecodePart(NamedTuple):
    """Rows start:end of a decode step and their attention metadata."""

    start: int
    end: int
    meta: AttentionMetadata


def _pad_rows(t: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """A decode step's tensors with rows added up to `size` that every kernel skips (cache slot -1, length 0),
    as a graph replay pads its static buffers."""
    return {
        k: torch.cat([v, v.new_full((size - v.shape[0], *v.shape[1:]), -1 if k == "slot_mapping" else 0)])
        for k, v in t.items()
    }


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(self, config: Config, device: torch.device | None = None):
        self.config = config
        self.device = device or config.torch_device
        self.block_size = config.block_size
        self.tp_group = get_tp_group()
        self.rank, self.tp_size = self.tp_group.rank, self.tp_group.size
        hf = config.hf_config
        torch.manual_seed(config.seed)
        model_cls = get_model_class(hf)
        with _default_dtype(config.torch_dtype), torch.device(self.device):
            self.model = model_cls(hf, config.max_model_len)
        if config.model_path is not None:
            load_weights(self.model, iter_checkpoint(config.model_path))
        else:
            load_weights(
                self.model, iter_random_weights(model_cls.checkpoint_shapes(hf), config.seed, self.device)
            )
        self.model.eval()
        self.sampler = Sampler(seed=config.seed)
        self.sampling_staging = SamplingStaging(config.max_num_seqs, self.device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_kv_heads = max(1, num_kv_heads_of(hf) // self.tp_size)
        self.head_dim = head_dim_of(hf)
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        attn = self.attention_layers[0]
        self.tile_tokens = prefill_tile_tokens(attn.num_heads, attn.num_kv_heads)
        if max_work_items(config.max_num_batched_tokens, config.max_num_seqs, self.tile_tokens) > MAX_GRID_Y:
            raise ValueError(
                f"max_num_batched_tokens={config.max_num_batched_tokens} is too large for the prefill "
                f"attention kernel's grid with {attn.num_heads // attn.num_kv_heads} query heads per kv "
                f"head (at most {MAX_GRID_Y} query tiles of {self.tile_tokens} tokens per step)"
            )
        self.inputs = HostInputs(config, self.device, self.max_blocks_per_seq, self.tile_tokens)
        # Sampled ids: the last launched step's on the device (the next step's pending inputs), and
        # two pinned host buffers they are copied back into, in turn (see launch).
        max_seqs = config.max_num_seqs
        self._prev_tokens = torch.zeros(max_seqs, dtype=torch.int64, device=self.device)  # [max_num_seqs]
        self._num_prev_tokens = 0
        pin = self.device.type == "cuda"
        self._out_host = (  # 2 x [max_num_seqs] int64, pinned
            [torch.zeros(max_seqs, dtype=torch.int64, pin_memory=True) for _ in range(2)] if pin else []
        )
        self._out_events = [torch.cuda.Event(), torch.cuda.Event()] if pin else []
        self._out_turn = 0
        self._memory_note = ""  # how the KV budget was found, for the error message
        cuda = self.device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 0
        # Two-way decode splits count themselves in here (kernels/decode_attention.py); zeros between calls.
        self.decode_counters = torch.zeros(
            max_seqs * self.num_kv_heads, dtype=torch.int32, device=self.device
        )  # [max_num_seqs * kv heads]
        # Padded decode batch sizes cut in two halves (see TWO_STREAM_MAX_BATCH); not under TP, where the
        # halves' all-reduces would share the peer buffers.
        two_streams = cuda and self.tp_size == 1 and TWO_STREAM_MAX_BATCH >= TWO_STREAM_MIN_BATCH
        self.two_stream_sizes = (
            range(TWO_STREAM_MIN_BATCH, TWO_STREAM_MAX_BATCH + 1) if two_streams else range(0)
        )
        self.side_stream = torch.cuda.Stream(self.device) if two_streams else None  # a graph's second half
        # Decode steps' cu_seqlens_q: 0, 1, ..., max_num_seqs (one new token per sequence)
        self.decode_cu_seqlens = torch.arange(max_seqs + 1, dtype=torch.int32, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # decode: batch size -> graph
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # other steps: tokens -> graph
        self.num_kvcache_blocks = self._allocate_kv_cache()  # (runs an eager step: no graphs yet)
        max_bs = min(config.max_num_seqs, 512)
        self.graph_sizes = sorted({s for s in [1, 2, 4, 8, *range(16, max_bs, 16)] if s < max_bs} | {max_bs})
        self.prefill_graph_sizes = [t for t in PREFILL_GRAPH_TOKENS if t <= config.max_num_batched_tokens]
        if self.device.type == "cuda" and not config.enforce_eager:
            pool = self._capture_cuda_graphs()
            # (not with the torch reference ops: their attention reads the lengths on the host)
            if self.prefill_graph_sizes and config.kernel_backend != "torch" and HAS_TRITON:
                self._capture_prefill_graphs(pool)

    # ---- KV cache ---------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.config.torch_dtype).element_size()
        return 2 * len(self.attention_layers) * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _allocate_kv_cache(self) -> int:
        cfg = self.config
        if cfg.num_kvcache_blocks is not None:
            num_blocks = cfg.num_kvcache_blocks
        elif self.device.type == "cuda":
            num_blocks = self._profile_num_blocks()
        else:
            wanted = cfg.max_num_seqs * self.max_blocks_per_seq
            num_blocks = max(1, min(wanted, CPU_KV_CACHE_MAX_BYTES // self.block_bytes))
        if num_blocks * self.block_size < cfg.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {self.block_size} tokens = "
                f"{num_blocks * self.block_size} tokens, fewer than one max-length request "
                f"(max_model_len={cfg.max_model_len}); lower max_model_len or give the cache more memory "
                f"(gpu_memory_utilization / num_kvcache_blocks){self._memory_note}"
            )
        self._bind_kv_cache(num_blocks)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB)",
            num_blocks,
            self.block_size,
            num_blocks * self.block_size,
            num_blocks * self.block_bytes / 2**30,
        )
        return num_blocks

    def _bind_kv_cache(self, num_blocks: int) -> None:
        # kv_cache: [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]
        shape = (2, len(self.attention_layers), num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.config.torch_dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def _profile_num_blocks(self) -> int:
        """Run the largest step the scheduler can produce, then give the KV cache whatever
        gpu_memory_utilization leaves after weights and that step's peak activations."""
        cfg = self.config
        num_tokens = cfg.max_num_batched_tokens
        seq_len = min(cfg.max_model_len, num_tokens)
        num_seqs = -(-num_tokens // seq_len)
        self._bind_kv_cache(num_seqs * self.max_blocks_per_seq)
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        inp = self._profile_input(lens)
        sample_rows = min(cfg.max_num_seqs, num_tokens)
        inp.logits_indices = torch.arange(sample_rows, dtype=torch.int64)
        # The costliest sampling path too: penalties, top-k/top-p, logprobs over the full vocabulary.
        worst = SamplingParams(top_p=0.9, top_k=50, presence_penalty=0.5, repetition_penalty=1.1, logprobs=20)
        self.execute(inp, [SamplingRequest(worst, [0], [0], cfg.eos_token_ids)] * sample_rows)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del self.kv_cache
        for layer in self.attention_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        current = torch.cuda.memory_allocated(dev)
        free, total = torch.cuda.mem_get_info(dev)
        used_elsewhere = total - free - torch.cuda.memory_reserved(dev)  # other processes, CUDA context
        budget = total * cfg.gpu_memory_utilization - used_elsewhere - peak
        logger.info(
            "memory: weights+buffers %.2f GiB, profiling peak %.2f GiB, other %.2f GiB",
            current / 2**30,
            peak / 2**30,
            used_elsewhere / 2**30,
        )
        self._memory_note = (
            f" (on {dev}: total {total / 2**30:.1f} GiB x gpu_memory_utilization {cfg.gpu_memory_utilization}"
            f" - profiling peak {peak / 2**30:.1f} GiB - other processes {used_elsewhere / 2**30:.1f} GiB)"
        )
        return max(0, int(budget) // self.block_bytes)

    def _profile_input(self, lens: list[int]) -> ModelInput:
        """Fake prefill input over len(lens) fresh sequences laid out on consecutive blocks."""
        bs = self.block_size
        ids, pos, slots, tables, start = [], [], [], [], 0
        for i, n in enumerate(lens):
            first = i * self.max_blocks_per_seq
            ids += [0] * n
            pos += list(range(n))
            slots += [first * bs + p for p in range(n)]
            tables.append(list(range(first, first + self.max_blocks_per_seq)))
            start += n
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            logits_indices=torch.tensor([c - 1 for c in cu[1:]], dtype=torch.int64),
            max_query_len=max(lens),
            max_seq_len=max(lens),
        )

    # ---- one step ---------------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch) -> ModelInput:
        """The batch's forward inputs as host tensors (engine/step_input.py: HostInputs.build)."""
        return self.inputs.build(batch)

    def sampling_requests(self, batch: ScheduledBatch) -> list[SamplingRequest]:
        eos = self.config.eos_token_ids
        return [
            SamplingRequest.for_sequence(seq.params, seq.token_ids, seq.num_prompt_tokens, eos)
            for seq, samples in zip(batch.seqs, batch.samples)
            if samples
        ]

    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Queue the step's forward and sampling on the device and return without waiting: the host
        can schedule the next step meanwhile. Its sampled ids are copied back behind the sampler."""
        inp = self.prepare(batch)
        requests = self.sampling_requests(batch)
        inp.plain_argmax = self.tp_size > 1 and takes_plain_argmax(requests)
        out = self.execute(inp, requests)
        self.inputs.record()  # the copies from this input set are queued
        self.keep_sampled(out.token_ids if out is not None else None, inp.logits_indices.numel())
        if out is None:
            return LaunchedStep(None, None, None)
        num_sampled = out.token_ids.numel()
        if self.device.type != "cuda":
            return LaunchedStep(out.token_ids, None, out)
        self._out_turn ^= 1  # two in turn: the engine waits for a step before the next-but-one launch
        host = self._out_host[self._out_turn][:num_sampled]
        host.copy_(out.token_ids, non_blocking=True)
        extra = (out.logprobs, out.top_logprob_ids, out.top_logprobs)  # None unless asked for
        # (non_blocking copies to the CPU land in pinned memory)
        out = SamplerOutput(host, *(x if x is None else x.to("cpu", non_blocking=True) for x in extra))
        event = self._out_events[self._out_turn]
        event.record()
        return LaunchedStep(host, event, out)

    def keep_sampled(self, token_ids: torch.Tensor | None, num_sampled: int) -> None:
        """Keep a step's sampled ids on the device: the next step's pending input rows read them
        (`_input_ids`). Under tensor parallelism only rank 0 samples (token_ids: None elsewhere); it
        broadcasts them, queued behind the sampler with no host sync, so every rank feeds the same
        inputs to the next step."""
        if num_sampled and token_ids is None and self.rank == 0:
            raise RuntimeError(f"rank 0 sampled nothing for a step with {num_sampled} sampling rows")
        self._num_prev_tokens = num_sampled
        if num_sampled:
            prev = self._prev_tokens[:num_sampled]  # [num_sampled]
            if token_ids is not None:
                prev.copy_(token_ids)
            self.tp_group.broadcast(prev, src=0)

    def mirror(self, inp: ModelInput) -> None:
        """A tensor-parallel worker's step: rank 0's inputs, staged in this rank's pinned buffers, the
        same forward, and rank 0's sampled ids kept for the next step."""
        inp = self.inputs.stage(inp)
        self.execute(inp, [])  # no sampling requests: rank 0 samples
        self.inputs.record()
        self.keep_sampled(None, inp.logits_indices.numel())

    def run(self, batch: ScheduledBatch) -> tuple[list[int | None], SamplerOutput | None]:
        """Forward + sample, waiting for the result. Returns one entry per scheduled sequence: the
        sampled token, or None for a prefill chunk that does not reach the end of its tokens yet."""
        tokens, out = self.launch(batch).wait()
        it = iter(tokens)
        sampled = [next(it) if samples else None for samples in batch.samples]
        return sampled, out

    @torch.inference_mode()
    def execute(self, inp: ModelInput, requests: list[SamplingRequest]) -> SamplerOutput | None:
        dev = self.device
        to = lambda x: x.to(dev, non_blocking=True)  # noqa: E731
        with kernel_backend(self.config.kernel_backend):
            logits = None
            if inp.is_decode and self._graph_size(inp.num_seqs) is not None:
                hidden, logits = self._replay(inp)
            elif (size := self._prefill_graph_size(inp)) is not None:
                hidden = self._replay_prefill(inp, size)
            else:
                input_ids, positions = self._input_ids(to(inp.input_ids), inp), to(inp.positions)
                if inp.is_decode:
                    hidden = self._eager_decode(inp, input_ids, positions)
                else:
                    meta = AttentionMetadata(
                        slot_mapping=to(inp.slot_mapping),
                        cu_seqlens_q=to(inp.cu_seqlens_q),
                        seq_lens=to(inp.seq_lens),
                        block_tables=to(inp.block_tables),
                        max_query_len=inp.max_query_len,
                        max_seq_len=inp.max_seq_len,
                        is_decode=False,
                        prefill_work=None if inp.work_seq is None else (to(inp.work_seq), to(inp.work_tile)),
                    )
                    hidden = self.model(input_ids, positions, meta)
            if inp.logits_indices.numel() == 0:  # prefill chunks only: nothing to sample yet
                return None
            if logits is None and inp.plain_argmax:  # (tensor parallel) a collective, as the gather is
                token_ids = self.model.lm_head.greedy(hidden[to(inp.logits_indices)])
                return SamplerOutput(token_ids, None, None, None) if token_ids is not None else None
            if logits is None:
                # Every rank computes its vocabulary shard's logits: the LM head's gather is collective.
                # Only rank 0 gets the logits back, and only rank 0 has sampling requests.
                logits = self.model.compute_logits(hidden[to(inp.logits_indices)])
        if logits is None or not requests:  # a tensor-parallel rank other than 0
            return None
        return self.sampler(
            logits, SamplingBatch.build(requests, logits.shape[-1], dev, self.sampling_staging)
        )

    def _input_ids(self, input_ids: torch.Tensor, inp: ModelInput) -> torch.Tensor:
        """Fill in (on the device) the input tokens the previous step sampled but the host has not
        read back yet."""
        if inp.pending_rows is not None:
            if not self._num_prev_tokens:
                raise RuntimeError("a step has pending input tokens but the previous step sampled none")
            dev = self.device
            prev = self._prev_tokens[: self._num_prev_tokens]
            src = prev.index_select(0, inp.pending_src.to(dev, non_blocking=True))
            input_ids.index_copy_(0, inp.pending_rows.to(dev, non_blocking=True), src)
        return input_ids

    # ---- CUDA graphs for decode -------------------------------------------------------------

    def _graph_size(self, num_seqs: int) -> int | None:
        return self._padded_size(num_seqs) if self.graphs else None

    def _padded_size(self, num_seqs: int) -> int | None:
        return next((size for size in self.graph_sizes if size >= num_seqs), None)

    def _decode_splits(self, num_seqs: int) -> tuple[int | None, bool | None]:
        """(split-KV count, whether two splits cut only the longer sequences) for a decode step, from the
        padded batch size and max_model_len only, so eager steps and graph replays of the same batch cut
        the keys the same way (same tokens). (None, None) off CUDA: the kernel's defaults."""
        if self.device.type != "cuda":
            return None, None
        size = self._padded_size(num_seqs) or num_seqs
        return (
            default_num_splits(size, self.num_kv_heads, self.config.max_model_len, self.num_sms),
            default_split_by_length(size, self.num_kv_heads, self.num_sms),
        )

    def _eager_decode(
        self, inp: ModelInput, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:  # [num_seqs, hidden_size]
        """A decode step without a graph, cut as its graph would be: a batch whose graph size is cut in
        halves is padded to that size first, so that each half runs the same kernels (row counts pick
        them: GEMV, decode_linear, cuBLAS) and gives the same tokens as a replay."""
        n = inp.num_seqs
        t = {"input_ids": input_ids, "positions": positions}
        for k in ("slot_mapping", "seq_lens", "block_tables"):
            t[k] = getattr(inp, k).to(self.device, non_blocking=True)
        size = self._padded_size(n) or n
        halves = size in self.two_stream_sizes
        if halves and size > n:
            t = _pad_rows(t, size)
        return self._decode_forward(t, self._decode_parts(t, inp.max_seq_len, halves))[:n]

    def _decode_parts(self, t: dict[str, torch.Tensor], max_seq_len: int, halves: bool) -> list[DecodePart]:
        """A decode step's row ranges and their attention metadata, from its DECODE_TENSORS t (a graph's
        static buffers, or an eager step's): the whole batch, or its two halves. A part's split-KV count is
        that of a batch of its rows (so a half of 24 rows is split as the graph of 32 is)."""
        rows = t["seq_lens"].shape[0]
        cuts = [0, rows // 2, rows] if halves else [0, rows]
        parts = []
        for start, end in zip(cuts, cuts[1:]):
            num_splits, split_by_length = self._decode_splits(end - start)
            meta = AttentionMetadata(
                slot_mapping=t["slot_mapping"][start:end],
                cu_seqlens_q=self.decode_cu_seqlens[: end - start + 1],
                seq_lens=t["seq_lens"][start:end],
                block_tables=t["block_tables"][start:end],
                max_query_len=1,
                max_seq_len=max_seq_len,
                is_decode=True,
                decode_num_splits=num_splits,
                decode_split_by_length=split_by_length,
                # two-split arrival counts: each part its own (the halves of a graph run at once)
                decode_counters=self.decode_counters[start * self.num_kv_heads :],
            )
            parts.append(DecodePart(start, end, meta))
        return parts

    def _decode_forward(
        self,
        t: dict[str, torch.Tensor],  # DECODE_TENSORS of the step's rows
        parts: list[DecodePart],
        hidden: torch.Tensor | None = None,  # [rows, hidden_size], written (None: a new one)
        side: torch.cuda.Stream | None = None,
    ) -> torch.Tensor:  # [rows, hidden_size]
        """The model's forward of each part's rows. The parts run one after the other; with `side` (graph
        capture) two halves run at once, the second on that stream, forked from the current stream before
        the first half starts and joined back after it."""

        def forward(part: DecodePart) -> torch.Tensor:  # [end - start, hidden_size]
            rows = slice(part.start, part.end)
            return self.model(t["input_ids"][rows], t["positions"][rows], part.meta)

        if hidden is None and len(parts) == 1:
            return forward(parts[0])
        if hidden is None:
            hidden = torch.empty(t["input_ids"].shape[0], self.config.hf_config.hidden_size,
                                 dtype=self.config.torch_dtype, device=self.device)  # fmt: skip
        if side is None or len(parts) == 1:
            for part in parts:
                hidden[part.start : part.end] = forward(part)
            return hidden
        first, second = parts
        main = torch.cuda.current_stream(self.device)
        side.wait_stream(main)  # fork: the second half starts with the step
        hidden[first.start : first.end] = forward(first)
        with torch.cuda.stream(side):
            hidden[second.start : second.end] = forward(second)
        main.wait_stream(side)  # join: the LM head reads both halves
        return hidden

    def _capture_cuda_graphs(self):
        """Capture one decode forward per batch size; a step pads to the next captured size. Returns
        the graphs' memory pool."""
        max_bs = self.graph_sizes[-1]  # (the sizes: set in __init__, eager steps pad by them too)
        dev = self.device
        hidden_size = self.config.hf_config.hidden_size
        self.graph_bufs = {
            "input_ids": torch.zeros(max_bs, dtype=torch.int64, device=dev),
            "positions": torch.zeros(max_bs, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((max_bs,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.zeros(max_bs, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            "hidden": torch.zeros(max_bs, hidden_size, dtype=self.config.torch_dtype, device=dev),
        }
        # Single rank: the LM head runs inside the decode graphs too (one host launch less per step), into
        # one buffer that every graph shares; under TP its logits gather is a collective, which stays outside.
        if self.tp_size == 1:  # [max_bs, vocab rows of the LM head]
            vocab_rows = self.model.lm_head.weight.shape[0]
            dtype = self.config.torch_dtype
            self.graph_bufs["logits"] = torch.zeros(max_bs, vocab_rows, dtype=dtype, device=dev)
        pool = None
        with kernel_backend(self.config.kernel_backend), torch.inference_mode():
            for size in reversed(self.graph_sizes):
                self.graphs[size] = graph = self._capture(partial(self._graph_forward, size), pool)
                pool = graph.pool()
        return pool

    @staticmethod
    def _capture(forward: Callable[[], None], pool) -> torch.cuda.CUDAGraph:
        """A graph of forward(), recorded into the memory pool (None: a new one)."""
        forward()  # warm up (compiles kernels, moves tables to the device) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool):
            forward()
        torch.cuda.synchronize()
        return graph

    def _graph_forward(self, size: int) -> None:
        b = self.graph_bufs
        t = {k: b[k][:size] for k in DECODE_TENSORS}
        hidden = b["hidden"][:size]  # [size, hidden_size]
        parts = self._decode_parts(t, self.config.max_model_len, halves=size in self.two_stream_sizes)
        self._decode_forward(t, parts, hidden, self.side_stream)
        if "logits" in b:
            self.model.compute_logits(hidden, out=b["logits"][:size])

    def _replay(self, inp: ModelInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay the decode graph of the step's padded size: (hidden [n, hidden_size], and when the graph
        ran the LM head and every row samples, logits [n, vocab_size]; else None)."""
        n = inp.num_seqs
        size = self._graph_size(n)
        b = self.graph_bufs
        self._stage_graph_inputs(b, inp, size)
        b["seq_lens"][n:size].zero_()
        self.graphs[size].replay()
        if "logits" not in b or inp.logits_indices.numel() != n:  # (a 1-token prefill chunk samples nothing)
            return b["hidden"][:n], None
        return b["hidden"][:n], b["logits"][:n, : self.config.hf_config.vocab_size]

    def _stage_graph_inputs(self, b: dict[str, torch.Tensor], inp: ModelInput, size: int) -> None:
        """Copy the step's tokens (ids, pending ones filled in, positions, cache slots) and sequences
        (lengths, block tables) into a graph's static buffers b; tokens n..size are padding (slot -1)."""
        n, s = inp.input_ids.numel(), inp.num_seqs
        b["input_ids"][:n].copy_(inp.input_ids, non_blocking=True)
        self._input_ids(b["input_ids"][:n], inp)
        b["positions"][:n].copy_(inp.positions, non_blocking=True)
        b["slot_mapping"][:n].copy_(inp.slot_mapping, non_blocking=True)
        b["slot_mapping"][n:size].fill_(-1)
        b["seq_lens"][:s].copy_(inp.seq_lens, non_blocking=True)
        b["block_tables"][:s, : inp.block_tables.shape[1]].copy_(inp.block_tables, non_blocking=True)

    # ---- CUDA graphs for prefill and mixed steps ---------------------------------------------

    def _prefill_graph_size(self, inp: ModelInput) -> int | None:
        """The captured token count a prefill or mixed step pads to (None: run it eagerly)."""
        if not self.prefill_graphs or inp.is_decode:
            return None
        n = inp.input_ids.numel()
        return next((size for size in self.prefill_graph_sizes if size >= n), None)

    def _prefill_graph_shape(self, size: int) -> tuple[int, int]:
        """(sequences, attention work items) a graph of `size` tokens is recorded for: the most a step of
        that many tokens can have."""
        num_seqs = min(size, self.config.max_num_seqs)
        return num_seqs, max_work_items(size, num_seqs, self.tile_tokens)

    def _capture_prefill_graphs(self, pool) -> None:
        """Capture the forward of a step that is not all decode (prompts, chunks of prompts after their
        computed or cached prefix, mixed with decode tokens) per size in `prefill_graph_sizes`, in the
        decode graphs' pool. The graph of `size` tokens holds room for every sequence and prefill
        attention work item such a step can have; the spare items are -1 (skipped) and padding tokens
        have no cache slot (-1). The LM head runs outside, on the rows that sample."""
        dev, max_tokens = self.device, self.prefill_graph_sizes[-1]
        max_seqs, max_items = self._prefill_graph_shape(max_tokens)
        hidden_size = self.config.hf_config.hidden_size
        self.prefill_bufs = b = {
            "input_ids": torch.zeros(max_tokens, dtype=torch.int64, device=dev),
            "positions": torch.zeros(max_tokens, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((max_tokens,), -1, dtype=torch.int64, device=dev),
            "cu_seqlens_q": torch.zeros(max_seqs + 1, dtype=torch.int32, device=dev),
            "seq_lens": torch.zeros(max_seqs, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros(max_seqs, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            "work_seq": torch.full((max_items,), -1, dtype=torch.int32, device=dev),
            "work_tile": torch.zeros(max_items, dtype=torch.int32, device=dev),
            "hidden": torch.zeros(max_tokens, hidden_size, dtype=self.config.torch_dtype, device=dev),
        }
        with kernel_backend(self.config.kernel_backend), torch.inference_mode():
            for size in reversed(self.prefill_graph_sizes):
                num_seqs, num_items = self._prefill_graph_shape(size)
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
                forward = partial(self._prefill_graph_forward, size, meta)
                self.prefill_graphs[size] = graph = self._capture(forward, pool)
                pool = graph.pool()
        logger.info(
            "CUDA graphs: %d decode, %d prefill (up to %d tokens); %.2f GiB reserved after capture",
            len(self.graphs),
            len(self.prefill_graphs),
            max_tokens,
            torch.cuda.memory_reserved(dev) / 2**30,
        )

    def _prefill_graph_forward(self, size: int, meta: AttentionMetadata) -> None:
        b = self.prefill_bufs  # hidden: [size, hidden_size]
        b["hidden"][:size] = self.model(b["input_ids"][:size], b["positions"][:size], meta)

    def _replay_prefill(self, inp: ModelInput, size: int) -> torch.Tensor:
        """Replay the graph of `size` tokens for this prefill or mixed step: hidden [n, hidden_size]."""
        n, s, k, b = inp.input_ids.numel(), inp.num_seqs, inp.work_seq.numel(), self.prefill_bufs
        _, num_items = self._prefill_graph_shape(size)
        if k > num_items:  # (max_work_items bounds it; a graph must never drop tiles silently)
            raise RuntimeError(
                f"a step of {n} tokens has {k} attention work items; graph {size} holds {num_items}"
            )
        self._stage_graph_inputs(b, inp, size)
        b["cu_seqlens_q"][: s + 1].copy_(inp.cu_seqlens_q, non_blocking=True)
        b["work_seq"][:k].copy_(inp.work_seq, non_blocking=True)
        b["work_seq"][k:num_items].fill_(-1)
        b["work_tile"][:k].copy_(inp.work_tile, non_blocking=True)
        self.prefill_graphs[size].replay()
        return b["hidden"][:n]
