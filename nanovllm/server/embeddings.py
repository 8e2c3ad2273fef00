"""POST /v1/embeddings (OpenAI's, with vLLM's extra fields), and vLLM's /v1/score and /v1/rerank for an
embedding model (cosine similarities: nanovllm/scoring.py): request bodies -> PoolingParams and texts, vectors
-> responses. The handlers (api_server.py) run each text as one engine request (engine/llm_engine.py,
docs/embeddings.md)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanovllm.pooling_params import PoolingParams
from nanovllm.sampling_params import ParamError
from nanovllm.scoring import score_pairs
from nanovllm.server.errors import RequestError
from nanovllm.server.protocol import (
    CHAT_TEMPLATE_FIELDS,
    _check_fields,
    _parse_bool,
    _parse_chat_options,
    _parse_messages,
    _parse_model,
    _parse_prompt,
)

MAX_INPUTS = 2048  # inputs per request, as OpenAI's limit
EMBEDDING_FIELDS = frozenset(
    (
        "model",
        "input",
        "encoding_format",  # "float" (a list) or "base64" (little-endian float32 bytes)
        "dimensions",  # a Matryoshka model's cut
        "user",  # an end-user id for abuse tracking: no effect
        # vLLM's extra fields
        "truncate_prompt_tokens",
        "normalize",
        "use_activation",
        "add_special_tokens",
        "priority",
        # vLLM's chat-style embedding request: `messages` (rendered by the chat template) instead of `input`
        "messages",
        *CHAT_TEMPLATE_FIELDS,
    )
)


@dataclass
class EmbeddingRequest:
    model: str | None
    inputs: list[str | list[int]]  # (a chat-style request: none; its conversation is `messages`)
    params: PoolingParams
    base64: bool
    add_special_tokens: bool
    priority: int
    messages: list[dict] | None = None  # a conversation, embedded as the chat template renders it
    chat_options: dict | None = None  # render_chat's switches for `messages`


def parse_embedding_request(body: Any) -> EmbeddingRequest:
    body = _check_fields(body, EMBEDDING_FIELDS, {})
    if body.get("messages") is not None:
        req = _chat_embedding_request(body)
    else:
        if any(body.get(f) is not None for f in CHAT_TEMPLATE_FIELDS):
            field = next(f for f in CHAT_TEMPLATE_FIELDS if body.get(f) is not None)
            raise RequestError(f"{field} applies to messages, not to input", field)
        req = _embedding_request(body, _parse_prompt(body.get("input"), "input"))
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise RequestError(
            f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format"
        )
    req.base64 = encoding == "base64"
    return req


def _chat_embedding_request(body: dict) -> EmbeddingRequest:
    """vLLM's chat-style embedding request: one conversation, rendered by the chat template with no generation
    prompt (unless add_generation_prompt) and no special tokens added on top (unless add_special_tokens)."""
    if body.get("input") is not None:
        raise RequestError("give either input or messages", "messages")
    given = {k: v for k, v in body.items() if v is not None}  # (null: the default, as for any field)
    chat_defaults = {"add_special_tokens": False, "add_generation_prompt": False, **given}
    req = _embedding_request(chat_defaults, [])
    req.messages = _parse_messages(body["messages"])
    req.chat_options = _parse_chat_options(chat_defaults)
    return req


def _embedding_request(body: dict, inputs: list[str | list[int]]) -> EmbeddingRequest:
    """The texts to embed and the fields every embedding-based endpoint shares (vLLM's extras)."""
    if len(inputs) > MAX_INPUTS:
        raise RequestError(f"{len(inputs)} inputs exceed the limit of {MAX_INPUTS}", "input")
    priority = body.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise RequestError(f"priority must be an int, got {priority!r}", "priority")
    try:
        params = PoolingParams(
            truncate_prompt_tokens=body.get("truncate_prompt_tokens"),
            dimensions=body.get("dimensions"),
            normalize=body.get("normalize"),
            use_activation=body.get("use_activation"),
        )
    except ParamError as e:
        raise RequestError(str(e), e.param) from None
    add_special_tokens = _parse_bool(body, "add_special_tokens", True)
    return EmbeddingRequest(_parse_model(body), inputs, params, False, add_special_tokens, priority)


def embedding_response(
    request_id: str,
    model: str,
    created: int,
    vectors: list[np.ndarray],  # [dimensions] float32 each
    num_prompt_tokens: int,
    as_base64: bool,
) -> dict:
    """OpenAI's embeddings response: one `embedding` object per input, in order; the prompt tokens used."""
    data = [
        {"object": "embedding", "index": i, "embedding": _base64(v) if as_base64 else v.tolist()}
        for i, v in enumerate(vectors)
    ]
    return {
        "id": request_id,
        "object": "list",
        "created": created,
        "model": model,
        "data": data,
        "usage": _usage(num_prompt_tokens),
    }


def _usage(num_prompt_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens, "completion_tokens": 0}


def _base64(vector: np.ndarray) -> str:
    """OpenAI's base64 embedding: the float32 values' little-endian bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


# ---- scoring with an embedding model: POST /v1/score and /v1/rerank (vLLM's) ---------------------------

SCORE_FIELDS = frozenset(("model", "text_1", "text_2", "truncate_prompt_tokens", "priority", "user"))
RERANK_FIELDS = frozenset(
    ("model", "query", "documents", "top_n", "return_documents", "truncate_prompt_tokens", "priority", "user")
)


@dataclass
class ScoreRequest:
    """Texts to embed (`embed.inputs`: data_1's, then data_2's) and the (i, j) pairs scored."""

    embed: EmbeddingRequest
    pairs: list[tuple[int, int]]  # (index into text_1, index into text_2)
    num_1: int  # texts of text_1: text_2's vectors follow them


@dataclass
class RerankRequest:
    embed: EmbeddingRequest  # the query, then the documents
    documents: list[str | list[int]]
    top_n: int  # the best top_n results (0: all)
    return_documents: bool


def parse_score_request(body: Any) -> ScoreRequest:
    body = _check_fields(body, SCORE_FIELDS, {})
    side_1, side_2 = _parse_prompt(body.get("text_1"), "text_1"), _parse_prompt(body.get("text_2"), "text_2")
    try:
        pairs = score_pairs(len(side_1), len(side_2))
    except ValueError as e:
        raise RequestError(str(e), "text_2") from None
    return ScoreRequest(_embedding_request(body, side_1 + side_2), pairs, len(side_1))


def parse_rerank_request(body: Any) -> RerankRequest:
    body = _check_fields(body, RERANK_FIELDS, {})
    query = body.get("query")
    if not (isinstance(query, str) and query):
        raise RequestError(f"query must be a non-empty string, got {query!r}", "query")
    documents = _parse_prompt(body.get("documents"), "documents")
    top_n = body.get("top_n") or 0
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
        raise RequestError(f"top_n must be an int >= 0, got {top_n!r}", "top_n")
    embed = _embedding_request(body, [query, *documents])
    return RerankRequest(embed, documents, top_n, _parse_bool(body, "return_documents", True))


def score_response(request_id: str, model: str, created: int, scores: list[float], num_tokens: int) -> dict:
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return {"id": request_id, "object": "list", "created": created, "model": model, "data": data,
            "usage": _usage(num_tokens)}  # fmt: skip


def rerank_response(
    request_id: str, model: str, req: RerankRequest, scores: list[float], num_tokens: int
) -> dict:
    """The documents by relevance (the cosine of each with the query), best first, the top_n of them."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    results = []
    for i in order[: req.top_n or None]:
        result = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            document = req.documents[i]
            result["document"] = {"text": document if isinstance(document, str) else None}
        results.append(result)
    return {"id": request_id, "model": model, "usage": _usage(num_tokens), "results": results}
