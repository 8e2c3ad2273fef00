"""Regex text for JSON strings: escaping, and a schema's `pattern` rewritten over a string's JSON text.

A `pattern` speaks of the decoded string; the model writes its JSON text, where `"`, `\\` and control
characters appear only as escapes. pattern_to_regex rewrites each literal and character set accordingly:
safe characters stay as they are, and each character JSON must escape is written as its escape (json.dumps'
form; a control character also as any \\u00XX). Other characters are never written as escapes, so
`"\\u0041"` does not match the pattern `A` though its content does: the regex allows fewer texts, never
invalid ones. The whole content must match (as vLLM and xgrammar read `pattern`), so a leading `^` and a
trailing `$` are dropped. `.` is any character but a newline (Python's reading).

The output keeps to regex_dfa's subset: no lookaround, backreferences, anchors or non-ASCII class ranges;
a pattern that needs them raises ValueError.
"""

from __future__ import annotations

import json
import re

_SPECIAL = set(".^$*+?{}[]\\|()")


def escape(text: str) -> str:
    """`text` as a regex matching just it (control characters as \\xHH; non-ASCII as itself)."""
    out = []
    for c in text:
        if c in _SPECIAL:
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def alt(parts: list[str]) -> str:
    parts = list(dict.fromkeys(parts))
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


_UNSAFE = '"\\' + "".join(map(chr, range(0x20)))  # characters a JSON string must escape
_CONTROL_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
_QUANTIFIER = re.compile(r"\{\d+(?:,\d*)?\}|\{,(\d+)\}")


def _json_escapes(chars: list[str]) -> list[str]:
    """Regexes for the JSON escapes of `chars` (a control character: its short form or any \\u00XX)."""
    alts = [escape(json.dumps(c)[1:-1]) for c in chars if c in '"\\']
    controls = [ord(c) for c in chars if ord(c) < 0x20]
    short = "".join(k for k, c in zip("bfnrt", "\b\f\n\r\t") if ord(c) in controls)
    if short:
        alts.append("\\\\" + (f"[{short}]" if len(short) > 1 else short))
    hex_parts = []
    for high in (0, 1):
        lows = [c & 15 for c in controls if c >> 4 == high]
        if len(lows) == 16:
            hex_parts.append(f"{high}[0-9a-fA-F]")
        elif lows:
            hex_parts.append(f"{high}[{''.join(f'{n:x}{n:X}' if n > 9 else str(n) for n in lows)}]")
    if hex_parts:
        alts.append("\\\\u00" + ("[01][0-9a-fA-F]" if len(controls) == 32 else alt(hex_parts)))
    return alts


def _literal_char(c: str) -> str:
    # an escape is grouped: a quantifier may follow it
    return f"(?:{escape(json.dumps(c)[1:-1])})" if c in _UNSAFE else escape(c)


def _class_char(c: str) -> str:
    return "\\" + c if c in "\\]^-[" else f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def _pattern_escape(p: str, i: int, in_class: bool) -> tuple[tuple, int]:
    """The escape at p[i] == '\\': (("char", c) or ("class", letter)), index after it."""
    c = p[i + 1]
    if c in "dwsDWS":
        return ("class", c), i + 2
    if c in "xu":
        n = 2 if c == "x" else 4
        return ("char", chr(int(p[i + 2 : i + 2 + n], 16))), i + 2 + n
    if c in _CONTROL_ESCAPES and not (c == "0" and p[i + 2 : i + 3].isdigit()):
        return ("char", _CONTROL_ESCAPES[c]), i + 2
    if c == "b" and in_class:
        return ("char", "\b"), i + 2
    if c.isalnum():
        raise ValueError(f"the escape \\{c} (a backreference, anchor or boundary) is not supported")
    return ("char", c), i + 2


def _class_items(p: str, i: int) -> tuple[list[tuple], bool, int]:
    """Parse the class at p[i] == '[': its items ("char", c) / ("range", a, b) / ("class", letter),
    whether it is negated, and the index after it."""
    i += 1
    negated = p.startswith("^", i)
    i += negated
    items: list[tuple] = []
    while p[i] != "]" or not items:
        item, i = _pattern_escape(p, i, True) if p[i] == "\\" else (("char", p[i]), i + 1)
        if item[0] == "char" and p.startswith("-", i) and p[i + 1] != "]":
            hi, i = _pattern_escape(p, i + 1, True) if p[i + 1] == "\\" else (("char", p[i + 1]), i + 2)
            if hi[0] != "char" or max(ord(item[1]), ord(hi[1])) > 0x7F:
                raise ValueError("class ranges must run between ASCII characters")
            item = ("range", item[1], hi[1])
        items.append(item)
    return items, negated, i + 1


def _char_set(items: list[tuple], negated: bool) -> str:
    """A set of decoded characters as a regex over their JSON text."""
    body = "".join(
        f"{_class_char(it[1])}-{_class_char(it[2])}" if it[0] == "range" else
        "\\" + it[1] if it[0] == "class" else _class_char(it[1]) for it in items
    )  # fmt: skip
    probe = re.compile(f"[{'^' * negated}{body}]", re.ASCII)
    unsafe = [c for c in _UNSAFE if probe.fullmatch(c)]
    if negated:  # keep it negated, with the unsafe characters excluded too
        return alt([f'[^{body}"\\\\\\x00-\\x1f]'] + _json_escapes(unsafe))
    if not unsafe:
        return f"[{body}]"
    # A positive set holding unsafe characters: rebuild it from its safe members, in runs.
    members = [c for c in range(0x20, 0x80) if chr(c) not in _UNSAFE and probe.fullmatch(chr(c))]
    runs: list[list[int]] = []
    for c in members:
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    safe = "".join(_class_char(chr(a)) + (f"-{_class_char(chr(b))}" if b > a else "") for a, b in runs)
    safe += "".join(it[1] for it in items if it[0] == "char" and ord(it[1]) > 0x7F)
    alts = ([f"[{safe}]"] if safe else []) + _json_escapes(unsafe)
    if any(it[0] == "class" and it[1].isupper() for it in items):  # \D \W \S hold all non-ASCII
        alts.append(r"[^\x00-\x7f]")
    return alt(alts)


def pattern_to_regex(pattern: str) -> str:
    """`pattern` (matched against the whole decoded content) as a regex over the string's JSON text."""
    if not isinstance(pattern, str):
        raise ValueError(f"expected a string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"not a valid regex ({e})") from None
    p = pattern[pattern.startswith("^") :]
    if p.endswith("$") and not p.endswith("\\$"):
        p = p[:-1]
    out, i = [], 0
    while i < len(p):
        c = p[i]
        if c == "[":
            items, negated, i = _class_items(p, i)
            out.append(_char_set(items, negated))
            continue
        if c == "\\":
            item, i = _pattern_escape(p, i, False)
            out.append(_literal_char(item[1]) if item[0] == "char" else _char_set([item], False))
            continue
        if c == "(" and p.startswith("(?", i):
            if not p.startswith("(?:", i):
                raise ValueError(f"only (...) and (?:...) groups are supported, not {p[i : i + 3]}...")
            out.append("(?:")
            i += 3
            continue
        m = _QUANTIFIER.match(p, i) if c == "{" else None
        if m:  # {m} {m,} {m,n} as they are; {,n} is {0,n}
            out.append(f"{{0,{m[1]}}}" if m[1] else m[0])
            i = m.end()
            continue
        if c in "^$":
            raise ValueError("anchors are only supported at the pattern's ends")
        if c == ".":
            out.append(_char_set([("char", "\n")], True))
        else:
            out.append(c if c in "()|*+?" else _literal_char(c))
        i += 1
    return "(?:" + "".join(out) + ")"
