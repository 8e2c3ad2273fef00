"""OpenAI-compatible HTTP server: `nanovllm serve MODEL [--host H] [--port P] [engine flags]`.

    POST /v1/completions, POST /v1/chat/completions   (JSON or, with stream=true, server-sent events)
    POST /v1/embeddings                                (OpenAI's; docs/embeddings.md)
    POST /v1/score, /v1/rerank                         (vLLM's, for an embedding model: cosine similarities)
    GET  /v1/models, /version, /health, /metrics
    POST /tokenize, /detokenize                        (vLLM's: a prompt or a conversation <-> token ids)

Handlers parse and validate the body (protocol.py), tokenize, and hand sub-requests (prompts x n) to
the AsyncEngine, whose engine process runs the engine's step loop (async_engine.py, engine_core.py);
each sub-request's new tokens and text come back as deltas and are turned into OpenAI responses here.
A client that goes away aborts its requests (KV blocks freed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanovllm
from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.request_queue import check_priority
from nanovllm.reasoning import prompt_ends_thinking, think_tags, think_token_ids
from nanovllm.sampling_params import ParamError
from nanovllm.scoring import cosine
from nanovllm.server import protocol
from nanovllm.server.async_engine import AsyncEngine, EngineDeadError, RequestDelta, RequestStream, SubRequest
from nanovllm.server.beam_search import as_choice, run_beam_search
from nanovllm.server.embeddings import (
    EmbeddingRequest,
    embedding_response,
    parse_embedding_request,
    parse_rerank_request,
    parse_score_request,
    rerank_response,
    score_response,
)
from nanovllm.server.errors import RequestError, error_body
from nanovllm.server.logprobs import LogprobFormatter
from nanovllm.server.metrics import Metrics
from nanovllm.server.protocol import GenerateRequest
from nanovllm.server.reasoning import ReasoningSplitter
from nanovllm.server.token_ids import token_id_fields
from nanovllm.server.tool_parsers import TOOL_PARSERS, tool_parser
from nanovllm.server.tools import ToolOutput
from nanovllm.utils.chat import render_chat
from nanovllm.utils.tokenizer import load_tokenizer

logger = logging.getLogger("nanovllm.server")


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready (the app answers 499)."""


class OpenAIServer:
    def __init__(
        self,
        config: Config,
        served_model_name: str,
        tool_call_parser: str | None = None,
        enable_auto_tool_choice: bool = True,
    ):
        """tool_call_parser: how replies to tool_choice "auto" are searched for calls (tool_parsers/), and
        the kind of call ids; "auto" is refused without it or without enable_auto_tool_choice."""
        self.config = config
        self.tool_call_parser = tool_call_parser
        self.auto_tool_choice = tool_call_parser is not None and enable_auto_tool_choice
        self.model_name = served_model_name
        self.max_model_len = config.max_model_len
        self.tokenizer = load_tokenizer(config.tokenizer_path) if config.tokenizer_path else None
        self.metrics = Metrics(served_model_name)
        self.engine = AsyncEngine(functools.partial(LLMEngine, config), self.metrics)  # built in its process
        self.created = int(time.time())
        self.logprobs = LogprobFormatter(self.tokenizer)
        # --reasoning-parser: chat replies split into reasoning and content (server/reasoning.py)
        self.think_tags = self.think_ids = None
        if config.reasoning_parser is not None:
            if self.tokenizer is None:
                raise ValueError("--reasoning-parser needs the model's tokenizer")
            self.think_tags = think_tags(config.reasoning_parser)
            self.think_ids = think_token_ids(
                self.tokenizer, config.reasoning_parser, config.hf_config.vocab_size
            )

    # ---- endpoints --------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = await _json_body(request)
        req = protocol.parse_completion_request(
            body, self.max_model_len, self.config.default_sampling_params, self.config.max_tokens_cap
        )
        self._check_model(req.model)
        prompts = [self._tokenize(p, "prompt", add_special_tokens=True) for p in req.prompts]
        return await self._generate(request, req, prompts, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await _json_body(request)
        req = protocol.parse_chat_request(
            body, self.max_model_len, self.config.default_sampling_params, self.config.max_tokens_cap
        )
        self._check_model(req.model)
        if req.tools is not None and req.tools.choice == "auto":
            if not self.auto_tool_choice:  # (vLLM's rule)
                raise RequestError(
                    'tool_choice "auto" (the default with tools) needs the server started with'
                    " --enable-auto-tool-choice and --tool-call-parser",
                    "tool_choice",
                )
            if not TOOL_PARSERS[self.tool_call_parser].skip_special_tokens:  # (its marker may be special)
                req.params = dataclasses.replace(req.params, skip_special_tokens=False)
        text = self._render(req.messages, req.chat_options, req.tools.tools if req.tools else None)
        # The template already holds any BOS/special tokens the model wants.
        return await self._generate(request, req, [self._tokenize(text, "messages", False)], chat=True)

    async def embeddings(self, request: Request) -> Response:
        """OpenAI's POST /v1/embeddings: one vector per input, each input one engine request."""
        req = parse_embedding_request(await _json_body(request))
        request_id = f"embd-{uuid.uuid4().hex}"
        vectors, num_tokens = await self._embed(request, req, request_id, "input")
        created = int(time.time())
        body = embedding_response(request_id, self.model_name, created, vectors, num_tokens, req.base64)
        return JSONResponse(body)

    async def score(self, request: Request) -> Response:
        """vLLM's POST /v1/score for an embedding model: each (text_1, text_2) pair's cosine similarity."""
        req = parse_score_request(await _json_body(request))
        request_id = f"score-{uuid.uuid4().hex}"
        vectors, num_tokens = await self._embed(request, req.embed, request_id, "text_1")
        scores = [cosine(vectors[i], vectors[req.num_1 + j]) for i, j in req.pairs]
        return JSONResponse(score_response(request_id, self.model_name, int(time.time()), scores, num_tokens))

    async def rerank(self, request: Request) -> Response:
        """vLLM's (Jina's) POST /v1/rerank for an embedding model: documents by cosine with the query."""
        req = parse_rerank_request(await _json_body(request))
        request_id = f"rerank-{uuid.uuid4().hex}"
        (query, *documents), num_tokens = await self._embed(request, req.embed, request_id, "documents")
        scores = [cosine(query, d) for d in documents]
        return JSONResponse(rerank_response(request_id, self.model_name, req, scores, num_tokens))

    async def _embed(
        self, request: Request, req: EmbeddingRequest, request_id: str, param: str
    ) -> tuple[list[np.ndarray], int]:
        """Every input's vector ([dimensions] float32), in order, and the prompt tokens they used (after
        truncation). A rejected input is a 400 naming `param`; a client gone is ClientDisconnected (499)."""
        self._check_model(req.model)
        try:
            check_priority(req.priority, self.config.scheduling_policy)
        except ValueError as e:
            raise RequestError(str(e), "priority") from None
        if req.messages is not None:  # (vLLM's chat-style request: the conversation as chat renders it)
            text = self._render(req.messages, req.chat_options)
            prompts = [self._tokenize(text, "messages", req.add_special_tokens)]
        else:
            prompts = [self._tokenize(p, param, req.add_special_tokens) for p in req.inputs]
        try:  # (usage counts what was kept)
            kept = [req.params.truncated_prompt(ids, self.max_model_len) for _, ids in prompts]
        except ValueError as e:
            raise RequestError(str(e), "truncate_prompt_tokens") from None
        subs = [
            SubRequest(f"{request_id}-{i}", text, ids, req.params, priority=req.priority)
            for i, (text, ids) in enumerate(prompts)
        ]
        outputs = await self._run_to_end(request, subs, param)
        return [out.embedding for out in outputs], sum(map(len, kept))

    async def _run_to_end(self, request: Request, subs: list[SubRequest], param: str) -> list[RequestDelta]:
        """Submit non-streamed sub-requests and wait for each one's whole delta (`_wait_all`); a rejected
        request is a 400 naming `param` (or the ParamError's field)."""
        try:
            stream = await self.engine.submit(subs, incremental=False)
        except ParamError as e:
            raise RequestError(str(e), e.param) from None
        except ValueError as e:
            raise RequestError(str(e), param) from None
        except EngineDeadError as e:
            raise RequestError(str(e), status_code=503, type="service_unavailable") from None
        return await _wait_all(request, stream, len(subs))

    async def tokenize(self, request: Request) -> Response:
        """vLLM's POST /tokenize: the token ids a prompt (or a conversation, rendered as for chat) becomes."""
        req = protocol.parse_tokenize_request(await _json_body(request))
        self._check_model(req.model)
        if req.messages is not None:
            text, param = self._render(req.messages, req.chat_options, req.tools), "messages"
        else:
            text, param = req.prompt, "prompt"
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer", param)
        ids = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return JSONResponse(
            {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}
        )

    async def detokenize(self, request: Request) -> Response:
        """vLLM's POST /detokenize: token ids -> text (special tokens kept)."""
        model, ids = protocol.parse_detokenize_request(
            await _json_body(request), self.config.hf_config.vocab_size
        )
        self._check_model(model)
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer", "tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(ids)})

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "nanovllm",
            "root": self.config.model,
            "max_model_len": self.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": nanovllm.__version__})

    async def health(self, request: Request) -> Response:
        if not self.engine.is_alive:
            return JSONResponse(error_body("the engine has stopped", "service_unavailable"), 503)
        return Response(status_code=200)

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(
            self.metrics.render(self.engine.stats), media_type="text/plain; version=0.0.4"
        )

    # ---- generation -------------------------------------------------------------------------------

    async def _generate(
        self, request: Request, req: GenerateRequest, prompts: list[tuple[str | None, list[int]]], chat: bool
    ) -> Response:
        if (error := req.params.vocab_error(self.config.hf_config.vocab_size)) is not None:
            raise RequestError(str(error), error.param)
        if req.params.bad_words and self.tokenizer is None:
            raise RequestError("bad_words needs the model's tokenizer", "bad_words")
        try:
            check_priority(req.priority, self.config.scheduling_policy)
        except ValueError as e:  # (not 0 under fcfs: vLLM's 400)
            raise RequestError(str(e), "priority") from None
        if req.params.truncate_prompt_tokens is not None:  # usage and echo show what was kept
            try:
                kept = [req.params.truncated_prompt(ids, self.max_model_len) for _, ids in prompts]
            except ValueError as e:
                raise RequestError(str(e), "truncate_prompt_tokens") from None
            prompts = [(t, ids) if len(k) == len(ids) else (None, k) for (t, ids), k in zip(prompts, kept)]
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.beam_search is not None:
            return await self._beam_search(request, req, prompts, request_id, chat)
        # params.choice(i): with a seed, each choice draws from its own seed; only choice 0 scores the
        # prompt (prompt_logprobs), and the response shows its scores for every choice of that prompt.
        subs = [
            SubRequest(
                f"{request_id}-{p}-{i}", text, ids, req.params.choice(i), req.fill_max_tokens, req.priority
            )
            for p, (text, ids) in enumerate(prompts)
            for i in range(req.params.n)
        ]
        try:
            stream = await self.engine.submit(subs, incremental=req.stream)
        except ParamError as e:  # (e.g. min_tokens above the max_tokens a prompt leaves: fill_max_tokens)
            param = req.structured_field if e.param == "structured_outputs" else e.param
            raise RequestError(str(e), param) from None
        except ValueError as e:
            raise RequestError(str(e), "messages" if chat else "prompt") from None
        except EngineDeadError as e:
            raise RequestError(str(e), status_code=503, type="service_unavailable") from None
        resp = _Response(
            request_id, self.model_name, int(time.time()), chat, sum(len(ids) for _, ids in prompts)
        )
        choice_prompts = [prompt for prompt in prompts for _ in range(req.params.n)]  # (text or None, ids)
        if req.stream:
            events = self._stream(stream, req, resp, choice_prompts)
            return _EventStream(events, media_type="text/event-stream")
        outputs = await _wait_all(request, stream, len(subs))
        # Choice 0 of each prompt scored it (prompt_logprobs, echo); its choices share that.
        scores = [outputs[i - i % req.params.n].prompt_logprobs for i in range(len(outputs))]
        outputs = [_as_shown(out, req, s) for out, s in zip(outputs, scores)]
        choices = [
            self._final_choice(i, out, req, chat, prompt)
            for i, (out, prompt) in enumerate(zip(outputs, choice_prompts))
        ]
        num_completion = sum(len(out.token_ids) for out in outputs)
        extra = token_id_fields(req, prompt_ids=prompts[0][1]) if chat else {}  # (chat: on the response)
        if chat and req.prompt_logprobs is not None:  # (vLLM: the response's, for chat)
            extra["prompt_logprobs"] = self.logprobs.prompt(
                outputs[0].prompt_logprobs or [], req.prompt_logprobs
            )
        return JSONResponse(resp.body(choices, final=True, usage=resp.usage(num_completion), **extra))

    async def _beam_search(
        self,
        request: Request,
        req: GenerateRequest,
        prompts: list[tuple[str | None, list[int]]],
        request_id: str,
        chat: bool,
    ) -> Response:
        """use_beam_search: n beams per prompt as its n choices (server/beam_search.py). As vLLM, the whole
        search runs before anything is sent: a completions stream is the response in one event, a chat
        stream its usual chunks (one content chunk per choice)."""
        params = req.beam_search
        longest = max(len(ids) for _, ids in prompts)
        if req.fill_max_tokens:  # (chat without max_tokens: at most what the context leaves)
            params = dataclasses.replace(
                params, max_tokens=max(1, min(params.max_tokens, self.max_model_len - longest))
            )
        if longest + params.max_tokens > self.max_model_len:
            total = longest + params.max_tokens
            raise RequestError(
                f"prompt ({longest} tokens) + max_tokens ({params.max_tokens}) = {total}"
                f" exceeds max_model_len={self.max_model_len}",
                "messages" if chat else "prompt",
            )
        start = time.perf_counter()
        search = run_beam_search(
            self.engine,
            request_id,
            [ids for _, ids in prompts],
            params,
            self.config.eos_token_ids,
            req.priority,
        )
        try:
            beams = await _unless_disconnected(request, search)
        except ClientDisconnected:
            for _ in range(len(prompts) * params.beam_width):  # (as the choices of a request would)
                self.metrics.observe_aborted()
            return Response(status_code=499)
        except ValueError as e:  # (a token-id prompt the engine refuses)
            raise RequestError(str(e), "messages" if chat else "prompt") from None
        except EngineDeadError as e:
            raise RequestError(str(e), status_code=503, type="service_unavailable") from None

        e2e_s = time.perf_counter() - start
        for (_, ids), group in zip(prompts, beams):  # each choice as a request's (its steps count nowhere)
            for beam in group:
                num_generated = len(beam.tokens) - len(ids)
                self.metrics.observe_search_choice(beam.finish_reason, e2e_s, len(ids), num_generated)

        def decode(token_ids: list[int]) -> str:  # (vLLM's: special tokens shown)
            return (
                "" if self.tokenizer is None else self.tokenizer.decode(token_ids, skip_special_tokens=False)
            )

        choices = [
            as_choice(request_id, beam, len(ids), params, decode, req.logprobs is not None)
            for (_, ids), group in zip(prompts, beams)
            for beam in group
        ]
        # (a prompt may have fewer than n beams: each choice belongs to its own prompt)
        choice_prompts = [prompt for prompt, group in zip(prompts, beams) for _ in group]
        resp = _Response(
            request_id, self.model_name, int(time.time()), chat, sum(len(ids) for _, ids in prompts)
        )
        if req.stream and chat:
            return _EventStream(
                self._stream(_Finished(choices), req, resp, choice_prompts),
                media_type="text/event-stream",
            )
        body = resp.body(
            [self._final_choice(i, c, req, chat, p) for i, (c, p) in enumerate(zip(choices, choice_prompts))],
            final=True,
            usage=resp.usage(sum(len(c.token_ids) for c in choices)),
            **(token_id_fields(req, prompt_ids=prompts[0][1]) if chat else {}),
        )
        if req.stream:  # (vLLM's completions stream of a beam search: the response as its one event)
            return _EventStream(_one_event(body), media_type="text/event-stream")
        return JSONResponse(body)

    async def _stream(
        self,
        stream: RequestStream,
        req: GenerateRequest,
        resp: _Response,
        choice_prompts: list[tuple[str | None, list[int]]],
    ) -> AsyncIterator[str]:
        num_choices = len(choice_prompts)
        states = [
            _ChoiceState(self._tool_output(req), self._reasoning_splitter(ids) if resp.chat else None)
            for _, ids in choice_prompts
        ]

        def chunk_usage(index: int) -> dict:
            """A chunk's usage field: none, null (include_usage: only the final chunk has it), or with
            continuous_usage_stats, its choice's so far (vLLM's: its prompt and its tokens)."""
            if not req.continuous_usage:
                return {"usage": None} if req.include_usage else {}
            return {"usage": _usage(len(choice_prompts[index][1]), states[index].num_tokens)}

        try:
            if resp.chat:  # the role comes first, once per choice
                for i in range(num_choices):
                    delta = {
                        "index": i,
                        "delta": {"role": req.response_role, "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    ids = token_id_fields(req, prompt_ids=choice_prompts[0][1]) if i == 0 else {}  # (once)
                    yield _sse(resp.body([delta], final=False, **ids, **chunk_usage(i)))
            async for index, out in self._with_prompt_scores(stream, req):
                state = states[index]
                first, state.started = not state.started, True
                state.num_tokens += len(out.token_ids)
                if not out.token_ids and not out.finished:  # (a chunk per new token, text or not, as vLLM)
                    continue
                text, logprobs, extra = out.text, None, {}
                if resp.chat:
                    if req.logprobs is not None:
                        formatter = self.logprobs.shown_as(req.return_tokens_as_token_ids)
                        logprobs = formatter.chat(out.logprobs or [], req.logprobs)
                    if first and index == 0 and req.prompt_logprobs is not None:
                        extra["prompt_logprobs"] = self.logprobs.prompt(
                            out.prompt_logprobs or [], req.prompt_logprobs
                        )
                else:
                    echo = req.echo and first
                    if echo:
                        text = self._prompt_text(*choice_prompts[index]) + text
                    if req.logprobs is not None:
                        logprobs, state.text_offset = self._completion_logprobs(
                            out, req, choice_prompts[index][1] if echo else None, state.text_offset
                        )
                reason = out.finish_reason if out.finished else None
                if resp.chat:
                    delta, reason = state.chat_delta(text, out.finished, reason, req.include_reasoning)
                    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
                else:  # (vLLM's completion chunks carry stop_reason, null until the last)
                    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
                    choice["stop_reason"] = None
                    if first and req.prompt_logprobs is not None:
                        choice["prompt_logprobs"] = self.logprobs.prompt(
                            out.prompt_logprobs or [], req.prompt_logprobs
                        )
                if out.finished:
                    choice["stop_reason"] = out.stop_reason
                # (every delta makes a chunk, its text held back or not: each token's id goes out once)
                prompt_ids = choice_prompts[index][1] if first and not resp.chat else None
                choice |= token_id_fields(req, out.token_ids, prompt_ids)
                yield _sse(resp.body([choice], final=False, **extra, **chunk_usage(index)))
            if req.include_usage:
                yield _sse(resp.body([], final=False, usage=resp.usage(sum(s.num_tokens for s in states))))
        except Exception as e:  # headers are sent: report in-band, as vLLM does
            logger.exception("streaming request %s failed", resp.request_id)
            yield _sse(error_body(str(e), "internal_server_error"))
        finally:
            stream.close()  # the client went away (cancelled) or we are done: abort what runs on
        yield "data: [DONE]\n\n"

    @staticmethod
    async def _with_prompt_scores(stream: RequestStream, req: GenerateRequest):
        """The stream's (choice index, delta) pairs as shown (`_as_shown`), each with its prompt's scores
        (prompt_logprobs, echo): only choice 0 of a prompt scores it, so the deltas of the prompt's other
        choices wait here for choice 0's first one."""
        if req.params.prompt_logprobs is None:
            async for index, out in stream:
                yield index, _as_shown(out, req, None)
            return
        scores: dict[int, list | None] = {}  # prompt index -> its choice 0's prompt_logprobs
        waiting: dict[int, list[tuple[int, RequestDelta]]] = {}  # prompt index -> deltas held back
        async for index, out in stream:
            prompt = index // req.params.n
            if prompt not in scores and index % req.params.n:
                waiting.setdefault(prompt, []).append((index, out))
                continue
            ready = [(index, out)]
            if prompt not in scores:  # choice 0's first delta
                scores[prompt] = out.prompt_logprobs
                ready += waiting.pop(prompt, [])
            for i, delta in ready:
                yield i, _as_shown(delta, req, scores[prompt])

    def _final_choice(
        self,
        index: int,
        c: RequestDelta,
        req: GenerateRequest,
        chat: bool,
        prompt: tuple[str | None, list[int]],
    ) -> dict:
        """c: all of a finished choice's deltas, merged; prompt: its (text or None, token ids)."""
        if chat:
            formatter = self.logprobs.shown_as(req.return_tokens_as_token_ids)
            logprobs = None if req.logprobs is None else formatter.chat(c.logprobs or [], req.logprobs)
            message, reason, answer = {"role": req.response_role}, c.finish_reason, c.text
            if (splitter := self._reasoning_splitter(prompt[1])) is not None:  # the thinking, then the answer
                reasoning, answer = splitter.extract(c.text)
                message |= _reasoning_fields(reasoning) if req.include_reasoning else {}
            if (tools := self._tool_output(req)) is not None:  # the answer as text or tool calls
                shown, reason = tools.message(answer, reason)
                message |= shown
            else:
                message["content"] = answer
            return {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": reason,
                "stop_reason": c.stop_reason,
                **token_id_fields(req, c.token_ids),
            }
        logprobs = None
        if req.logprobs is not None:
            logprobs, _ = self._completion_logprobs(c, req, prompt[1] if req.echo else None, 0)
        choice = {
            "index": index,
            "text": self._prompt_text(*prompt) + c.text if req.echo else c.text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        if req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.logprobs.prompt(c.prompt_logprobs or [], req.prompt_logprobs)
        return choice | token_id_fields(req, c.token_ids, prompt[1])

    def _completion_logprobs(
        self, delta: RequestDelta, req: GenerateRequest, echo_ids: list[int] | None, text_offset: int
    ) -> tuple[dict, int]:
        """A completion choice's logprobs for `delta`; with echo_ids (the prompt, echoed before the first
        delta) its tokens come first, the first one without a logprob."""
        entries, shown = delta.logprobs or [], self.logprobs.shown_as(req.return_tokens_as_token_ids)
        if echo_ids is None:
            return shown.completion(entries, req.logprobs, text_offset)
        scored = (delta.prompt_logprobs or [None])[1:]
        return shown.completion(scored + entries, req.logprobs, text_offset, first_token=echo_ids[0])

    def _prompt_text(self, text: str | None, token_ids: list[int]) -> str:
        """The prompt as echoed: its text, or its token ids decoded."""
        if text is not None:
            return text
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""

    # ---- helpers ----------------------------------------------------------------------------------

    def _reasoning_splitter(self, prompt_ids: list[int]) -> ReasoningSplitter | None:
        """A chat choice's splitter of thinking from answer, under --reasoning-parser."""
        if self.think_tags is None:
            return None
        return ReasoningSplitter(self.think_tags, not prompt_ends_thinking(prompt_ids, *self.think_ids))

    def _tool_output(self, req: GenerateRequest) -> ToolOutput | None:
        """A choice's reader of tool calls, when its request may make them."""
        if req.tools is None or req.tools.choice == "none":
            return None
        if self.tool_call_parser is None:
            return ToolOutput(req.tools, None)
        parser = tool_parser(self.tool_call_parser, req.tools.tools) if req.tools.choice == "auto" else None
        return ToolOutput(req.tools, parser, TOOL_PARSERS[self.tool_call_parser].call_id)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise RequestError(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                "model",
                status_code=404,
                code="model_not_found",
            )

    def _render(self, messages: list[dict], options: dict, tools: list[dict] | None = None) -> str:
        """A conversation (with the tools shown to the model) as the prompt text of the chat endpoint (and of
        /tokenize's messages)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                "this model has no chat template: use /v1/completions with a plain prompt", "messages"
            )
        try:
            return render_chat(self.tokenizer, messages, **options, tools=tools)
        except ValueError as e:
            raise RequestError(f"{e} (on these messages and options)", "messages") from None

    def _tokenize(self, prompt: str | list[int], param: str, add_special_tokens: bool):
        """-> (text or None, token ids). Token-id prompts are checked by the engine."""
        if not isinstance(prompt, str):
            return None, list(prompt)
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: send the prompt as a list of token ids", param)
        if not prompt:
            raise RequestError("the prompt is empty", param)
        return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)


@dataclass
class _Response:
    """The fields every response or chunk of one request shares."""

    request_id: str
    model: str
    created: int
    chat: bool
    num_prompt_tokens: int

    def body(self, choices: list[dict], final: bool, **extra) -> dict:
        if self.chat:
            obj = "chat.completion" if final else "chat.completion.chunk"
        else:
            obj = "text_completion"
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def usage(self, num_completion_tokens: int) -> dict:
        return _usage(self.num_prompt_tokens, num_completion_tokens)


def _reasoning_fields(reasoning: str | None) -> dict:
    """A message's (or delta's) thinking: `reasoning` (vLLM >= 0.11) and `reasoning_content` (vLLM before it,
    DeepSeek's API, SGLang: what most clients read)."""
    return {"reasoning": reasoning, "reasoning_content": reasoning}


def _usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


class _ChoiceState:
    """What one streamed choice has sent so far. Each delta carries only the new text (the engine holds
    back what a stop string could still cut: IncrementalDetokenizer.stable_text), so chunks just append."""

    def __init__(self, tools: ToolOutput | None = None, reasoning: ReasoningSplitter | None = None):
        self.tools = tools  # chat with tools: turns text into content and tool-call deltas
        self.reasoning = reasoning  # --reasoning-parser: splits the thinking off the text first
        self.num_tokens = 0
        self.started = False  # a chunk has been sent
        self.text_offset = 0  # completions logprobs: characters of token strings sent so far

    def chat_delta(
        self, text: str, finished: bool, reason: str | None, include_reasoning: bool
    ) -> tuple[dict, str | None]:
        """A chat chunk's delta for the choice's next text (`finished`: the last) and its finish_reason: the
        thinking split off first (--reasoning-parser), then the answer as content or tool calls."""
        reasoning = ""
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(text)
            if finished:
                more_reasoning, more_text = self.reasoning.flush()
                reasoning, text = reasoning + more_reasoning, text + more_text
        delta = {"content": text}  # ("" for a token with no text yet, as vLLM)
        if self.tools is not None:
            if text or finished:  # (nothing of a call while the model thinks)
                delta = self.tools.delta(text, finished)
            reason = self.tools.finish_reason(reason) if finished else None
        if reasoning and include_reasoning:  # (no empty content beside the thinking)
            delta = _reasoning_fields(reasoning) | {k: v for k, v in delta.items() if v != ""}
        return delta, reason


class _Finished:
    """Choices already finished, handed out as a RequestStream hands out deltas (for `_stream`)."""

    def __init__(self, choices: list[RequestDelta]):
        self._choices = choices

    async def __aiter__(self):
        for index, choice in enumerate(self._choices):
            yield index, choice

    def close(self) -> None:
        pass


async def _one_event(body: dict) -> AsyncIterator[str]:
    yield _sse(body)
    yield "data: [DONE]\n\n"


def _as_shown(delta: RequestDelta, req: GenerateRequest, prompt_scores: list | None) -> RequestDelta:
    """A choice's delta as the response shows it: with its prompt's scores (which choice 0 of the prompt
    computed) and, for an echo of the prompt alone (max_tokens 0), nothing generated."""
    delta = dataclasses.replace(delta, prompt_logprobs=prompt_scores)
    if req.prompt_only:
        delta = dataclasses.replace(
            delta,
            token_ids=[],
            text="",
            logprobs=None if delta.logprobs is None else [],
            finish_reason="length" if delta.finished else None,
            stop_reason=None,
        )
    return delta


async def _wait_all(request: Request, stream: RequestStream, num_subs: int) -> list[RequestDelta]:
    """Each non-streamed sub-request's deltas merged into one, in order; ClientDisconnected if the client
    goes away first (the app answers 499), a 503 if the engine dies. Closes the stream (aborting what has not
    finished)."""
    try:
        return await _unless_disconnected(request, _collect(stream, num_subs))
    except EngineDeadError as e:
        raise RequestError(str(e), status_code=503, type="service_unavailable") from None
    finally:
        stream.close()


async def _collect(stream: RequestStream, num_choices: int) -> list[RequestDelta]:
    """Each choice's deltas merged into one (a non-streamed request usually gets a single delta)."""
    finals: list[RequestDelta | None] = [None] * num_choices
    async for index, delta in stream:
        finals[index] = delta if finals[index] is None else finals[index].merge(delta)
    return finals  # type: ignore[return-value]


async def _unless_disconnected(request: Request, coro):
    """Await `coro`, but give up (ClientDisconnected) if the client closes the connection first."""

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientDisconnected
    return task.result()


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generator (aborting the request), however the
    response ends: finished, client gone (cancelled or failed send)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _json_body(request: Request):
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    # json.loads lets an unpaired UTF-16 surrogate through ("\ud83d": an emoji cut in half), which no
    # tokenizer and no UTF-8 response can take. It comes from an escape or (json.loads decodes with
    # surrogatepass) its UTF-8 bytes; a body in another encoding (UTF-16/32, rare) is searched whole.
    if json.detect_encoding(raw) != "utf-8" or _SURROGATE_HINT.search(raw):
        where = _unpaired_surrogate(body, "")
        if where is not None:
            raise RequestError(
                f"{where or 'the request body'} holds an unpaired UTF-16 surrogate: not valid Unicode",
                where or None,
            )
    return body


_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # (json.loads joins an escaped pair into one character)


def _unpaired_surrogate(obj, where: str) -> str | None:
    """The path ("messages[0].content") of the first string in `obj` with an unpaired surrogate (for one in
    a key: its object's, "" at the top), else None."""
    if isinstance(obj, str):
        return where if _SURROGATE.search(obj) else None
    if isinstance(obj, dict):
        for key, value in obj.items():
            if _SURROGATE.search(key):
                return where
            if (found := _unpaired_surrogate(value, f"{where}.{key}" if where else key)) is not None:
                return found
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            if (found := _unpaired_surrogate(value, f"{where}[{i}]")) is not None:
                return found
    return None


# ---- the app ------------------------------------------------------------------------------------------


def build_app(
    config: Config,
    served_model_name: str | None = None,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = True,
) -> FastAPI:
    """tool_call_parser: a name in tool_parsers.TOOL_PARSERS, which (with enable_auto_tool_choice) turns on
    tool_choice "auto"."""
    if tool_call_parser is not None:
        tool_parser(tool_call_parser)  # (ValueError for an unknown name, before anything starts)
    model_name = served_model_name or config.model
    server = OpenAIServer(config, model_name, tool_call_parser, enable_auto_tool_choice)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.engine.start()
        logger.info("serving %r (max_model_len=%d)", server.model_name, server.max_model_len)
        try:
            yield
        finally:
            server.engine.shutdown()

    app = FastAPI(title="nanovllm", lifespan=lifespan)
    app.state.server = server
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", server.embeddings, methods=["POST"])
    for path in ("/score", "/v1/score"):  # (vLLM's paths)
        app.add_api_route(path, server.score, methods=["POST"])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.add_api_route(path, server.rerank, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    app.add_api_route("/version", server.version, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"])

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)  # (nobody reads it: the client left; the access log shows it)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> Response:
        return JSONResponse(e.to_dict(), status_code=e.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> Response:
        logger.exception("request failed")
        return JSONResponse(error_body(f"internal error: {e!r}", "internal_server_error"), status_code=500)

    return app


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from nanovllm.cli import engine_kwargs

    if args.enable_auto_tool_choice and args.tool_call_parser is None:  # (vLLM's rule)
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser")
    config = Config.from_kwargs(args.model, **engine_kwargs(args))
    if config.is_preset:
        logger.warning("%r is a preset with RANDOM weights: the text is meaningless", args.model)
    # (a parser alone, as vLLM's, only names the call ids' kind: "auto" needs the flag too)
    app = build_app(config, args.served_model_name, args.tool_call_parser, args.enable_auto_tool_choice)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
