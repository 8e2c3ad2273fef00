"""OpenAI chat messages -> what chat templates expect, for both LLM.chat and the server's chat endpoint."""

from __future__ import annotations

from typing import Any


class MessageError(ValueError):
    """A message (or a rendering option) that cannot be rendered; `param` is the offending part's path:
    `messages[1].content[0]`, `chat_template_kwargs`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def text_messages(
    messages: Any, roles: tuple[str, ...] | None = None, fields: tuple[str, ...] | None = None
) -> list[dict]:
    """Each message as a dict with a role and its content as one string: OpenAI's lists of
    {"type": "text", "text": ...} parts are joined with newlines, as vLLM does. `roles` limits the roles
    (None: any string) and `fields` the keys a message may have (None: any, passed on to the template).
    Fields set to None are left out unchecked (a client's `message.model_dump()` of a reply carries
    `tool_calls: None`, `refusal: None`, ...). Raises MessageError naming the first bad part."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise MessageError(f"{where} must be an object", where)
        for key, value in m.items():
            if fields is not None and key not in fields and value is not None:  # (only the server limits)
                raise MessageError(f"{where}.{key} is not supported by this server", f"{where}.{key}")
        role = m.get("role")
        if roles is not None and role not in roles:
            raise MessageError(f"{where}.role must be one of {list(roles)}, got {role!r}", f"{where}.role")
        if not isinstance(role, str):
            raise MessageError(f"{where}.role must be a string, got {role!r}", f"{where}.role")
        message = {key: value for key, value in m.items() if value is not None}
        message["content"] = _content_text(m.get("content"), f"{where}.content")
        out.append(message)
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise MessageError(f"{where}[{j}]: only text parts are supported", f"{where}[{j}]")
            parts.append(part["text"])
        return "\n".join(parts)
    raise MessageError(f"{where} must be a string or a list of text parts, got {content!r}", where)


# apply_chat_template arguments that are ours to set, not template variables (a server's client may not
# swap the template itself)
_RESERVED_TEMPLATE_KWARGS = ("conversation", "chat_template", "tokenize", "return_dict", "return_tensors")


def check_chat_options(
    add_generation_prompt: bool, continue_final_message: bool, chat_template_kwargs: dict | None
) -> dict:
    """The switches with the template variables over them (vLLM's order: the kwargs win), as
    apply_chat_template's keyword arguments. MessageError (a ValueError) if a kwarg is one of its own
    arguments, or if the result both adds a generation prompt and continues the final message."""
    options = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
    for key, value in (chat_template_kwargs or {}).items():
        if not isinstance(key, str) or key in _RESERVED_TEMPLATE_KWARGS:
            raise MessageError(f"chat_template_kwargs may not set {key!r}", "chat_template_kwargs")
        options[key] = value
    if options["add_generation_prompt"] and options["continue_final_message"]:
        raise MessageError(
            "add_generation_prompt and continue_final_message cannot both be true", "continue_final_message"
        )
    return options


def render_chat(
    tokenizer,
    messages: list[dict],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict | None = None,
) -> str:
    """The conversation (text_messages' output) as the prompt text the model expects: the tokenizer's chat
    template, or `chat_template`. `chat_template_kwargs` become template variables (Qwen3's
    {"enable_thinking": False}) and, as in vLLM, win over the two switches. Raises ValueError when the
    options are contradictory or the template fails."""
    options = check_chat_options(add_generation_prompt, continue_final_message, chat_template_kwargs)
    options["chat_template"] = chat_template
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as e:  # jinja and transformers raise many kinds for what a template rejects
        raise ValueError(f"the chat template failed: {e}") from None
