"""The offline API: `LLM(model, ...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tqdm.auto import tqdm

from nanovllm.beam_search import BeamSearchOutput, search
from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine, Prompt
from nanovllm.engine.request_queue import check_priority
from nanovllm.outputs import (
    EmbeddingRequestOutput,
    Logprob,
    PoolingRequestOutput,
    RequestMetrics,
    RequestOutput,
)
from nanovllm.pooling_params import PoolingParams
from nanovllm.sampling_params import BeamSearchParams, ParamError, SamplingParams
from nanovllm.scoring import ScoringOutput, ScoringRequestOutput, cosine, score_pairs
from nanovllm.utils.chat import render_chat, text_messages
from nanovllm.utils.heap import frozen_heap


class LLM:
    """Usage:

    llm = LLM("qwen3-0.6b")                       # a checkpoint directory or a preset name
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
    outs = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(n=2))  # two replies, one output
    beams = llm.beam_search(["Hello"], BeamSearchParams(beam_width=4, max_tokens=16))[0].sequences
    """

    def __init__(self, model: str, **engine_args):
        self.config = Config.from_kwargs(model, **engine_args)
        self.engine = LLMEngine(self.config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):  # -> a transformers tokenizer, or None
        """The Hugging Face tokenizer (None for a checkpoint without one), as vLLM's `LLM.get_tokenizer`."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate and chat use when given no SamplingParams, as vLLM's: SamplingParams' defaults with
        those the checkpoint's generation_config.json sets (temperature, top_p, top_k, min_p,
        repetition_penalty; max_new_tokens as max_tokens). LLM(..., generation_config="vllm") ignores the
        file."""
        return SamplingParams(**self.config.default_sampling_params)

    def generate(
        self,
        prompts: Prompt | dict | list[Prompt | dict],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; with `n` > 1 its `outputs` hold the n samples.
        priority: one int per prompt, lower served first; only with LLM(..., scheduling_policy="priority")
        (under "fcfs" every one must be 0, as vLLM's)."""
        inputs = _as_prompt_list(prompts)
        params = self._params_per_prompt(sampling_params, len(inputs))
        priorities = self._priority_per_prompt(priority, len(inputs))
        encoded = self._encode_prompts([prompt for prompt, _ in inputs], params)
        return self._run([text for _, text in inputs], encoded, params, use_tqdm, priorities)

    def beam_search(
        self,
        prompts: Prompt | dict | list[Prompt | dict],
        params: BeamSearchParams,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's offline beam search: one BeamSearchOutput per prompt, in order, holding its best
        params.beam_width beams (each one's tokens include the prompt's, as vLLM's). Prompts as generate
        takes them; concurrency_limit: search at most that many prompts at a time (None: all at once).
        How it works and where it differs from vLLM's: docs/sampling.md#beam-search."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if concurrency_limit is not None and (type(concurrency_limit) is not int or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be None or an int >= 1, got {concurrency_limit!r}")
        inputs = [prompt for prompt, _ in _as_prompt_list(prompts)]
        # (checked as generate checks a request of max_tokens, so that every beam fits in max_model_len)
        encoded = self._encode_prompts(inputs, [SamplingParams(max_tokens=params.max_tokens)] * len(inputs))
        step_params = params.step_params()
        limit = concurrency_limit or max(len(encoded), 1)  # (no prompts: no batches)
        batches = [encoded[start : start + limit] for start in range(0, len(encoded), limit)]
        bar = tqdm(total=params.max_tokens * len(batches), desc="Beam search", disable=not use_tqdm)

        def step(beams: list[list[int]]) -> list[Logprob]:
            outs = self._run([None] * len(beams), beams, [step_params] * len(beams), use_tqdm=False)
            bar.update(1)
            return [out.outputs[0].logprobs[0] for out in outs]

        def decode(token_ids: list[int]) -> str:  # (vLLM's: special tokens shown)
            return self.engine.decode(token_ids, skip_special_tokens=False)

        eos_token_ids = frozenset(self.config.eos_token_ids)
        try:
            return [out for batch in batches for out in search(batch, params, step, eos_token_ids, decode)]
        finally:
            bar.close()

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
        priority: list[int] | None = None,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation ([{"role": ..., "content": ...}, ...]) or a list of them,
        each rendered with the tokenizer's chat template (or `chat_template`) as vLLM's `LLM.chat` does.
        chat_template_kwargs go to the template (e.g. {"enable_thinking": False} for Qwen3). Each output's
        `prompt` is the rendered text. priority: one per conversation, as generate's. tools: OpenAI's
        function tools, shown to the model by the template (as vLLM's, the reply is not parsed for calls:
        nanovllm.server.tool_parsers reads them; docs/tool_calling.md)."""
        conversations = _as_conversation_list(messages)
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: render the prompt yourself and call generate()")
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: pass chat_template=... or call generate()")
        params = self._params_per_prompt(sampling_params, len(conversations))
        priorities = self._priority_per_prompt(priority, len(conversations))
        texts, encoded = [], []
        for i, (conversation, p) in enumerate(zip(conversations, params)):
            try:
                conversation = text_messages(conversation)
            except ValueError as e:
                raise _located(e, f"conversation {i}") from None
            try:
                text = render_chat(
                    tokenizer,
                    conversation,
                    chat_template,
                    add_generation_prompt,
                    continue_final_message,
                    chat_template_kwargs,
                    tools,
                )
            except ValueError as e:
                raise _located(e, f"conversation {i}") from None
            # The rendered text already holds whatever special tokens the model wants.
            token_ids = tokenizer.encode(text, add_special_tokens=False)
            try:
                encoded.append(self.engine.encode_prompt(token_ids, p))
            except ValueError as e:
                raise _located(e, f"conversation {i}") from None
            texts.append(text)
        return self._run(texts, encoded, params, use_tqdm, priorities)

    def _encode_prompts(
        self, prompts: list[Prompt], params: list[SamplingParams] | list[PoolingParams]
    ) -> list[list[int]]:
        """Every prompt's token ids, all validated before anything is queued: a bad prompt leaves the engine
        untouched."""
        encoded = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                encoded.append(self.engine.encode_prompt(prompt, p))
            except ValueError as e:
                raise _located(e, f"prompt {i}") from None
        return encoded

    def _params_per_prompt(
        self, sampling_params: SamplingParams | list[SamplingParams] | None, num_prompts: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        return _per_prompt(sampling_params, num_prompts, SamplingParams, "sampling params")

    def _priority_per_prompt(self, priority: list[int] | None, num_prompts: int) -> list[int]:
        """One priority per prompt (None: all 0), each checked before anything is queued."""
        if priority is None:
            return [0] * num_prompts
        if not isinstance(priority, list | tuple):
            raise TypeError(f"priority must be a list of ints, one per prompt, got {type(priority).__name__}")
        if len(priority) != num_prompts:
            raise ValueError(f"got {len(priority)} priorities for {num_prompts} prompts")
        for i, p in enumerate(priority):
            try:
                check_priority(p, self.config.scheduling_policy)
            except (TypeError, ValueError) as e:
                raise type(e)(f"prompt {i}: {e}") from None
        return list(priority)

    def _run(
        self,
        prompts: list[str | None],  # the text each output reports as its prompt
        encoded: list[list[int]],
        params: list[SamplingParams],
        use_tqdm: bool | Callable[..., tqdm],
        priorities: list[int] | None = None,  # None: all 0
    ) -> list[RequestOutput]:
        """Queue every sample of every (validated) prompt, step until all are done, and return one
        RequestOutput per prompt."""
        requests = [
            (prompt, p.choice(j), tok, prio)
            for prompt, tok, p, prio in zip(prompts, encoded, params, priorities or [0] * len(params))
            for j in range(p.n)
        ]
        results = self._drain(requests, use_tqdm, "Generating")
        it = iter(results)
        return [_merge_samples([next(it) for _ in range(p.n)]) for p in params]

    def embed(
        self,
        prompts: Prompt | dict | list[Prompt | dict],
        pooling_params: PoolingParams | list[PoolingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, in order (vLLM's `LLM.embed`): the final hidden states pooled as the
        model's pooler says (Config.pooler: the last token by default), L2-normalized unless the params or the
        model say otherwise. `truncate_prompt_tokens` keeps each prompt's last k tokens (-1: max_model_len).
        Any model can embed; runner="pooling" (auto for embedding checkpoints) skips the LM head and refuses
        generation. See docs/embeddings.md."""
        outs = self.encode(prompts, pooling_params, use_tqdm, truncate_prompt_tokens)
        return [EmbeddingRequestOutput.from_base(out) for out in outs]

    def encode(
        self,
        prompts: Prompt | dict | list[Prompt | dict],
        pooling_params: PoolingParams | list[PoolingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        truncate_prompt_tokens: int | None = None,
        pooling_task: str = "embed",
    ) -> list[PoolingRequestOutput]:
        """vLLM's `LLM.encode` for its "embed" task (the only one here): as `embed`, each vector a float32
        tensor (`outputs.data`)."""
        if pooling_task != "embed":
            raise ValueError(f"pooling_task {pooling_task!r} is not supported: only 'embed'")
        inputs = _as_prompt_list(prompts)
        if pooling_params is None:
            pooling_params = PoolingParams()
        params = _per_prompt(pooling_params, len(inputs), PoolingParams, "pooling params")
        if truncate_prompt_tokens is not None:
            params = [dataclasses.replace(p, truncate_prompt_tokens=truncate_prompt_tokens) for p in params]
        encoded = self._encode_prompts([prompt for prompt, _ in inputs], params)
        requests = [(text, p, tok, 0) for (_, text), p, tok in zip(inputs, params, encoded)]
        return self._drain(requests, use_tqdm, "Embedding")

    def score(
        self,
        data_1: Prompt | list[Prompt],
        data_2: Prompt | list[Prompt],
        use_tqdm: bool | Callable[..., tqdm] = True,
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ScoringRequestOutput]:
        """vLLM's `LLM.score` for an embedding model: one output per pair, its `outputs.score` the cosine
        similarity of the two texts' embeddings. data_1 holds one text (scored against each of data_2) or as
        many as data_2 (scored element by element); each text is embedded once. A cross-encoder reranker,
        which reads both texts together, is not supported (docs/embeddings.md)."""
        side_1, side_2 = _as_prompt_list(data_1), _as_prompt_list(data_2)
        pairs = score_pairs(len(side_1), len(side_2))
        outs = self.encode([p for p, _ in side_1 + side_2], pooling_params, use_tqdm, truncate_prompt_tokens)
        first, second = outs[: len(side_1)], outs[len(side_1) :]
        return [
            ScoringRequestOutput(
                f"score-{k}",
                ScoringOutput(cosine(first[i].outputs.data, second[j].outputs.data)),
                first[i].prompt_token_ids + second[j].prompt_token_ids,
            )
            for k, (i, j) in enumerate(pairs)
        ]

    def _drain(
        self,
        requests: list[tuple[str | None, SamplingParams | PoolingParams, list[int], int]],
        use_tqdm: bool | Callable[..., tqdm],
        desc: str,
    ) -> list:
        """Queue each (prompt text, params, validated token ids, priority), step until all are done, and
        return their outputs in order. An error aborts whatever was queued."""
        ids: list[str] = []
        results: dict = {}
        # No full garbage collection walks the engine's own objects meanwhile (utils/heap.py).
        with frozen_heap():
            make_bar = use_tqdm if callable(use_tqdm) else tqdm  # vLLM's: a callable makes the bar
            bar = make_bar(total=len(requests), desc=desc, dynamic_ncols=True, disable=not use_tqdm)
            try:
                for prompt, params, tok, prio in requests:  # (recorded one by one: see finally)
                    ids.append(self.engine.add_request(prompt, params, prompt_token_ids=tok, priority=prio))
                wanted = set(ids)
                while len(results) < len(ids):
                    for out in self.engine.step():
                        # Requests added straight to the engine may finish here too: not ours to return.
                        if out.finished and out.request_id in wanted:
                            results[out.request_id] = out
                            bar.update(1)
                    bar.set_postfix_str(f"{self.engine.num_generated_tokens} tokens", refresh=False)
            finally:
                bar.close()
                for rid in set(ids) - results.keys():
                    self.engine.abort(rid)  # after an error: leave no request behind
        return [results[rid] for rid in ids]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix, so that the next prompts are computed from scratch (as vLLM's
        `LLM.reset_prefix_cache`). Refused, returning False, while requests hold KV blocks (requests added
        to `self.engine` directly and not yet finished); True once the cache is empty."""
        return self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _merge_samples(outs: list[RequestOutput]) -> RequestOutput:
    """The n samples of one prompt (each run as a request of its own) as one RequestOutput: the first
    sample's id, prompt-cache count and prompt_logprobs (only it scores the prompt), every sample's
    completion with its index, and times that span all of them."""
    if len(outs) == 1:
        return outs[0]
    first = outs[0]
    completions = [dataclasses.replace(out.outputs[0], index=i) for i, out in enumerate(outs)]
    times = [out.metrics for out in outs]
    metrics = RequestMetrics(
        min(m.arrival_time for m in times),
        min(m.first_token_time for m in times),
        max(m.last_token_time for m in times),
        max(m.finished_time for m in times),
    )
    return dataclasses.replace(first, outputs=completions, metrics=metrics)


def _as_conversation_list(messages: list[dict] | list[list[dict]]) -> list[list[dict]]:
    """One conversation (a list of message dicts) or a list of them -> a list of conversations."""
    if isinstance(messages, list | tuple) and messages and all(isinstance(m, dict) for m in messages):
        return [list(messages)]
    if (
        isinstance(messages, list | tuple)
        and messages
        and all(isinstance(c, list | tuple) and c and all(isinstance(m, dict) for m in c) for c in messages)
    ):
        return [list(c) for c in messages]
    raise ValueError(
        "messages must be a conversation (a non-empty list of {'role': ..., 'content': ...} dicts) "
        "or a non-empty list of them"
    )


def _per_prompt(params: object, num_prompts: int, kind: type, what: str) -> list:
    """`params` (one for every prompt, or a list of one per prompt) as a list of one per prompt, each a
    `kind`; a ValueError otherwise (PoolingParams given to generate, say, or SamplingParams to embed)."""
    if isinstance(params, kind):
        return [params] * num_prompts
    if not isinstance(params, list | tuple):
        raise ValueError(
            f"{what} must be a {kind.__name__} or a list of them, one per prompt; got {type(params).__name__}"
        )
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} {what} for {num_prompts} prompts")
    for i, p in enumerate(params):
        if not isinstance(p, kind):
            raise ValueError(f"prompt {i}: {what} must be a {kind.__name__}, got {type(p).__name__}")
    return list(params)


def _as_prompt_list(prompts: Prompt | dict | list[Prompt | dict]) -> list[tuple[Prompt, str | None]]:
    """One prompt or a list of them, each as (what runs: a string or token ids, the text its output reports
    as `prompt`). A prompt is a string, a list of token ids, or vLLM's dict forms {"prompt": text} and
    {"prompt_token_ids": ids} (a TokensPrompt, which may also carry its text as "prompt")."""
    if isinstance(prompts, str | dict):
        return [_unwrap_prompt(prompts)]
    if isinstance(prompts, list | tuple):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [(list(prompts), None)]  # one prompt of token ids
        return [_unwrap_prompt(p) for p in prompts]
    raise ValueError(
        f"prompts must be a string, a list of token ids, or a list of either; got {type(prompts).__name__}"
    )


def _unwrap_prompt(prompt: Prompt | dict) -> tuple[Prompt, str | None]:
    if not isinstance(prompt, dict):
        return prompt, prompt if isinstance(prompt, str) else None  # (encode_prompt checks it)
    if set(prompt) == {"prompt"}:
        return prompt["prompt"], prompt["prompt"]
    if set(prompt) in ({"prompt_token_ids"}, {"prompt_token_ids", "prompt"}):
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"a TokensPrompt's 'prompt' must be a string, got {type(text).__name__}")
        return prompt["prompt_token_ids"], text
    raise ValueError(
        "a dict prompt must be {'prompt': text} or {'prompt_token_ids': ids} (optionally with its text as "
        f"'prompt'), got keys {sorted(prompt)}"
    )


def _located(e: ValueError, where: str) -> ValueError:
    """The error again, its message prefixed with which prompt or conversation it is about (a ParamError
    stays one, naming its field)."""
    if isinstance(e, ParamError):
        return ParamError(f"{where}: {e}", e.param)
    return ValueError(f"{where}: {e}")
