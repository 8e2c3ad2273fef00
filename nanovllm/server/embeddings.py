"""POST /v1/embeddings (OpenAI's, with vLLM's extra fields): the request body -> PoolingParams, and the
vectors -> the response. The handler (api_server.py) runs each input as one engine request
(engine/llm_engine.py, docs/embeddings.md)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanovllm.pooling_params import PoolingParams
from nanovllm.sampling_params import ParamError
from nanovllm.server.errors import RequestError
from nanovllm.server.protocol import _check_fields, _parse_bool, _parse_model, _parse_prompt

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
    )
)


@dataclass
class EmbeddingRequest:
    model: str | None
    inputs: list[str | list[int]]
    params: PoolingParams
    base64: bool
    add_special_tokens: bool
    priority: int


def parse_embedding_request(body: Any) -> EmbeddingRequest:
    body = _check_fields(body, EMBEDDING_FIELDS, {})
    inputs = _parse_prompt(body.get("input"), "input")
    if len(inputs) > MAX_INPUTS:
        raise RequestError(f"{len(inputs)} inputs exceed the limit of {MAX_INPUTS}", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise RequestError(
            f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format"
        )
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
    return EmbeddingRequest(
        _parse_model(body),
        inputs,
        params,
        encoding == "base64",
        _parse_bool(body, "add_special_tokens", True),
        priority,
    )


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
        "usage": {
            "prompt_tokens": num_prompt_tokens,
            "total_tokens": num_prompt_tokens,
            "completion_tokens": 0,
        },
    }


def _base64(vector: np.ndarray) -> str:
    """OpenAI's base64 embedding: the float32 values' little-endian bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
