"""What `LLM.generate` and `LLM.embed` return (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)  # (a scored prompt makes one per token: slots make them ~25% cheaper to build)
class Logprob:
    """One position: its token's logprob (the sampled token, or the prompt's own token for
    prompt_logprobs) and the top alternatives."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float] = field(default_factory=dict)  # token id -> logprob, best first
    rank: int | None = None  # the number of tokens at least as likely as token_id (vLLM's: 1 = the best)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None  # the sum of the tokens' logprobs, when logprobs were asked for

    def finished(self) -> bool:  # (a method, as vLLM's; RequestOutput.finished is a field)
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When things happened to a request, in time.time() seconds: the arrival / first-token / last-token /
    finished times of vLLM V0's RequestOutput.metrics (not its scheduling times). A token's time is when the
    host read it back (with overlapped steps, one step after the GPU sampled it)."""

    arrival_time: float  # added to the engine
    first_token_time: float | None = None  # its first generated token
    last_token_time: float | None = None  # its latest one
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int
    finished: bool
    # SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing before it)
    prompt_logprobs: list[Logprob | None] | None = None
    metrics: RequestMetrics | None = None


@dataclass
class PoolingOutput:
    """A pooling request's result: its embedding, float32 (vLLM's PoolingOutput)."""

    data: torch.Tensor  # [dimensions or hidden_size]


@dataclass
class PoolingRequestOutput:
    """What the engine returns for an embedding request, once its whole prompt is computed (vLLM's)."""

    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    num_cached_tokens: int
    finished: bool = True


@dataclass
class EmbeddingOutput:
    """An embedding as a list of floats (vLLM's EmbeddingOutput)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """What `LLM.embed` returns per prompt (vLLM's EmbeddingRequestOutput)."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    num_cached_tokens: int
    finished: bool = True

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> EmbeddingRequestOutput:
        return cls(
            out.request_id,
            EmbeddingOutput(out.outputs.data.tolist()),
            out.prompt_token_ids,
            out.num_cached_tokens,
            out.finished,
        )
