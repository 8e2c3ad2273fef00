"""Turns a scheduled batch into tensors, runs the model, samples.

Owns the model, the KV cache and the CUDA graphs of one rank. The scheduler's `ScheduledBatch`
comes in; `prepare` flattens it into a `ModelInput` record of host tensors (engine/step_input.py;
what a tensor-parallel worker receives too); `execute` runs the forward and returns the sampled
tokens; `launch` queues both and returns a `LaunchedStep` without waiting.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from nanovllm.config import Config
from nanovllm.engine.cuda_graphs import CudaGraphs
from nanovllm.engine.decode_step import DecodeStep
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.step_input import HostInputs, LaunchedStep, ModelInput
from nanovllm.kernels.backend import kernel_backend
from nanovllm.kernels.paged_attention import MAX_GRID_Y, max_work_items, prefill_tile_tokens
from nanovllm.layers.attention import Attention, AttentionMetadata
from nanovllm.layers.pooler import pool_hidden
from nanovllm.layers.sampler import PromptLogprobs, Sampler, SamplerOutput, score_tokens
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
from nanovllm.utils.loader import iter_checkpoint, iter_random_weights, load_weights

logger = logging.getLogger("nanovllm")

CPU_KV_CACHE_MAX_BYTES = 4 << 30  # the CPU path sizes its cache from this, not from free memory


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
        lm_head = config.runner_type == "generate"  # (runner "pooling": embeddings only, no LM head)
        with _default_dtype(config.torch_dtype), torch.device(self.device):
            self.model = model_cls(hf, config.max_model_len, lm_head=lm_head)
        if config.model_path is not None:
            load_weights(self.model, iter_checkpoint(config.model_path))
        else:
            shapes = model_cls.checkpoint_shapes(hf, lm_head=lm_head)
            load_weights(self.model, iter_random_weights(shapes, config.seed, self.device))
        self.model.finish_loading()
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
        # how a decode batch is cut and run, eager or in a graph (engine/decode_step.py)
        self.decode = DecodeStep(self.model, config, self.device, self.num_kv_heads, self.tp_size)
        self.cuda_graphs: CudaGraphs | None = None  # (engine/cuda_graphs.py; captured after the KV cache)
        self.num_kvcache_blocks = self._allocate_kv_cache()  # (runs an eager step: no graphs yet)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.cuda_graphs = CudaGraphs(
                self.model,
                config,
                self.decode,
                self.max_blocks_per_seq,
                self.tile_tokens,
                self.tp_group,
            )
        if self.device.type == "cuda" and self.model.lm_head is not None:
            self._warm_up_logits()

    @torch.inference_mode()
    def _warm_up_logits(self) -> None:
        """Run the LM head's matmul once at every row count an eager step can sample (1..max_num_seqs).
        cuBLAS picks a kernel by shape, and a kernel's first use loads its module and runs the heuristics,
        which stalls the host inside a step: on an H200 ~20 ms in one step, ~45 ms over the first mixed
        prefill + decode steps of a process's first large `generate` (docs/performance.md, session 30). The
        decode graphs' own matmuls were loaded when they were captured."""
        weight = self.model.lm_head.weight  # [vocab shard, hidden]
        hidden = torch.zeros(
            self.config.max_num_seqs, weight.shape[1], dtype=weight.dtype, device=self.device
        )
        for rows in range(1, self.config.max_num_seqs + 1):
            torch.nn.functional.linear(hidden[:rows], weight)  # [rows, vocab shard], as compute_logits

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
        sample_rows = min(cfg.max_num_seqs, num_tokens) if self.model.lm_head is not None else 0
        inp.logits_indices = torch.arange(sample_rows, dtype=torch.int64)
        # The costliest sampling path too: penalties, top-k/top-p, logprobs over the full vocabulary.
        worst = SamplingParams(
            top_p=0.9,
            top_k=50,
            presence_penalty=0.5,
            repetition_penalty=1.1,
            logprobs=20,
            logit_bias={0: 1.0},
            allowed_token_ids=[0, 1],
        )
        # (prompt_logprobs scores its rows sample_rows at a time, within this step's peak)
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
        """The batch's sampling rows. A penalized row's token ids come from the staging's mirror of its
        sequence (O(new tokens) a step); a pending token of its output is the previous step's sampled id
        at seq.pending_row, filled in on the device (SamplingBatch.build)."""
        eos, staging = self.config.eos_token_ids, self.sampling_staging
        return [
            SamplingRequest.for_sequence(
                seq.params,
                seq.token_ids,
                seq.num_prompt_tokens,
                eos,
                seq.num_pending_tokens,
                seq.pending_row,
                staging,
                seq.matcher,
            )
            for seq, samples in zip(batch.seqs, batch.samples)
            if samples
        ]

    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Queue the step's forward and sampling on the device and return without waiting: the host
        can schedule the next step meanwhile. Its sampled ids are copied back behind the sampler."""
        inp = self.prepare(batch)
        requests = self.sampling_requests(batch)
        inp.plain_argmax = self.tp_size > 1 and takes_plain_argmax(requests)
        out, prompt, pooled = self.execute(inp, requests)
        self.inputs.record()  # the copies from this input set are queued
        self.keep_sampled(out.token_ids if out is not None else None, inp.logits_indices.numel())
        if self.device.type != "cuda" or (out is None and prompt is None and pooled is None):
            return LaunchedStep(out.token_ids if out is not None else None, None, out, prompt, pooled)
        self._out_turn ^= 1  # two in turn: the engine waits for a step before the next-but-one launch
        host = None
        if out is not None:
            host = self._out_host[self._out_turn][: out.token_ids.numel()]
            host.copy_(out.token_ids, non_blocking=True)
            extra = (out.logprobs, out.top_logprob_ids, out.top_logprobs, out.ranks)  # None unless asked for
            # (non_blocking copies to the CPU land in pinned memory)
            out = SamplerOutput(host, *(x if x is None else x.to("cpu", non_blocking=True) for x in extra))
        if prompt is not None:
            prompt = prompt.to_host()
        if pooled is not None:
            pooled = pooled.to("cpu", non_blocking=True)
        event = self._out_events[self._out_turn]
        event.record()
        return LaunchedStep(host, event, out, prompt, pooled)

    def keep_sampled(self, token_ids: torch.Tensor | None, num_sampled: int) -> None:
        """Keep a step's sampled ids on the device: the next step's pending input rows read them
        (`_fill_pending`), and on rank 0 its penalized rows' pending output tokens (SamplingBatch.build).
        Under tensor parallelism only rank 0 samples (token_ids: None elsewhere); it broadcasts them,
        queued behind the sampler with no host sync, so every rank feeds the same inputs to the next step."""
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
        self.execute(inp, [])  # no sampling requests: rank 0 samples (and scores)
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
    def execute(
        self, inp: ModelInput, requests: list[SamplingRequest]
    ) -> tuple[SamplerOutput | None, PromptLogprobs | None, torch.Tensor | None]:
        """The step's forward, sampling (rank 0; None when it samples nothing), prompt_logprobs (rank 0;
        None when it scores nothing) and the embeddings' pooled sums ([num_pool_slots, hidden_size] float32;
        rank 0; None when no embedding request has rows in the step)."""
        dev = self.device
        to = lambda x: x.to(dev, non_blocking=True)  # noqa: E731
        with kernel_backend(self.config.kernel_backend):
            logits, prompt = None, None
            graphs = self.cuda_graphs if inp.score_rows is None else None  # scored rows: eager
            decode_size = graphs.decode_size(inp.num_seqs) if graphs is not None and inp.is_decode else None
            if decode_size is not None:
                hidden, logits = graphs.replay_decode(inp, decode_size, self._fill_pending)
            elif graphs is not None and (size := graphs.prefill_size(inp)) is not None:
                hidden = graphs.replay_prefill(inp, size, self._fill_pending)
            else:
                input_ids, positions = self._fill_pending(to(inp.input_ids), inp), to(inp.positions)
                if inp.is_decode:
                    hidden = self.decode.eager(inp, input_ids, positions)
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
            if inp.score_rows is not None:
                prompt = self._score_prompt(hidden, inp)
            pooled = None
            if inp.pool_rows is not None and self.rank == 0:  # (the hidden states are whole on every rank)
                pooled = pool_hidden(hidden, to(inp.pool_rows), to(inp.pool_slots), inp.num_pool_slots)
            if inp.logits_indices.numel() == 0:  # prefill chunks only: nothing to sample yet
                return None, prompt, pooled
            if logits is None and inp.plain_argmax:  # (tensor parallel) a collective, as the gather is
                token_ids = self.model.lm_head.greedy(hidden[to(inp.logits_indices)])
                return (SamplerOutput(token_ids) if token_ids is not None else None), prompt, pooled
            if logits is None:
                # Every rank computes its vocabulary shard's logits: the LM head's gather is collective.
                # Only rank 0 gets the logits back, and only rank 0 has sampling requests.
                logits = self.model.compute_logits(hidden[to(inp.logits_indices)])
        if logits is None or not requests:  # a tensor-parallel rank other than 0
            return None, prompt, pooled
        # (the previous step's sampled ids: keep_sampled replaces them behind this step's sampler)
        prev = self._prev_tokens[: self._num_prev_tokens]  # [num_prev]
        batch = SamplingBatch.build(requests, logits.shape[-1], dev, self.sampling_staging, prev)
        return self.sampler(logits, batch), prompt, pooled

    def _score_prompt(self, hidden: torch.Tensor, inp: ModelInput) -> PromptLogprobs | None:
        """prompt_logprobs: raw logprobs of each scored row's next prompt token, and the top alternatives.
        The LM head takes max_num_seqs rows at a time, as the memory profile's sampling step did. A
        collective under tensor parallelism (the logits' gather); None on the other ranks."""
        to = lambda x: x.to(self.device, non_blocking=True)  # noqa: E731
        rows, tokens = to(inp.score_rows), to(inp.score_tokens)  # [R], [R]
        step, parts = self.config.max_num_seqs, []
        for i in range(0, inp.score_rows.numel(), step):
            logits = self.model.compute_logits(hidden[rows[i : i + step]])  # [r, vocab] on rank 0
            if logits is not None:
                parts.append(score_tokens(logits, tokens[i : i + step], inp.num_score_top))
        return PromptLogprobs(*(torch.cat(p) for p in zip(*parts))) if parts else None

    def _fill_pending(self, input_ids: torch.Tensor, inp: ModelInput) -> torch.Tensor:
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
