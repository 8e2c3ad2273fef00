"""A request's state as the scheduler sees it: its tokens, how many are computed, its KV blocks."""

from __future__ import annotations

import enum
import itertools
from typing import TYPE_CHECKING

from nanovllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanovllm.structured.grammar import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class FinishReason(enum.Enum):
    """Why a request ended; the value is OpenAI's `finish_reason`."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # cancelled by the caller (server: client went away)


_seq_ids = itertools.count()

PENDING_TOKEN = -1  # stands for a sampled token not yet copied back from the GPU


class Sequence:
    """Prompt + generated tokens. There is no prefill or decode phase: each step moves
    `num_computed_tokens` toward `num_tokens`; when they meet, the next token is sampled."""

    def __init__(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        matcher: GrammarMatcher | None = None,
        pooling_type: str | None = None,
    ):
        self.seq_id = next(_seq_ids)  # also the arrival order
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.params = params
        self.priority = priority  # lower first, under scheduling_policy "priority" (engine/request_queue.py)
        self.reads_output = params.reads_output  # multi-token bad words: no overlapped steps
        # structured outputs: where the output is in its constraint (advanced by Scheduler.resolve)
        self.matcher = matcher
        # An embedding request's pooling type (layers/pooler.py; None: it generates): it samples nothing, and
        # is done once its prompt is computed (LLMEngine reads the pooled hidden states back).
        self.pooling_type = pooling_type
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache (or scheduled to be this step)
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.block_table: list[int] = []  # physical KV block ids, one per block_size tokens
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of token_ids, in order
        # the last prefix-cache lookup (BlockManager.num_uncached then, its hits): a blocked waiting request
        # is looked up again every step, and only what a block dropped from the cache since can undo
        self.prefix_hits: tuple[int, tuple[int, ...]] | None = None
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.stop_reason: str | int | None = None  # the stop string or stop token id that ended it
        # Overlapped scheduling: tokens sampled by a step still running on the GPU sit at the end of
        # token_ids as PENDING_TOKEN until the engine reads them back (see LLMEngine.step).
        self.num_pending_tokens = 0
        self.pending_row: int | None = None  # row of the newest pending token in its step's sampler output
        # prompt_logprobs: prompt tokens 1..k have been scored by launched steps (token t by the logits of
        # position t - 1). Kept through preemption, so a recompute scores nothing twice.
        self.num_scored_prompt_tokens = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids are known on the host (all but the pending ones)."""
        return len(self.token_ids) - self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, pending ones included."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens known on the host."""
        return self.token_ids[self.num_prompt_tokens : self.num_known_tokens]

    def prompt_rows_to_score(self, num_new_tokens: int) -> range:
        """The positions, among the next num_new_tokens computed, whose logits score a prompt token not
        scored yet (prompt_logprobs; empty for requests without)."""
        if self.params.prompt_logprobs is None:
            return range(0)
        start = max(self.num_computed_tokens, self.num_scored_prompt_tokens)
        return range(start, min(self.num_computed_tokens + num_new_tokens, self.num_prompt_tokens - 1))

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={len(self.block_table)}, status={self.status.name})"
        )
