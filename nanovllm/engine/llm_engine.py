"""The engine loop: requests in, one `step()` at a time, outputs back.

    batch = scheduler.schedule()            # who computes how many tokens
    launched = runner.launch(batch)         # forward + sample, queued on the device
    scheduler.advance(batch)                # count them computed; sampled tokens are pending
    tokens = previous.wait()                # meanwhile: the previous step's tokens ...
    scheduler.resolve(previous, tokens)     # ... replace its pending ones; finish requests

plus the user-facing edges: prompt validation, tokenization, detokenization and stop strings.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from nanovllm.config import Config
from nanovllm.engine.cuda_graphs import PREFILL_GRAPH_TOKENS
from nanovllm.engine.detokenizer import IncrementalDetokenizer, decode_after_prompt
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.request_queue import check_priority
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import FinishReason, Sequence
from nanovllm.engine.step_input import LaunchedStep
from nanovllm.layers.pooler import finish_embedding
from nanovllm.layers.sampler import PromptLogprobs, SamplerOutput
from nanovllm.outputs import (
    CompletionOutput,
    Logprob,
    PoolingOutput,
    PoolingRequestOutput,
    RequestMetrics,
    RequestOutput,
)
from nanovllm.pooling_params import PoolingParams
from nanovllm.reasoning import prompt_ends_thinking, think_token_ids
from nanovllm.sampling_params import ParamError, SamplingParams
from nanovllm.structured.grammar import StructuredOutputCompiler, can_overlap
from nanovllm.utils.tokenizer import TokenDecoder, load_tokenizer

logger = logging.getLogger("nanovllm")

Prompt = str | list[int]
# What an embedding request's Sequence carries as its SamplingParams: it never samples (the scheduler reads
# only the prompt fields, which are off)
_POOLING_SEQUENCE_PARAMS = SamplingParams(max_tokens=1)

# Pipeline fill: a step launched on an idle device takes at most this many tokens (the largest prefill CUDA
# graph, 4,096), so the GPU starts on it while the host schedules and prepares the rest of a large batch,
# which runs as the next step. (16 x 1,024 prompts at once on an H200 waited ~5 ms for the host before the
# first kernel; 4,096 beat 1,024, 2,048 and 8,192 there: docs/performance.md, session 26.)
IDLE_STEP_TOKENS = PREFILL_GRAPH_TOKENS[-1]


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    # The prompt's and the output's token ids (the known ones, appended as they come back): every output of
    # the request shares these lists, as a streamed output's copies would cost O(length) per step.
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    detokenizer: IncrementalDetokenizer | None  # None: text decoded when asked for
    logprobs: list[Logprob] | None
    prompt_logprobs: list[Logprob | None] | None  # filled as the prompt's chunks are scored
    metrics: RequestMetrics
    stream: bool  # report every new token (else only the finished output)
    counted: bool = True  # its tokens count in stats() (not a server-side beam search's steps)
    cumulative_logprob: float = 0.0  # of the generated tokens, when logprobs are asked for
    # An embedding request: its params, and the sum of the hidden-state rows pooled so far (float32
    # [hidden_size]) since the preemption count pool_epoch (a recompute starts again).
    pooling: PoolingParams | None = None
    pool_sum: torch.Tensor | None = None
    pool_epoch: int = 0


@dataclass
class _Step:
    """A launched step: its batch, where each sequence started, the sequences it samples a token
    for (in sampler-row order) and the handle to its result."""

    batch: ScheduledBatch
    starts: list[int]
    sampling: list[Sequence]
    launched: LaunchedStep
    # each sequence's preemption count at launch, when the batch has embedding requests: rows pooled
    # before a preemption are dropped (the recompute pools them again)
    epochs: list[int] | None = None


class LLMEngine:
    def __init__(self, config: Config):
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer_path) if config.tokenizer_path else None
        # The tokenizer's decode with skip_special_tokens False and True (TokenDecoder: built once, fast)
        self._decoders = []
        if self.tokenizer is not None:
            self._decoders = [TokenDecoder(self.tokenizer, skip) for skip in (False, True)]
        self.vocab_size = config.hf_config.vocab_size
        # The reasoning parser's (start, end) tag ids, found before the model loads: a misconfigured server
        # fails at start (without a tokenizer there are no structured outputs to start after the thinking)
        self._think_token_ids: tuple[int, int] | None = None
        if config.reasoning_parser is not None and self.tokenizer is not None:
            self._think_token_ids = think_token_ids(self.tokenizer, config.reasoning_parser, self.vocab_size)
        self.runner = self._make_runner(config)
        self.num_kvcache_blocks = self.runner.num_kvcache_blocks
        self.scheduler = Scheduler(config, self.num_kvcache_blocks)
        self.requests: dict[str, _Request] = {}
        self._request_ids = itertools.count()
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        # Overlapped scheduling: the runner feeds pending tokens from the device (every rank, under TP).
        self.overlap = config.async_scheduling
        self._inflight: _Step | None = None  # the launched step not yet read back
        self._outputs: list[RequestOutput | PoolingRequestOutput] = []  # read back, not yet returned
        self.dropped_request_ids: list[str] = []  # requests the last step() failed (it raised)
        self._structured_compiler: StructuredOutputCompiler | None = None  # on the first such request

    def _structured(self) -> StructuredOutputCompiler:
        if self._structured_compiler is None:
            end_id = None if self._think_token_ids is None else self._think_token_ids[1]
            self._structured_compiler = StructuredOutputCompiler(self.tokenizer, self.vocab_size, end_id)
        return self._structured_compiler

    def _starts_thinking(self, prompt_token_ids: list[int]) -> bool:
        """Whether a request's output starts inside the model's thinking, so that its structured output waits
        for the end tag (as vLLM's reasoning parser decides it, from the prompt: reasoning.py)."""
        if self._think_token_ids is None:
            return False
        return not prompt_ends_thinking(prompt_token_ids, *self._think_token_ids)

    @staticmethod
    def _make_runner(config: Config):
        if config.tensor_parallel_size > 1:
            from nanovllm.engine.tp_executor import TensorParallelExecutor

            return TensorParallelExecutor(config)
        return ModelRunner(config)

    # ---- requests ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt, params: SamplingParams | PoolingParams) -> list[int]:
        """Validate a prompt and return its token ids (the last `params.truncate_prompt_tokens` of them,
        if set); raises ValueError naming the problem. A structured output's constraint is compiled here (and
        cached), so that a bad one fails before anything is queued. With PoolingParams: an embedding request's
        prompt (docs/embeddings.md)."""
        self._check_runner(params)
        token_ids = self._prompt_token_ids(prompt)
        limit = self.config.max_model_len
        if isinstance(params, PoolingParams):
            self._check_pooling(params)
            token_ids = params.truncated_prompt(token_ids, limit)
            if len(token_ids) > limit:
                raise ValueError(f"prompt ({len(token_ids)} tokens) exceeds max_model_len={limit}")
            return token_ids
        if (error := params.vocab_error(self.vocab_size)) is not None:
            raise error
        if params.bad_words and self.tokenizer is None:
            raise ValueError("bad_words needs the model's tokenizer: pass bad_words_token_ids instead")
        if params.structured_outputs is not None:  # compiled (and cached) now: a bad one fails before queuing
            if self.tokenizer is None:
                raise ValueError("structured_outputs needs the model's tokenizer (the tokens' bytes)")
            self._structured().matcher(params.structured_outputs)
        token_ids = params.truncated_prompt(token_ids, limit)  # (before the length check, as vLLM)
        if len(token_ids) + params.max_tokens > limit:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(token_ids) + params.max_tokens} exceeds max_model_len={limit}"
            )
        return token_ids

    def _check_runner(self, params: SamplingParams | PoolingParams) -> None:
        if isinstance(params, PoolingParams):
            return
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if self.config.runner_type == "pooling":
            raise ValueError(
                "this model runs with runner='pooling' (embeddings only: LLM.embed, /v1/embeddings); start "
                "it with runner='generate' to generate text"
            )

    def _check_pooling(self, params: PoolingParams) -> None:
        """vLLM's checks of an embedding request against the model: `dimensions` only for a Matryoshka model
        (config.json's is_matryoshka or matryoshka_dimensions), within its hidden size and listed sizes."""
        if params.dimensions is None:
            return
        hf, size = self.config.hf_config, self.config.hf_config.hidden_size
        listed = getattr(hf, "matryoshka_dimensions", None)
        if not (getattr(hf, "is_matryoshka", False) or listed is not None):
            raise ParamError(
                "this model does not support Matryoshka embeddings (no is_matryoshka or "
                "matryoshka_dimensions in its config.json): dimensions must be unset",
                "dimensions",
            )
        if not 1 <= params.dimensions <= size:
            raise ParamError(f"dimensions must be in [1, {size}], got {params.dimensions}", "dimensions")
        if listed is not None and params.dimensions not in listed:
            raise ParamError(f"dimensions must be one of {listed}, got {params.dimensions}", "dimensions")

    def _prompt_token_ids(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids, each checked to be in the vocabulary; ValueError naming the problem."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass the prompt as a list of token ids")
            if not prompt:
                raise ValueError("prompt is empty")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list | tuple):
            token_ids = list(prompt)
            # (the check in three C-level passes; the loop only finds the culprit for the message)
            if token_ids and not (
                set(map(type, token_ids)) <= {int}
                and min(token_ids) >= 0
                and max(token_ids) < self.vocab_size
            ):
                for i, t in enumerate(token_ids):
                    if not isinstance(t, int) or isinstance(t, bool):
                        raise ValueError(f"token id {t!r} (index {i}) is not an int")
                    if not 0 <= t < self.vocab_size:
                        raise ValueError(f"token id {t!r} is outside the vocabulary [0, {self.vocab_size})")
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty")
        return token_ids

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | PoolingParams,
        request_id: str | None = None,
        incremental: bool = False,
        prompt_token_ids: list[int] | None = None,
        priority: int = 0,
        counted: bool = True,
    ) -> str:
        """Queue a request. `incremental=True` detokenizes as tokens arrive (for streaming);
        otherwise text is decoded once, unless stop strings need it earlier. `priority`: lower is served
        first under scheduling_policy "priority"; under "fcfs" it must be 0 (as vLLM's). `counted=False`
        keeps its prompt and generated tokens out of stats() (a server-side beam search's one-token steps:
        the server counts the search as the client's request)."""
        self._check_open()
        check_priority(priority, self.config.scheduling_policy)
        self._check_runner(params)
        if isinstance(params, SamplingParams) and params.n != 1:
            raise ValueError(
                f"a request runs one sample, got n={params.n}: add one request per sample with "
                "params.choice(i) (LLM.generate does this)"
            )
        token_ids = prompt_token_ids if prompt_token_ids is not None else self.encode_prompt(prompt, params)
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        if isinstance(params, PoolingParams):
            req = self._pooling_request(text, params, token_ids, request_id, priority, counted)
        else:
            req = self._generation_request(
                text, params, token_ids, request_id, priority, incremental, counted
            )
        self.requests[request_id] = req
        self.scheduler.add(req.seq)
        if counted:
            self.num_prompt_tokens += len(token_ids)
        return request_id

    def _generation_request(
        self,
        text: str | None,
        params: SamplingParams,
        token_ids: list[int],
        request_id: str,
        priority: int,
        incremental: bool,
        counted: bool,
    ) -> _Request:
        if params.bad_words:  # (encode_prompt checked there is a tokenizer)
            params = params.with_bad_words_encoded(self.tokenizer, self.vocab_size)
        matcher = None
        if params.structured_outputs is not None:  # (encode_prompt or the server compiled it: a cache hit)
            thinking = self._starts_thinking(token_ids)  # (then the constraint starts after `</think>`)
            matcher = self._structured().matcher(params.structured_outputs, thinking)
        seq = Sequence(token_ids, params, request_id, priority, matcher)
        detok = None
        if incremental or params.stop:
            decoder = self._decoder(params.skip_special_tokens)
            detok = IncrementalDetokenizer(decoder, token_ids, params.stop, params.include_stop_str_in_output)
        return _Request(
            seq,
            text,
            seq.prompt_token_ids,
            [],
            detok,
            [] if params.logprobs is not None else None,
            [None] if params.prompt_logprobs is not None else None,  # (the first token has none)
            RequestMetrics(time.time()),
            stream=incremental,
            counted=counted,
        )

    def _pooling_request(
        self,
        text: str | None,
        params: PoolingParams,
        token_ids: list[int],
        request_id: str,
        priority: int,
        counted: bool,
    ) -> _Request:
        """An embedding request: its prompt runs like any other, samples nothing, and is done (one
        PoolingRequestOutput) once every prompt token is computed."""
        pooling_type = self.config.pooler.pooling_type
        seq = Sequence(token_ids, _POOLING_SEQUENCE_PARAMS, request_id, priority, pooling_type=pooling_type)
        return _Request(
            seq,
            text,
            seq.prompt_token_ids,
            [],
            None,
            None,
            None,
            RequestMetrics(time.time()),
            stream=False,
            counted=counted,
            pooling=params,
        )

    def abort(self, request_id: str) -> None:
        """Cancel a request wherever it is; its KV blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.seq.is_finished:
            self.scheduler.finish(req.seq, FinishReason.ABORT)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's): True once done; False, leaving the cache as it is, while a
        request holds KV blocks."""
        blocks = self.scheduler.block_manager
        if blocks.num_free_blocks != blocks.num_blocks:
            return False
        blocks.reset_prefix_cache()
        return True

    def has_unfinished(self) -> bool:
        """Requests remain, or a launched step has not been read back (its requests were aborted)."""
        return self.scheduler.num_unfinished > 0 or self._inflight is not None

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        """Run one scheduling step. Returns the outputs (cumulative, not deltas) of the requests that
        finished (an embedding request's: a PoolingRequestOutput), and of streaming requests that got a
        token; finished requests are dropped from the engine. A request's outputs share its lists of token
        ids and logprobs, which grow as it runs (as vLLM's do): a streamed output's text is that step's, its
        token ids are the request's to date.

        Overlapped (the default): the step launched here runs on the GPU while the
        host reads back and processes the previous one, so the outputs returned are one step behind.
        Tokens the host has not read yet are pending (Sequence.num_pending_tokens); the next step's
        forward takes them from the device. Each request costs at most one extra, discarded token
        of compute when it stops on EOS / a stop string."""
        self._check_open()
        self.dropped_request_ids = []
        if self._inflight is not None and not self._can_overlap():
            self._complete_inflight()
        batch = self.scheduler.schedule(IDLE_STEP_TOKENS if self._fills_pipeline() else None)
        if batch.is_empty:
            if self._inflight is not None:  # only pending tokens left to read back
                self._complete_inflight()
            elif self.scheduler.num_unfinished:
                raise RuntimeError("the scheduler could not schedule any request (KV cache too small?)")
            return self._take_outputs()
        starts = [seq.num_computed_tokens for seq in batch.seqs]
        try:
            launched = self.runner.launch(batch)
        except BaseException:  # KeyboardInterrupt too: the cache must not keep unwritten blocks
            self._fail(batch, starts)
            if self._inflight is not None:  # the step before may be fine: read it back (outputs wait)
                try:
                    self._complete_inflight()
                except Exception:  # it failed too (its requests are failed); report the first error
                    logger.debug("the step in flight failed too", exc_info=True)
            raise
        epochs = [seq.num_preemptions for seq in batch.seqs] if batch.pools is not None else None
        step = _Step(batch, starts, self.scheduler.advance(batch), launched, epochs)
        previous, self._inflight = self._inflight, step
        if previous is not None:
            self._complete(previous)  # the GPU runs `step` meanwhile
        if not self._can_overlap() or not self.scheduler.num_unfinished:
            self._complete_inflight()  # (nothing left to overlap with: leave the engine idle)
        return self._take_outputs()

    def sync(self) -> list[RequestOutput | PoolingRequestOutput]:
        """Wait for the step in flight, if any, and return its outputs (as `step` would have)."""
        if self._inflight is not None:
            self._complete_inflight()
        return self._take_outputs()

    def _can_overlap(self) -> bool:
        """Multi-token bad words read the latest generated token on the host (SamplingParams.reads_output),
        so with them the engine waits for each step (as it does when overlap is off). Penalties do not
        stop overlap: the sampler fills their pending token in on the device. Nor do structured outputs,
        once the masks their pending tokens could need are computed (structured/grammar.py can_overlap)."""
        running = self.scheduler.running
        if not self.overlap or any(seq.reads_output for seq in running):
            return False
        return can_overlap(seq.matcher for seq in running if seq.matcher is not None)

    def _fills_pipeline(self) -> bool:
        """Launch a small step (IDLE_STEP_TOKENS) and schedule the rest while it runs: the device is idle and
        the engine will not wait for that step, i.e. no running request reads the generated tokens on the
        host (multi-token bad words), nor any waiting one the small step may admit (else the split only adds a
        step)."""
        if self._inflight is not None or not self._can_overlap():
            return False
        block_manager, num_tokens = self.scheduler.block_manager, 0
        for seq in self.scheduler.waiting:  # in admission order, each costing what the scheduler will charge
            if seq.reads_output:
                return False
            cached = block_manager.find_cached_prefix(seq)  # (hashes kept on seq: the scheduler reuses them)
            num_tokens += seq.num_tokens - len(cached) * block_manager.block_size
            if num_tokens >= IDLE_STEP_TOKENS:
                break
        return True

    def _take_outputs(self) -> list[RequestOutput | PoolingRequestOutput]:
        # Outputs wait here until step() returns: a step that raises after reading one back loses none.
        outputs, self._outputs = self._outputs, []
        return outputs

    def _complete_inflight(self) -> None:
        step, self._inflight = self._inflight, None
        self._complete(step)

    def _complete(self, step: _Step) -> None:
        """Wait for a launched step and apply its tokens; outputs go to self._outputs."""
        try:
            tokens, out = step.launched.wait()
        except BaseException:
            self._fail(step.batch, step.starts)
            if self._inflight is not None:  # the step launched after it read its tokens: fail it too
                following, self._inflight = self._inflight, None
                self._fail(following.batch, following.starts)
            # Requests aborted while the step ran keep blocks registered for K/V it never wrote; the
            # following step may have hit them, so only now (its requests failed) are they all free.
            self.scheduler.block_manager.reset_prefix_cache()
            raise
        if step.launched.prompt_logprobs is not None:
            self._record_prompt_logprobs(step.batch, step.launched.prompt_logprobs)
        if step.epochs is not None:
            self._record_pooled(step)
        updated = self.scheduler.resolve(step.sampling, tokens)
        if out is not None and out.logprobs is not None:
            self._record_logprobs(step.sampling, tokens, out)
        now = time.time()
        for seq in updated:
            req = self.requests[seq.request_id]
            token = seq.token_ids[seq.num_known_tokens - 1]
            req.output_token_ids.append(token)
            if req.counted:
                self.num_generated_tokens += 1
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            if req.detokenizer is not None and not _hides_last_token(seq):
                # (vLLM's: stop strings count once the output is past min_tokens, as stop tokens do)
                stop = req.detokenizer.add(token, len(req.output_token_ids) > seq.params.min_tokens)
                if stop is not None:
                    self.scheduler.finish(seq, FinishReason.STOP)
                    seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
            if seq.is_finished or req.stream:
                req.metrics.last_token_time = now  # (only outputs show it)
                if seq.is_finished:
                    req.metrics.finished_time = now
                self._outputs.append(self._output(req))
            if seq.is_finished:
                del self.requests[seq.request_id]

    def _fail(self, batch: ScheduledBatch, starts: list[int]) -> None:
        """A step failed: fail its requests (listed in dropped_request_ids), keep the engine usable."""
        bm = self.scheduler.block_manager
        for seq, start, n in zip(batch.seqs, starts, batch.num_new_tokens):
            if seq.block_table:  # still holding the blocks the step was to fill
                bm.forget_new_blocks(seq, start, n)
            self.scheduler.finish(seq, FinishReason.ABORT)
            if self.requests.pop(seq.request_id, None) is not None:
                self.dropped_request_ids.append(seq.request_id)

    def _record_logprobs(self, sampling: list[Sequence], tokens: list[int], out: SamplerOutput) -> None:
        chosen, ranks = out.logprobs.tolist(), out.ranks.tolist()
        top_ids, top_vals = out.top_logprob_ids.tolist(), out.top_logprobs.tolist()
        for row, (seq, token) in enumerate(zip(sampling, tokens)):
            req = self.requests.get(seq.request_id)
            if req is not None and req.logprobs is not None:
                n = seq.params.logprobs
                top = dict(zip(top_ids[row][:n], top_vals[row][:n]))
                req.logprobs.append(Logprob(token, chosen[row], top, ranks[row]))
                req.cumulative_logprob += chosen[row]

    def _record_prompt_logprobs(self, batch: ScheduledBatch, out: PromptLogprobs) -> None:
        chosen, ranks = out.logprobs.tolist(), out.ranks.tolist()
        # (prompt_logprobs=0, the scoring case, asks for no alternatives: no per-row lists to convert)
        asked = out.top_ids.shape[1] > 0
        top_ids, top_vals = (out.top_ids.tolist(), out.top_logprobs.tolist()) if asked else (None, None)
        row = 0
        for seq, positions in zip(batch.seqs, batch.scores):
            req, end = self.requests.get(seq.request_id), row + len(positions)
            if req is not None and positions:  # position p's logits score prompt token p + 1
                n = seq.params.prompt_logprobs
                if n:  # (then the batch asked for alternatives)
                    tops = [dict(zip(i[:n], v[:n])) for i, v in zip(top_ids[row:end], top_vals[row:end])]
                else:
                    tops = [{} for _ in positions]
                tokens = seq.token_ids[positions.start + 1 : positions.stop + 1]
                req.prompt_logprobs.extend(map(Logprob, tokens, chosen[row:end], tops, ranks[row:end]))
            row = end

    def _record_pooled(self, step: _Step) -> None:
        """Add a step's pooled rows to each embedding request's sum, and finish those whose whole prompt the
        step completed. Rows from before a preemption are dropped: the recompute pools them again."""
        pooled, slot = step.launched.pooled, 0
        for seq, start, n, positions, epoch in zip(
            step.batch.seqs, step.starts, step.batch.num_new_tokens, step.batch.pools, step.epochs
        ):
            if seq.pooling_type is None:
                continue
            row, slot = slot, slot + (1 if positions else 0)
            req = self.requests.get(seq.request_id)
            if req is None or seq.is_finished or epoch != seq.num_preemptions:
                continue  # aborted, or preempted since this step was launched
            if req.pool_epoch != epoch:  # the first rows since a preemption
                req.pool_sum, req.pool_epoch = None, epoch
            if positions:
                req.pool_sum = pooled[row].clone() if req.pool_sum is None else req.pool_sum + pooled[row]
            if start + n == seq.num_tokens:
                self.scheduler.finish(seq, FinishReason.STOP)
                req.metrics.finished_time = time.time()
                self._outputs.append(self._pooling_output(req))
                del self.requests[seq.request_id]

    def _pooling_output(self, req: _Request) -> PoolingRequestOutput:
        pooler, params = self.config.pooler, req.pooling
        vector = finish_embedding(
            req.pool_sum,
            len(req.prompt_token_ids),
            pooler.pooling_type,
            params.dimensions,
            params.normalizes(pooler.normalize),
        )
        return PoolingRequestOutput(
            req.seq.request_id, PoolingOutput(vector), req.prompt_token_ids, req.seq.num_cached_tokens
        )

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        if req.detokenizer is not None:
            if seq.is_finished and not isinstance(seq.stop_reason, str):
                req.detokenizer.flush()  # no stop string cut the text: emit what was held back
            text = req.detokenizer.text if seq.is_finished else req.detokenizer.stable_text
        else:
            shown = req.output_token_ids[:-1] if _hides_last_token(seq) else req.output_token_ids
            text = ""
            if seq.is_finished and self.tokenizer is not None:  # (as the detokenizer would have)
                text = decode_after_prompt(
                    self._decoder(seq.params.skip_special_tokens), req.prompt_token_ids, shown
                )
        reason = seq.finish_reason.value if seq.finish_reason is not None else None
        cumulative = req.cumulative_logprob if req.logprobs is not None else None
        m = req.metrics  # (copied below: a streamed output keeps the times it had; 4x cheaper than replace)
        completion = CompletionOutput(
            0, text, req.output_token_ids, reason, seq.stop_reason, req.logprobs, cumulative
        )
        return RequestOutput(
            seq.request_id,
            req.prompt,
            req.prompt_token_ids,
            [completion],
            seq.num_cached_tokens,
            seq.is_finished,
            req.prompt_logprobs,
            RequestMetrics(m.arrival_time, m.first_token_time, m.last_token_time, m.finished_time),  # a copy
        )

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self._decoders[skip_special_tokens].decode(token_ids)

    def _decoder(self, skip_special_tokens: bool) -> TokenDecoder | None:
        return self._decoders[skip_special_tokens] if self._decoders else None

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
        """Release the model, its KV cache and CUDA graphs now (and stop tensor-parallel workers), even while
        something still holds this engine (a traceback kept by a notebook, say), so that the next engine
        finds the memory free. The engine is unusable after; calling this again does nothing."""
        runner, self.runner, self._inflight = self.runner, None, None
        if runner is None:
            return
        device = self.config.torch_device
        if hasattr(runner, "shutdown"):
            runner.shutdown()  # (tensor parallel: stops the workers and drops rank 0's runner, no sync)
        elif device.type == "cuda":
            torch.cuda.synchronize(device)  # a step still in flight uses the buffers about to be freed
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self.runner is None:
            raise RuntimeError("this engine has been shut down; create a new LLM")


def _hides_last_token(seq: Sequence) -> bool:
    """A request ended by a stop token (EOS or one of stop_token_ids) keeps the token in its token ids
    but not its text, unless include_stop_str_in_output (vLLM's rule). One its structured output ended
    (a complete match that nothing may follow) ended on an ordinary token: the text keeps it."""
    if seq.finish_reason is not FinishReason.STOP or seq.params.include_stop_str_in_output:
        return False
    return seq.matcher is None or not seq.matcher.is_terminated
