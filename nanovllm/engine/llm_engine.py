"""The engine loop: requests in, one `step()` at a time, outputs back.

    batch = scheduler.schedule()            # who computes how many tokens
    sampled = runner.run(batch)             # forward + sample
    scheduler.update(batch, sampled)        # advance, append tokens, finish

plus the user-facing edges: prompt validation, tokenization, detokenization and stop strings.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

from nanovllm.config import Config
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import FinishReason, Sequence
from nanovllm.layers.sampler import SamplerOutput
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.tokenizer import load_tokenizer

logger = logging.getLogger("nanovllm")

Prompt = str | list[int]


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer | None  # None: text decoded when asked for
    logprobs: list[Logprob] | None
    arrival_time: float
    stream: bool  # report every new token (else only the finished output)
    first_token_time: float | None = None


class LLMEngine:
    def __init__(self, config: Config):
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer_path) if config.tokenizer_path else None
        self.vocab_size = config.hf_config.vocab_size
        self.runner = self._make_runner(config)
        self.num_kvcache_blocks = self.runner.num_kvcache_blocks
        self.scheduler = Scheduler(config, self.num_kvcache_blocks)
        self.requests: dict[str, _Request] = {}
        self._request_ids = itertools.count()
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0

    @staticmethod
    def _make_runner(config: Config):
        if config.tensor_parallel_size > 1:
            from nanovllm.engine.tp_executor import TensorParallelExecutor

            return TensorParallelExecutor(config)
        return ModelRunner(config)

    # ---- requests ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Validate a prompt and return its token ids; raises ValueError naming the problem."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass the prompt as a list of token ids")
            if not prompt:
                raise ValueError("prompt is empty")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list | tuple):
            token_ids = list(prompt)
            for t in token_ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                    raise ValueError(f"token id {t!r} is outside the vocabulary [0, {self.vocab_size})")
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        limit = self.config.max_model_len
        if len(token_ids) + params.max_tokens > limit:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(token_ids) + params.max_tokens} exceeds max_model_len={limit}"
            )
        return token_ids

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        incremental: bool = False,
        prompt_token_ids: list[int] | None = None,
    ) -> str:
        """Queue a request. `incremental=True` detokenizes as tokens arrive (for streaming);
        otherwise text is decoded once, unless stop strings need it earlier."""
        token_ids = prompt_token_ids if prompt_token_ids is not None else self.encode_prompt(prompt, params)
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(token_ids, params, request_id)
        detok = None
        if incremental or params.stop:
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.stop)
        self.requests[request_id] = _Request(
            seq,
            prompt if isinstance(prompt, str) else None,
            detok,
            [] if params.logprobs is not None else None,
            time.perf_counter(),
            stream=incremental,
        )
        self.scheduler.add(seq)
        self.num_prompt_tokens += len(token_ids)
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request wherever it is; its KV blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.seq.is_finished:
            self.scheduler.finish(req.seq, FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step. Returns the outputs (cumulative, not deltas) of the requests that
        finished this step, and of streaming requests that got a token; finished requests are dropped
        from the engine."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            if self.scheduler.num_unfinished:
                raise RuntimeError("the scheduler could not schedule any request (KV cache too small?)")
            return []
        try:
            sampled, out = self.runner.run(batch)
        except BaseException:  # KeyboardInterrupt too: the cache must not keep unwritten blocks
            # Fail this step's requests, keep the engine usable for the next ones.
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                self.scheduler.block_manager.forget_new_blocks(seq, n)
                self.scheduler.finish(seq, FinishReason.ABORT)
                self.requests.pop(seq.request_id, None)
            raise
        updated = self.scheduler.update(batch, sampled)
        if out is not None and out.logprobs is not None:
            self._record_logprobs(batch, sampled, out)
        now = time.perf_counter()
        outputs = []
        for seq in updated:
            req = self.requests[seq.request_id]
            self.num_generated_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
            if req.detokenizer is not None:
                stop = req.detokenizer.add(seq.token_ids[-1], seq.num_output_tokens >= seq.params.min_tokens)
                if stop is not None:
                    self.scheduler.finish(seq, FinishReason.STOP)
                    seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
            if seq.is_finished or req.stream:
                outputs.append(self._output(req))
            if seq.is_finished:
                del self.requests[seq.request_id]
        return outputs

    def _record_logprobs(self, batch, sampled: list[int | None], out: SamplerOutput) -> None:
        row = 0
        chosen = out.logprobs.tolist()
        top_ids, top_vals = out.top_logprob_ids.tolist(), out.top_logprobs.tolist()
        for seq, token in zip(batch.seqs, sampled):
            if token is None:
                continue
            req = self.requests.get(seq.request_id)
            if req is not None and req.logprobs is not None:
                n = seq.params.logprobs
                top = dict(zip(top_ids[row][:n], top_vals[row][:n]))
                req.logprobs.append(Logprob(token, chosen[row], top))
            row += 1

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        if req.detokenizer is not None:
            if seq.is_finished and not isinstance(seq.stop_reason, str):
                req.detokenizer.flush()  # no stop string cut the text: emit what was held back
            text = req.detokenizer.text if seq.is_finished else req.detokenizer.stable_text
        else:
            text = self.decode(seq.output_token_ids) if seq.is_finished else ""
        reason = seq.finish_reason.value if seq.finish_reason is not None else None
        completion = CompletionOutput(0, text, seq.output_token_ids, reason, seq.stop_reason, req.logprobs)
        return RequestOutput(
            seq.request_id,
            req.prompt,
            seq.prompt_token_ids,
            [completion],
            seq.num_cached_tokens,
            seq.is_finished,
        )

    def decode(self, token_ids: list[int]) -> str:
        return (
            self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        )

    # ---- statistics (server metrics, tests) ---------------------------------------------------

    def stats(self) -> dict[str, float]:
        bm = self.scheduler.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_kv_blocks": bm.num_blocks,
            "num_free_kv_blocks": bm.num_free_blocks,
            "kv_cache_usage": 1 - bm.num_free_blocks / bm.num_blocks,
            "prefix_cache_hit_rate": bm.hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_generated_tokens": self.num_generated_tokens,
            "num_prompt_tokens": self.num_prompt_tokens,
        }

    def shutdown(self) -> None:
        close = getattr(self.runner, "shutdown", None)
        if close is not None:
            close()
