"""The request fields that ask for a structured output, as vLLM's server reads them, into one
StructuredOutputsParams: OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name": ..., "schema": {...}}}), vLLM's `structured_outputs` object, and its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_whitespace_pattern` fields."""

from __future__ import annotations

import dataclasses
from typing import Any

from nanovllm.sampling_params import ParamError, StructuredOutputsParams
from nanovllm.server.errors import RequestError

STRUCTURED_FIELDS = ("structured_outputs", "response_format")
# vLLM's older names for structured_outputs' fields
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_whitespace_pattern": "whitespace_pattern",
}
_PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(StructuredOutputsParams))
_JSON_SCHEMA_FIELDS = frozenset(("name", "schema", "strict", "description"))


def parse_structured_outputs(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint and the field it came in (the engine's errors about it name that field),
    or (None, None). Asking in two places (e.g. response_format and guided_regex) is a 400 naming the
    second."""
    found: list[tuple[str, dict]] = []  # (the field asked through, StructuredOutputsParams' kwargs)
    spec = body.get("structured_outputs")
    if spec is not None:
        if not isinstance(spec, dict):
            raise RequestError(f"structured_outputs must be an object, got {spec!r}", "structured_outputs")
        unknown = sorted(set(spec) - _PARAM_FIELDS)
        if unknown:
            raise RequestError(f"unsupported structured_outputs field: {unknown[0]!r}", "structured_outputs")
        if any(v is not None and v is not False for v in spec.values()):  # (0 is a value: an error below)
            found.append(("structured_outputs", {k: v for k, v in spec.items() if v is not None}))
    guided = {GUIDED_FIELDS[k]: body[k] for k in GUIDED_FIELDS if body.get(k) is not None}
    if guided:
        found.append((next(k for k in GUIDED_FIELDS if body.get(k) is not None), guided))
    response_format = _response_format(body.get("response_format"))
    if response_format is not None:
        found.append(("response_format", response_format))
    if not found:
        return None, None
    if len(found) > 1:
        raise RequestError(
            f"{found[1][0]} asks for a structured output that {found[0][0]} already sets", found[1][0]
        )
    field, kwargs = found[0]
    try:
        return StructuredOutputsParams(**kwargs), field
    except ParamError as e:  # (its message names structured_outputs' field: say which request field that was)
        raise RequestError(str(e) if field == "structured_outputs" else f"{field}: {e}", field) from None


def _response_format(value: Any) -> dict | None:
    """OpenAI's response_format -> StructuredOutputsParams' kwargs (None for plain text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text" and set(value) == {"type"}:
        return None
    if kind == "json_object" and set(value) == {"type"}:
        return {"json_object": True}
    if kind == "json_schema" and set(value) <= {"type", "json_schema"}:
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not set(spec) <= _JSON_SCHEMA_FIELDS:
            fields = ", ".join(sorted(_JSON_SCHEMA_FIELDS))
            raise RequestError(
                f"response_format.json_schema must be an object of {fields}", "response_format"
            )
        schema = spec.get("schema")
        # (OpenAI's schema may be left out: then any JSON object, as vLLM's server does)
        return {"json_object": True} if schema is None else {"json": schema}
    raise RequestError(
        'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
        f'"json_schema": {{"name": ..., "schema": {{...}}}}}}, got {value!r}',
        "response_format",
    )
