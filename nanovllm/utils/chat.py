"""OpenAI chat messages -> what chat templates expect, for both LLM.chat and the server's chat endpoint."""

from __future__ import annotations

from typing import Any


class MessageError(ValueError):
    """A message that cannot be rendered; `param` is the offending part's path: `messages[1].content[0]`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def text_messages(
    messages: Any, roles: tuple[str, ...] | None = None, fields: tuple[str, ...] | None = None
) -> list[dict]:
    """Each message as a dict with a role and its content as one string: OpenAI's lists of
    {"type": "text", "text": ...} parts are joined, as vLLM does. `roles` limits the roles (None: any
    string) and `fields` the keys a message may have (None: any, passed on to the template). Fields set
    to None are left out. Raises MessageError naming the first bad part."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise MessageError(f"{where} must be an object", where)
        for key in m:
            if fields is not None and key not in fields:  # (only the server limits them)
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
        return "".join(parts)
    raise MessageError(f"{where} must be a string or a list of text parts, got {content!r}", where)
