"""OpenAI request bodies -> validated, engine-ready records; OpenAI's error shape.

Every accepted field is listed here. A field we do not implement is a 400 that names it, unless it
carries its neutral value (`suffix: ""`, `best_of: 1`, `tools: []` ...), which changes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nanovllm.sampling_params import BeamSearchParams, ParamError, SamplingParams
from nanovllm.server.errors import RequestError
from nanovllm.server.structured import GUIDED_FIELDS, STRUCTURED_FIELDS, parse_structured_outputs
from nanovllm.server.tools import TOOL_FIELDS, ToolRequest, parse_tools
from nanovllm.utils.chat import MessageError, check_chat_options, text_messages

MAX_N = 128  # choices per request (n x prompts): a guard against one request flooding the engine

# vLLM's extra body fields, passed straight to SamplingParams.
VLLM_EXTRA_FIELDS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "prompt_logprobs",
    "allowed_token_ids",
    "truncate_prompt_tokens",
    "bad_words",
)
# vLLM's extra fields that shape the response, not the generation (server/token_ids.py, logprobs.py)
TOKEN_ID_FIELDS = ("return_token_ids", "return_tokens_as_token_ids")
# OpenAI fields shared by both endpoints (besides max_tokens, logprobs and the prompt/messages).
_SHARED_FIELDS = (
    "model",
    "n",
    "stream",
    "stream_options",
    "stop",
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "user",  # an end-user id for abuse tracking: it has no effect on generation
    "logit_bias",  # {"token id": bias in [-100, 100]}
    "priority",  # vLLM's: lower is served first; not 0 only under --scheduling-policy priority
)
# vLLM's beam search (both endpoints): n is the beam width; length_penalty means nothing without it
BEAM_SEARCH_FIELDS = ("use_beam_search", "length_penalty")
# structured outputs (both endpoints, as vLLM's): server/structured.py reads them
_STRUCTURED = (*STRUCTURED_FIELDS, *GUIDED_FIELDS)
COMPLETION_FIELDS = frozenset(
    ("prompt", "max_tokens", "logprobs", "echo")
    + _SHARED_FIELDS
    + VLLM_EXTRA_FIELDS
    + TOKEN_ID_FIELDS
    + BEAM_SEARCH_FIELDS
    + _STRUCTURED
)
# vLLM's extra chat fields: how the conversation is rendered (utils/chat.py render_chat)
CHAT_TEMPLATE_FIELDS = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs")
# vLLM's: under --reasoning-parser, whether the reply shows its thinking (server/reasoning.py)
REASONING_FIELDS = ("include_reasoning",)
CHAT_FIELDS = frozenset(
    ("messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs")
    + _SHARED_FIELDS
    + VLLM_EXTRA_FIELDS
    + TOKEN_ID_FIELDS
    + BEAM_SEARCH_FIELDS
    + CHAT_TEMPLATE_FIELDS
    + _STRUCTURED
    + TOOL_FIELDS
    + REASONING_FIELDS
)
_MESSAGES_ONLY = (*CHAT_TEMPLATE_FIELDS, "tools")  # /tokenize: what applies to messages, not to a prompt
TOKENIZE_FIELDS = frozenset(
    ("model", "prompt", "messages", "add_special_tokens", "return_token_strs") + _MESSAGES_ONLY
)
DETOKENIZE_FIELDS = frozenset(("model", "tokens"))

# Config.default_sampling_params a request's missing fields take (max_tokens: _parse_common's `fill`)
GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

_empty = lambda v: v is None or v == [] or v == {} or v == ""  # noqa: E731
_false = lambda v: v is None or v is False  # noqa: E731
# Fields we do not implement, accepted only at a value that asks for nothing.
COMPLETION_NEUTRAL = {
    "suffix": _empty,
    "best_of": lambda v: v is None or v == 1,
    # vLLM's extra field at its default: a prompt gets the tokenizer's special tokens
    "add_special_tokens": lambda v: v is None or v is True,
}
CHAT_NEUTRAL = {
    "functions": _empty,  # (OpenAI's deprecated forms of tools and tool_choice)
    "function_call": lambda v: v is None or v == "none",
    "modalities": lambda v: v is None or v == ["text"],
    "store": lambda v: v is None or v is False,
    "metadata": _empty,
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "service_tier": lambda v: v is None or v == "auto",
    # vLLM's extra fields at their defaults: a conversation's special tokens come from its template alone
    "echo": _false,
    "add_special_tokens": _false,
}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# what a message may hold: tool_calls and the thinking on an assistant's, tool_call_id on a tool's
# (utils/chat.py checks)
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning", "reasoning_content")
# Fields a beam search cannot honour (vLLM's server ignores them), accepted with use_beam_search only at a
# value that asks for nothing. Its own are n, max_tokens, temperature, ignore_eos, length_penalty,
# include_stop_str_in_output and logprobs (at most the 2n alternatives a step keeps); the prompt's (echo,
# truncate_prompt_tokens, chat options) apply as always.
BEAM_SEARCH_NEUTRAL = {
    "stop": _empty,
    "top_p": lambda v: v is None or v == 1,
    "seed": lambda v: v is None,
    "presence_penalty": lambda v: v is None or v == 0,
    "frequency_penalty": lambda v: v is None or v == 0,
    "logit_bias": _empty,
    "top_k": lambda v: v is None or v in (0, -1),
    "min_p": lambda v: v is None or v == 0,
    "repetition_penalty": lambda v: v is None or v == 1,
    "min_tokens": lambda v: v is None or v == 0,
    "stop_token_ids": _empty,
    "skip_special_tokens": _false,  # (a beam's text shows special tokens, as vLLM's)
    "prompt_logprobs": lambda v: v is None,
    "allowed_token_ids": lambda v: v is None,
    "bad_words": _empty,
    **{name: lambda v: v is None for name in _STRUCTURED if name != "response_format"},
    "response_format": lambda v: v is None or v == {"type": "text"},
    # a search cannot follow a named or required tool's constraint ("auto" only parses its beams)
    "tool_choice": lambda v: v in (None, "none", "auto"),
}


@dataclass
class GenerateRequest:
    """What both endpoints hand to the engine: prompts x params.n choices with one set of sampling params."""

    model: str | None
    prompts: list[str | list[int]]  # completions: one or a batch; chat: [messages] (rendered later)
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream: a final chunk with the usage
    fill_max_tokens: bool  # max_tokens not given (chat): at most what the context window leaves
    logprobs: int | None  # top alternatives per token; None: no logprobs
    messages: list[dict] | None = None  # chat only
    echo: bool = False  # completions: the prompt's text (and logprobs) before each choice's
    prompt_only: bool = False  # echo with max_tokens 0: the prompt alone (one token is generated, unshown)
    # the prompt_logprobs field of the response (vLLM's); params.prompt_logprobs may be larger, for echo
    prompt_logprobs: int | None = None
    chat_options: dict = dataclasses.field(default_factory=dict)  # chat: render_chat's keyword arguments
    continuous_usage: bool = False  # stream: every chunk carries its choice's usage so far (vLLM's)
    # use_beam_search: the search's settings (params then only carries n, max_tokens and the prompt's options)
    beam_search: BeamSearchParams | None = None
    priority: int = 0  # lower first under scheduling_policy "priority" (the server checks the policy)
    structured_field: str | None = None  # the field that asked for params.structured_outputs
    tools: ToolRequest | None = None  # chat: the tools shown to the model, and what tool_choice asks
    include_reasoning: bool = True  # chat under --reasoning-parser: the reply's thinking is shown
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids (server/token_ids.py)
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs show each token as "token_id:{id}"

    @property
    def response_role(self) -> str:
        """Chat: the role of the message the response holds. vLLM's: the assistant's, unless no generation
        prompt was asked for: then the output goes on the last message, and takes its role."""
        if self.chat_options.get("add_generation_prompt", True) or not self.messages:
            return "assistant"
        return self.messages[-1]["role"]


@dataclass
class TokenizeRequest:
    """POST /tokenize (vLLM's): a prompt, or a conversation rendered as the chat endpoint renders it."""

    model: str | None
    prompt: str | None
    messages: list[dict] | None
    chat_options: dict
    add_special_tokens: bool
    return_token_strs: bool
    tools: list[dict] | None = None  # messages: the tools the template shows (as the chat endpoint's)


def parse_completion_request(
    body: Any, max_model_len: int, defaults: dict | None = None, max_tokens_cap: int | None = None
) -> GenerateRequest:
    body = _check_fields(body, COMPLETION_FIELDS, COMPLETION_NEUTRAL)
    if body.get("best_of") is not None and body.get("n") not in (None, 1):
        raise RequestError("best_of together with n is not supported", "best_of")
    prompts = _parse_prompt(body.get("prompt"))
    logprobs = body.get("logprobs")
    echo = _parse_bool(body, "echo", False)
    max_tokens = body.get("max_tokens")
    # echo with max_tokens 0 (OpenAI's prompt scoring): one token is generated and not shown, as in vLLM
    prompt_only = echo and type(max_tokens) is int and max_tokens == 0
    req = _parse_common(
        body,
        max_tokens=1 if prompt_only else max_tokens,
        max_tokens_param="max_tokens",
        logprobs=logprobs,
        logprobs_param="logprobs",
        default_max_tokens=16,
        max_model_len=max_model_len,
        defaults=defaults,
        max_tokens_cap=max_tokens_cap,
    )
    req.prompts = prompts
    req.echo, req.prompt_only = echo, prompt_only
    if prompt_only and req.beam_search is not None:
        raise RequestError("echo with max_tokens=0 is not supported with use_beam_search", "max_tokens")
    if echo and logprobs is not None and req.beam_search is not None:  # (the search scores no prompt)
        raise RequestError("logprobs with echo is not supported with use_beam_search", "logprobs")
    if req.echo and logprobs is not None:  # the prompt's logprobs come first in the choice's logprobs
        top = max(logprobs, req.params.prompt_logprobs or 0)
        req.params = dataclasses.replace(req.params, prompt_logprobs=top)
    n = req.params.n
    if len(prompts) * n > MAX_N:
        raise RequestError(f"{len(prompts)} prompts x n={n} choices exceeds the limit of {MAX_N}", "n")
    return req


def parse_chat_request(
    body: Any, max_model_len: int, defaults: dict | None = None, max_tokens_cap: int | None = None
) -> GenerateRequest:
    body = _check_fields(body, CHAT_FIELDS, CHAT_NEUTRAL)
    messages = _parse_messages(body.get("messages"))
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError(f"logprobs must be a boolean, got {logprobs!r}", "logprobs")
    # (top_logprobs 0 asks for nothing: vLLM accepts it without logprobs, as some clients send it)
    if top is not None and not logprobs and not (type(top) is int and top == 0):
        raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
    if body.get("max_completion_tokens") is not None:
        max_tokens, max_tokens_param = body["max_completion_tokens"], "max_completion_tokens"
    else:
        max_tokens, max_tokens_param = body.get("max_tokens"), "max_tokens"
    req = _parse_common(
        body,
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        logprobs=(top if top is not None else 0) if logprobs else None,
        logprobs_param="top_logprobs",
        default_max_tokens=None,
        max_model_len=max_model_len,
        defaults=defaults,
        max_tokens_cap=max_tokens_cap,
    )
    req.messages = messages
    req.chat_options = _parse_chat_options(body)
    req.tools = parse_tools(body)
    req.include_reasoning = _parse_bool(body, "include_reasoning", True)
    if req.tools is not None and req.tools.constrained:  # named, required: generated under the tools' schema
        if req.structured_field is not None:
            raise RequestError(
                f"tool_choice={body['tool_choice']!r} cannot be combined with {req.structured_field}",
                req.structured_field,
            )
        req.params = dataclasses.replace(req.params, structured_outputs=req.tools.constraint())
        req.structured_field = "tools"  # (a parameters schema the compiler refuses)
    return req


def parse_tokenize_request(body: Any) -> TokenizeRequest:
    """{"prompt": text} or {"messages": [...], chat options}; vLLM's defaults: special tokens are added to
    a prompt, not to a rendered conversation (its template holds them)."""
    body = _check_fields(body, TOKENIZE_FIELDS, {})
    model = _parse_model(body)
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise RequestError("give either prompt or messages", "prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(f"prompt must be a string, got {prompt!r}", "prompt")
    if prompt is not None and any(body.get(f) is not None for f in _MESSAGES_ONLY):
        field = next(f for f in _MESSAGES_ONLY if body.get(f) is not None)
        raise RequestError(f"{field} applies to messages, not to a prompt", field)
    return TokenizeRequest(
        model,
        prompt,
        None if messages is None else _parse_messages(messages),
        _parse_chat_options(body),
        _parse_bool(body, "add_special_tokens", prompt is not None),
        _parse_bool(body, "return_token_strs", False),
        tools.tools if (tools := parse_tools({"tools": body.get("tools")})) else None,
    )


def parse_detokenize_request(body: Any, vocab_size: int) -> tuple[str | None, list[int]]:
    """-> (model, token ids) of POST /detokenize {"tokens": [...]}."""
    body = _check_fields(body, DETOKENIZE_FIELDS, {})
    tokens = body.get("tokens")
    if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
        raise RequestError(f"tokens must be a list of token ids, got {tokens!r}", "tokens")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", "tokens")
    return _parse_model(body), tokens


def _parse_chat_options(body: dict) -> dict:
    """render_chat's switches and template variables from vLLM's extra chat fields, checked here so that
    a contradiction names its field."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise RequestError(f"chat_template_kwargs must be an object, got {kwargs!r}", "chat_template_kwargs")
    options = dict(
        add_generation_prompt=_parse_bool(body, "add_generation_prompt", True),
        continue_final_message=_parse_bool(body, "continue_final_message", False),
        chat_template_kwargs=kwargs or None,
    )
    try:
        check_chat_options(**options)
    except MessageError as e:
        raise RequestError(str(e), e.param) from None
    return options


def _parse_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean, got {value!r}", name)
    return value


def _parse_model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {model!r}", "model")
    return model


def _check_fields(body: Any, accepted: frozenset[str], neutral: dict) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    for key, value in body.items():
        if key in accepted:
            continue
        if key in neutral:
            if not neutral[key](value):
                raise RequestError(f"{key}={value!r} is not supported by this server", key)
            continue
        raise RequestError(f"unsupported parameter: {key!r}", key)
    return body


def _parse_common(
    body: dict,
    max_tokens: Any,
    max_tokens_param: str,
    logprobs: Any,
    logprobs_param: str,
    default_max_tokens: int | None,
    max_model_len: int,
    defaults: dict | None,
    max_tokens_cap: int | None,
) -> GenerateRequest:
    """`defaults`: Config.default_sampling_params; `max_tokens_cap`: Config.max_tokens_cap."""
    model = _parse_model(body)
    n = body.get("n")
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise RequestError(f"n must be an int in [1, {MAX_N}], got {n!r}", "n")
    stream = _parse_bool(body, "stream", False)
    include_usage, continuous_usage = _parse_stream_options(body.get("stream_options"), stream)
    stop = body.get("stop")
    if stop == []:
        stop = None

    defaults = defaults or {}
    # As vLLM's get_max_tokens: a chat request without max_tokens takes the checkpoint's max_new_tokens, and
    # (fill) at most what its prompt leaves, which the engine process sets once the prompt is known.
    fill = max_tokens is None and default_max_tokens is None
    if fill:
        max_tokens = defaults.get("max_tokens", max_model_len)
    kwargs = {
        "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
        "n": n,
        "stop": stop,
        "logprobs": logprobs,
        "logit_bias": _parse_logit_bias(body.get("logit_bias")),
    }
    kwargs["structured_outputs"], structured_field = parse_structured_outputs(body)
    # A field the request leaves out takes the checkpoint's generation_config.json value (vLLM's server)
    kwargs |= {name: value for name, value in defaults.items() if name in GENERATION_DEFAULT_FIELDS}
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", *VLLM_EXTRA_FIELDS):
        if body.get(name) is not None:
            kwargs[name] = body[name]
    priority = body.get("priority")
    priority = 0 if priority is None else priority
    if type(priority) is not int:
        raise RequestError(f"priority must be an integer, got {priority!r}", "priority")
    seed = kwargs.get("seed")
    if isinstance(seed, int) and not -(2**63) <= seed < 2**63:  # vLLM's protocol: a 64-bit signed int
        raise RequestError(f"seed must be a 64-bit signed int, got {seed}", "seed")
    try:
        params = SamplingParams(**kwargs)
        if not fill and params.max_tokens > max_model_len:  # no prompt leaves room for it: the limit is wrong
            raise RequestError(
                f"{max_tokens_param}={params.max_tokens} exceeds max_model_len={max_model_len}",
                max_tokens_param,
            )
        if max_tokens_cap is not None and params.max_tokens > max_tokens_cap:  # (vLLM: silently lowered)
            params = dataclasses.replace(params, max_tokens=max_tokens_cap)
        beam_search = _parse_beam_search(body, params)
    except ParamError as e:
        param = {"max_tokens": max_tokens_param, "logprobs": logprobs_param, "beam_width": "n"}.get(
            e.param, e.param
        )
        message = str(e) if param == e.param else str(e).replace(e.param, param, 1)
        raise RequestError(message, param) from None
    return GenerateRequest(
        model,
        [],
        params,
        stream,
        include_usage,
        fill,
        logprobs,
        prompt_logprobs=params.prompt_logprobs,
        continuous_usage=continuous_usage,
        beam_search=beam_search,
        priority=priority,
        structured_field=structured_field,
        return_token_ids=_parse_bool(body, "return_token_ids", False),
        return_tokens_as_token_ids=_parse_bool(body, "return_tokens_as_token_ids", False),
    )


def _parse_beam_search(body: dict, params: SamplingParams) -> BeamSearchParams | None:
    """vLLM's `to_beam_search_params`: n beams of max_tokens, at the request's temperature (else the
    checkpoint's, else 1), its ignore_eos and include_stop_str_in_output. A field the search would not
    honour is a 400 naming it (vLLM ignores them); so is length_penalty without the search."""
    length_penalty = body.get("length_penalty")
    if not _parse_bool(body, "use_beam_search", False):
        if length_penalty is not None and length_penalty != 1:
            raise RequestError("length_penalty applies only with use_beam_search", "length_penalty")
        return None
    for name, neutral in BEAM_SEARCH_NEUTRAL.items():
        if not neutral(body.get(name)):
            raise RequestError(f"{name}={body[name]!r} is not supported with use_beam_search", name)
    if params.logprobs is not None and params.logprobs > 2 * params.n:  # (the caller names its field)
        raise ParamError(
            f"logprobs={params.logprobs} exceeds the {2 * params.n} alternatives (2 * n) a beam search step"
            " keeps",
            "logprobs",
        )
    return BeamSearchParams(
        beam_width=params.n,
        max_tokens=params.max_tokens,
        ignore_eos=params.ignore_eos,
        temperature=params.temperature,
        length_penalty=1.0 if length_penalty is None else length_penalty,
        include_stop_str_in_output=params.include_stop_str_in_output,
    )


def _parse_logit_bias(bias: Any) -> dict[int, Any] | None:
    """OpenAI's {"token id": bias} (JSON keys are strings) -> {token id: bias}; SamplingParams checks
    the ids and values."""
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, dict):
        raise RequestError(f"logit_bias must be an object of token id -> bias, got {bias!r}", "logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise RequestError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
    return out


def _parse_stream_options(options: Any, stream: bool) -> tuple[bool, bool]:
    """-> (include_usage, continuous_usage_stats). As in vLLM, the running usage on every chunk comes only
    with the final usage chunk (include_usage)."""
    if options is None or options == {}:  # (an empty object asks for nothing: vLLM accepts it without stream)
        return False, False
    if not stream:
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, got {options!r}", "stream_options")
    flags = {"include_usage": False, "continuous_usage_stats": False}
    for key, value in options.items():
        if key not in flags:
            raise RequestError(f"unsupported stream option: {key!r}", f"stream_options.{key}")
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"{key} must be a boolean, got {value!r}", f"stream_options.{key}")
        flags[key] = bool(value)
    include = flags["include_usage"]
    return include, include and flags["continuous_usage_stats"]


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _parse_prompt(prompt: Any, param: str = "prompt") -> list[str | list[int]]:
    """A string, a list of token ids, or a batch (list) of either (the body's field `param`)."""
    if isinstance(prompt, str):
        return [prompt]
    if _is_token_list(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_list(p) for p in prompt):
        return list(prompt)
    if prompt is None:
        raise RequestError(f"{param} is required", param)
    raise RequestError(
        f"{param} must be a non-empty string, a non-empty list of token ids, or a non-empty list of either",
        param,
    )


def _parse_messages(messages: Any) -> list[dict]:
    try:
        return text_messages(messages, roles=CHAT_ROLES, fields=MESSAGE_FIELDS)
    except MessageError as e:
        raise RequestError(str(e), e.param) from None
