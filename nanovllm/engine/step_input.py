"""A step's inputs on the host. The scheduler's `ScheduledBatch` is flattened into a `ModelInput`
record of host tensors (what a tensor-parallel worker receives too), written into pinned buffers that
are reused every step; `LaunchedStep` is the handle of a step queued on the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.config import Config
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.kernels.paged_attention import max_work_items, prefill_work_items
from nanovllm.layers.sampler import PromptLogprobs, SamplerOutput


@dataclass
class ModelInput:
    """One step's forward inputs as host tensors."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    logits_indices: torch.Tensor  # [num_sampled] int64: rows of the hidden states to sample from
    max_query_len: int
    max_seq_len: int
    # Input tokens sampled by the previous step and not yet read back (overlapped scheduling): the
    # forward takes input_ids[pending_rows] from that step's sampled ids [pending_src], on the device.
    pending_rows: torch.Tensor | None = None  # [num_pending] int64
    pending_src: torch.Tensor | None = None  # [num_pending] int64
    # The prefill attention kernel's (sequence, query tile) items (kernels/paged_attention.py); None for
    # decode steps, which use the decode kernel.
    work_seq: torch.Tensor | None = None  # [num_items] int32
    work_tile: torch.Tensor | None = None  # [num_items] int32
    # Every sampling row takes the plain argmax (rank 0 decides, the workers follow): under tensor
    # parallelism the ranks then exchange their best (logit, id) per row, not the logits.
    plain_argmax: bool = False
    # prompt_logprobs: the LM head also runs on these rows, each scoring the prompt token after it. Such a
    # step runs eagerly (the graphs return only the sampled rows' logits).
    score_rows: torch.Tensor | None = None  # [num_scored] int64: rows of the hidden states
    score_tokens: torch.Tensor | None = None  # [num_scored] int64: the prompt token each row scores
    num_score_top: int = 0  # alternatives to return per scored row (the batch's largest prompt_logprobs)
    # Embeddings: the hidden-state rows each embedding request pools this step, and which of the step's
    # num_pool_slots requests (in batch order, those with rows) each row adds to (layers/pooler.py).
    pool_rows: torch.Tensor | None = None  # [num_pooled] int64
    pool_slots: torch.Tensor | None = None  # [num_pooled] int64
    num_pool_slots: int = 0

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.numel()


@dataclass
class LaunchedStep:
    """A step queued on the device. `wait()` returns its sampled ids (in sampler-row order) and the
    sampler output (logprobs on the host); `prompt_logprobs` is on the host after it too."""

    token_ids: torch.Tensor | None  # [num_sampled] int64 on the host (pinned: filled behind the step)
    event: torch.cuda.Event | None  # recorded after the copies back; None: already complete (CPU)
    output: SamplerOutput | None
    prompt_logprobs: PromptLogprobs | None  # the batch's `scores` rows, in order
    # [num_pool_slots, hidden_size] float32 on the host (pinned: filled behind the step): the sums of the
    # rows the batch's embedding requests pool (`pools`), one row per request with rows, in batch order
    pooled: torch.Tensor | None

    def wait(self) -> tuple[list[int], SamplerOutput | None]:
        if self.event is not None:
            self.event.synchronize()  # the one device->host sync of a step
        return (self.token_ids.tolist() if self.token_ids is not None else []), self.output


class HostInputs:
    """Two sets of host arrays for step inputs (pinned on CUDA, so the copies to the device are
    asynchronous), used in turn instead of allocating tensors every step. After each `build` or
    `stage`, call `record()` once the step's copies are queued (ModelRunner.launch / mirror do)."""

    def __init__(self, config: Config, device: torch.device, max_blocks_per_seq: int, tile_tokens: int):
        self.config = config
        self.block_size = config.block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.tile_tokens = tile_tokens  # query tokens per prefill attention program (prefill_tile_tokens)
        self.pinned = device.type == "cuda"
        self._sets: list[tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]] = []
        self._turn = 0
        # seq_id -> (its block table, that table as int32, how many of its ids are in it), for the sequences
        # of the last step: a step converts only the ids added since, not the whole table (O(context) per
        # sequence and step: ~12 us for 256 blocks). A table only grows while its sequence holds its blocks;
        # freeing or allocating them gives the sequence a new list (BlockManager.free_seq, allocate).
        self._block_rows: dict[int, tuple[list[int], np.ndarray, int]] = {}
        self._events = [torch.cuda.Event(), torch.cuda.Event()] if self.pinned else []

    def record(self) -> None:
        """Call once the step's copies from the current set are queued on the device."""
        if self._events:
            self._events[self._turn].record()

    def _next_set(self) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """The other set, once the step that last read it is done with it (its event): a step that
        samples has been waited for by then anyway, a prefill chunk that samples nothing may not."""
        if not self._sets:
            cfg, pin = self.config, self.pinned
            max_tokens, max_seqs = cfg.max_num_batched_tokens, cfg.max_num_seqs
            max_items = max_work_items(max_tokens, max_seqs, self.tile_tokens)
            shapes = {
                "input_ids": (max_tokens, torch.int64),
                "positions": (max_tokens, torch.int64),
                "slot_mapping": (max_tokens, torch.int64),
                "cu_seqlens_q": (max_seqs + 1, torch.int32),
                "seq_lens": (max_seqs, torch.int32),
                # [num_seqs, width] rows packed at the front, width = the step's longest block table
                "block_tables": (max_seqs * self.max_blocks_per_seq, torch.int32),
                "logits_indices": (max_seqs, torch.int64),
                "pending_rows": (max_seqs, torch.int64),
                "pending_src": (max_seqs, torch.int64),
                "work_seq": (max_items, torch.int32),
                "work_tile": (max_items, torch.int32),
                "score_rows": (max_tokens, torch.int64),
                "score_tokens": (max_tokens, torch.int64),
                "pool_rows": (max_tokens, torch.int64),
                "pool_slots": (max_tokens, torch.int64),
            }
            for _ in range(2):
                tensors = {k: torch.zeros(n, dtype=dt, pin_memory=pin) for k, (n, dt) in shapes.items()}
                self._sets.append(({k: t.numpy() for k, t in tensors.items()}, tensors))
        self._turn ^= 1
        if self._events:
            self._events[self._turn].synchronize()  # (returns at once if never recorded)
        return self._sets[self._turn]

    def build(self, batch: ScheduledBatch) -> ModelInput:
        """The batch's forward inputs, written into the next buffer set."""
        bs = self.block_size
        h, t = self._next_set()
        seqs, num_new = batch.seqs, batch.num_new_tokens
        num_seqs, num_tokens = len(seqs), batch.num_tokens
        width = max(len(s.block_table) for s in seqs)
        tables = h["block_tables"][: num_seqs * width].reshape(num_seqs, width)
        rows = {}
        for i, seq in enumerate(seqs):
            table, n = seq.block_table, len(seq.block_table)
            known, row, num_copied = self._block_rows.get(seq.seq_id, (None, None, 0))
            if known is not table:  # not in the last step, or its blocks were freed since
                row, num_copied = np.empty(self.max_blocks_per_seq, dtype=np.int32), 0
            if n > num_copied:
                row[num_copied:n] = table[num_copied:]
            rows[seq.seq_id] = (table, row, n)
            tables[i, :n] = row[:n]
        self._block_rows = rows
        # A sequence with a pending token computes just that token (its last): fed from the device.
        pending = [(i, seq.pending_row) for i, seq in enumerate(seqs) if seq.num_pending_tokens]
        if num_tokens == num_seqs:  # decode: one token per sequence, its last one
            positions = [seq.num_computed_tokens for seq in seqs]
            h["input_ids"][:num_tokens] = [seq.token_ids[p] for seq, p in zip(seqs, positions)]
            h["positions"][:num_tokens] = positions
            h["slot_mapping"][:num_tokens] = [
                s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)
            ]
            h["cu_seqlens_q"][: num_seqs + 1] = np.arange(num_seqs + 1)
            seq_lens = h["seq_lens"][:num_seqs]
            seq_lens[:] = positions
            seq_lens += 1
        else:
            ids: list[int] = []
            cu = 0
            for i, (seq, n) in enumerate(zip(seqs, num_new)):
                start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
                ids.extend(seq.token_ids[start:end])
                pos = np.arange(start, end)
                h["positions"][cu : cu + n] = pos
                h["slot_mapping"][cu : cu + n] = tables[i][pos // bs].astype(np.int64) * bs + pos % bs
                cu += n
                h["cu_seqlens_q"][i + 1] = cu
                h["seq_lens"][i] = end
            h["cu_seqlens_q"][0] = 0
            h["input_ids"][:num_tokens] = ids
        cu_seqlens = h["cu_seqlens_q"][: num_seqs + 1]
        sample_rows = [i for i, samples in enumerate(batch.samples) if samples]
        h["logits_indices"][: len(sample_rows)] = cu_seqlens[np.asarray(sample_rows, dtype=np.int64) + 1] - 1
        work_seq = work_tile = None
        if num_tokens != num_seqs:
            item_seqs, item_tiles = prefill_work_items(np.asarray(num_new), self.tile_tokens)
            k = item_seqs.size
            h["work_seq"][:k], h["work_tile"][:k] = item_seqs, item_tiles
            work_seq, work_tile = t["work_seq"][:k], t["work_tile"][:k]
        pending_rows = pending_src = None
        if pending:
            rows, src = zip(*pending)
            k = len(pending)
            h["pending_rows"][:k] = cu_seqlens[np.asarray(rows, dtype=np.int64) + 1] - 1  # token rows
            h["pending_src"][:k] = src
            pending_rows, pending_src = t["pending_rows"][:k], t["pending_src"][:k]
        score_rows = score_tokens = None
        num_score_top = 0
        if batch.scores is not None:
            k = 0
            for i, (seq, rows) in enumerate(zip(seqs, batch.scores)):
                if rows:
                    h["score_rows"][k : k + len(rows)] = _step_rows(cu_seqlens[i], seq, rows)
                    h["score_tokens"][k : k + len(rows)] = seq.token_ids[rows.start + 1 : rows.stop + 1]
                    num_score_top = max(num_score_top, seq.params.prompt_logprobs)
                    k += len(rows)
            score_rows, score_tokens = t["score_rows"][:k], t["score_tokens"][:k]
        pool_rows = pool_slots = None
        num_pool_slots = 0
        if batch.pools is not None:
            k = 0
            for i, (seq, positions) in enumerate(zip(seqs, batch.pools)):
                if positions:
                    h["pool_rows"][k : k + len(positions)] = _step_rows(cu_seqlens[i], seq, positions)
                    h["pool_slots"][k : k + len(positions)] = num_pool_slots
                    num_pool_slots += 1
                    k += len(positions)
            if k:
                pool_rows, pool_slots = t["pool_rows"][:k], t["pool_slots"][:k]
        return ModelInput(
            input_ids=t["input_ids"][:num_tokens],
            positions=t["positions"][:num_tokens],
            slot_mapping=t["slot_mapping"][:num_tokens],
            cu_seqlens_q=t["cu_seqlens_q"][: num_seqs + 1],
            seq_lens=t["seq_lens"][:num_seqs],
            block_tables=t["block_tables"][: num_seqs * width].view(num_seqs, width),
            logits_indices=t["logits_indices"][: len(sample_rows)],
            max_query_len=max(num_new),
            max_seq_len=int(h["seq_lens"][:num_seqs].max()),
            pending_rows=pending_rows,
            pending_src=pending_src,
            work_seq=work_seq,
            work_tile=work_tile,
            score_rows=score_rows,
            score_tokens=score_tokens,
            num_score_top=num_score_top,
            pool_rows=pool_rows,
            pool_slots=pool_slots,
            num_pool_slots=num_pool_slots,
        )

    def stage(self, inp: ModelInput) -> ModelInput:
        """inp (a tensor-parallel worker's copy of rank 0's inputs, in pageable memory) copied into the
        next set: a copy to the device from pageable memory would make the host wait for the device."""
        if not self.pinned:
            return inp
        _, t = self._next_set()
        staged = {}
        for name, value in vars(inp).items():
            if isinstance(value, torch.Tensor):
                staged[name] = t[name][: value.numel()].view(value.shape).copy_(value)
        return dataclasses.replace(inp, **staged)


def _step_rows(first_row: int, seq: Sequence, positions: range) -> np.ndarray:
    """The rows of a step's hidden states that hold these positions of `seq`, whose chunk starts at row
    `first_row` (its cu_seqlens entry) with position seq.num_computed_tokens."""
    start = first_row + positions.start - seq.num_computed_tokens
    return np.arange(start, start + len(positions))
