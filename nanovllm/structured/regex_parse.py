"""Parse a regex into a small AST: the first stage of `regex_dfa.compile_regex`.

The syntax is Python's `re` with re.ASCII, read the way `re` reads it (a `{` that is no valid quantifier is a
literal, `]` first in a class is a member, `\\123` is octal, ...), cut down to what a finite automaton over
UTF-8 bytes can match: no backreferences, lookaround, inline flags, conditionals, atomic groups, possessive
quantifiers or word-boundary anchors. `^` is allowed only as the first character of the pattern and `$` only
as the last one, where full-match semantics make them no-ops. Classes may only name ASCII characters, so a
character set is "some ASCII characters, plus either every non-ASCII character or none".
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

MAX_REPEAT = 2**32 - 1  # re's bound: a larger repetition count is an OverflowError there
MAX_GROUP_DEPTH = 100  # parsing and compiling recurse once per level of nested groups
ALL_ASCII = (1 << 128) - 1


class RegexError(ValueError):
    """An unsupported or malformed pattern: the message says why and where."""

    def __init__(self, why: str, pattern: str | None = None, pos: int | None = None):
        if pattern is not None and pos is not None:
            near = repr(pattern[pos : pos + 20]) if pos < len(pattern) else "its end"
            why = f"regex position {pos} ({near}): {why}"
        super().__init__(why)
        self.pos = pos


@dataclass(frozen=True)
class Char:
    code: int  # one literal character, any code point but a surrogate


@dataclass(frozen=True)
class CharSet:
    ascii_mask: int  # bit c set: chr(c) is in the set (c < 128)
    non_ascii: bool  # every non-ASCII character is in the set too


@dataclass(frozen=True)
class Concat:
    items: tuple[Node, ...]  # () matches the empty string


@dataclass(frozen=True)
class Alternation:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    item: Node
    min_count: int
    max_count: int | None  # None: unbounded


Node = Char | CharSet | Concat | Alternation | Repeat


def _ascii_mask(chars: str) -> int:
    return sum(1 << ord(c) for c in chars)


_DIGIT = _ascii_mask("0123456789")
_WORD = _DIGIT | _ascii_mask("_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SPACE = _ascii_mask(" \t\n\r\f\v")
# \d \w \s with re.ASCII; their negations hold every non-ASCII character.
_CATEGORIES = {
    "d": CharSet(_DIGIT, False),
    "D": CharSet(ALL_ASCII & ~_DIGIT, True),
    "w": CharSet(_WORD, False),
    "W": CharSet(ALL_ASCII & ~_WORD, True),
    "s": CharSet(_SPACE, False),
    "S": CharSet(ALL_ASCII & ~_SPACE, True),
}
DOT = CharSet(ALL_ASCII & ~_ascii_mask("\n"), True)
_CONTROL_ESCAPES = {"a": 0x07, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B}
_HEX_DIGITS = "0123456789abcdefABCDEF"
_OCT_DIGITS = "01234567"
_ASCII_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# {m}, {m,}, {,n}, {m,n}, {,}; anything else after "{" (including "{}") makes the "{" a literal, as in re.
_BRACES = re.compile(r"\{([0-9]*)(?:(,)([0-9]*))?\}")
_GROUP_EXTENSIONS = {  # what "(?" + this starts, for the error message
    "=": "lookahead assertions",
    "!": "lookahead assertions",
    "<=": "lookbehind assertions",
    "<!": "lookbehind assertions",
    "P=": "backreferences",
    "(": "conditional groups",
    ">": "atomic groups",
}


def parse_regex(pattern: str) -> Node:
    parser = _Parser(pattern)
    tree = parser.alternation()
    if parser.pos < len(pattern):  # only an unmatched ")" stops the top-level alternation early
        raise parser.error("unbalanced parenthesis", parser.pos)
    return tree


class _Parser:
    def __init__(self, pattern: str):
        self.pattern = pattern
        self.pos = 0
        self.group_names: set[str] = set()
        self.depth = 0  # groups open at pos

    def error(self, why: str, pos: int) -> RegexError:
        return RegexError(why, self.pattern, pos)

    def peek(self, ahead: int = 0) -> str | None:
        i = self.pos + ahead
        return self.pattern[i] if i < len(self.pattern) else None

    def eat(self, text: str) -> bool:
        if self.pattern.startswith(text, self.pos):
            self.pos += len(text)
            return True
        return False

    def alternation(self) -> Node:
        alternatives = [self.sequence()]
        while self.eat("|"):
            alternatives.append(self.sequence())
        return alternatives[0] if len(alternatives) == 1 else Alternation(tuple(alternatives))

    def sequence(self) -> Node:
        items: list[Node] = []
        quantified = False  # the last item is a quantifier's result: another quantifier is "multiple repeat"
        while (c := self.peek()) is not None and c not in "|)":
            start = self.pos
            bounds = self.quantifier()
            if bounds is not None:
                if not items:
                    raise self.error("nothing to repeat", start)
                if quantified:
                    raise self.error("multiple repeat", start)
                items[-1] = Repeat(items[-1], *bounds)
                quantified = True
            elif (c == "^" and start == 0) or (c == "$" and start == len(self.pattern) - 1):
                self.pos += 1  # the whole string must match anyway
            elif (atom := self.atom()) is not None:
                items.append(atom)
                quantified = False
        return items[0] if len(items) == 1 else Concat(tuple(items))

    def quantifier(self) -> tuple[int, int | None] | None:
        """Reads a quantifier (and a lazy "?" after it) at pos if there is one: (min, max or None)."""
        start, c = self.pos, self.peek()
        if c in ("*", "+", "?"):
            self.pos += 1
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and (m := _BRACES.match(self.pattern, start)) and m.group() != "{}":
            self.pos = m.end()
            if max(len(m[1]), len(m[3] or "")) > len(str(MAX_REPEAT)):  # (before int() meets a huge number)
                raise self.error("the repetition number is too large", start)
            lo = int(m[1]) if m[1] else 0
            hi = (int(m[3]) if m[3] else None) if m[2] else lo
            if lo >= MAX_REPEAT or (hi is not None and hi >= MAX_REPEAT):
                raise self.error("the repetition number is too large", start)
            if hi is not None and hi < lo:
                raise self.error("min repeat greater than max repeat", start)
            bounds = (lo, hi)
        else:
            return None
        if self.peek() == "+":
            raise self.error(
                "possessive quantifiers are not supported (they do not backtrack, so they change which "
                "strings match)",
                self.pos,
            )
        self.eat("?")  # lazy: the same strings match in full
        return bounds

    def atom(self) -> Node | None:
        start = self.pos
        c = self.pattern[start]
        self.pos += 1
        if c == "(":
            return self.group(start)
        if c == "[":
            return self.char_class(start)
        if c == ".":
            return DOT
        if c == "\\":
            return self.escape(start, in_class=False)
        if c in "^$":
            where = "first" if c == "^" else "last"
            raise self.error(f"'{c}' is only supported as the {where} character of the pattern", start)
        return self.char(ord(c), start)

    def char(self, code: int, pos: int) -> Char:
        if 0xD800 <= code <= 0xDFFF:
            raise self.error(f"surrogate U+{code:04X} has no UTF-8 encoding", pos)
        return Char(code)

    def group(self, start: int) -> Node | None:
        """A group's body (captures are not kept); None for a (?#...) comment."""
        if self.eat("?"):
            if self.eat("#"):
                end = self.pattern.find(")", self.pos)
                if end < 0:
                    raise self.error("missing ), unterminated comment", start)
                self.pos = end + 1
                return None
            if self.eat("P<"):
                end = self.pattern.find(">", self.pos)
                if end < 0:
                    raise self.error("missing >, unterminated group name", start)
                name = self.pattern[self.pos : end]
                if not name.isidentifier():
                    raise self.error(f"bad group name {name!r}", self.pos)
                if name in self.group_names:
                    raise self.error(f"redefinition of group name {name!r}", self.pos)
                self.group_names.add(name)
                self.pos = end + 1
            elif not self.eat(":"):
                for prefix, what in _GROUP_EXTENSIONS.items():
                    if self.pattern.startswith(prefix, self.pos):
                        raise self.error(f"{what} are not supported", start)
                if (c := self.peek()) is not None and c in "aiLmsux-":
                    raise self.error("inline flags are not supported", start)
                raise self.error(f"unknown extension (?{c or ''}", start)
        if self.depth == MAX_GROUP_DEPTH:
            raise self.error(f"groups nested more than {MAX_GROUP_DEPTH} deep", start)
        self.depth += 1
        body = self.alternation()
        self.depth -= 1
        if not self.eat(")"):
            raise self.error("missing ), unterminated subpattern", start)
        return body

    def char_class(self, start: int) -> CharSet:
        negate = self.eat("^")
        mask, non_ascii = 0, False
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unterminated character set", start)
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            item_start = self.pos
            lo = self.class_item()
            if self.peek() == "-" and self.peek(1) not in (None, "]"):
                self.pos += 1
                hi = self.class_item()
                if not isinstance(lo, Char) or not isinstance(hi, Char) or hi.code < lo.code:
                    raise self.error(f"bad character range {self.pattern[item_start : self.pos]}", item_start)
                codes = range(lo.code, hi.code + 1)
            elif isinstance(lo, CharSet):
                mask, non_ascii = mask | lo.ascii_mask, non_ascii or lo.non_ascii
                continue
            else:
                codes = range(lo.code, lo.code + 1)
            if codes[-1] >= 128:
                raise self.error(
                    "only ASCII characters are supported in character classes (use an alternation for "
                    "non-ASCII ones)",
                    item_start,
                )
            mask |= ((1 << len(codes)) - 1) << codes[0]
        if negate:
            return CharSet(ALL_ASCII & ~mask, not non_ascii)
        return CharSet(mask, non_ascii)

    def class_item(self) -> Char | CharSet:
        start = self.pos
        self.pos += 1
        if self.pattern[start] == "\\":
            return self.escape(start, in_class=True)
        return Char(ord(self.pattern[start]))

    def escape(self, start: int, in_class: bool) -> Char | CharSet:
        """The escape whose backslash is at `start` (pos is just past the backslash)."""
        c = self.peek()
        if c is None:
            raise self.error("bad escape (end of pattern)", start)
        self.pos += 1
        if c in _CATEGORIES:
            return _CATEGORIES[c]
        if c in _CONTROL_ESCAPES:
            return Char(_CONTROL_ESCAPES[c])
        if c == "b" and in_class:
            return Char(0x08)
        if c in "xuU":
            digits = self.pattern[self.pos : self.pos + {"x": 2, "u": 4, "U": 8}[c]]
            if len(digits) < {"x": 2, "u": 4, "U": 8}[c] or any(d not in _HEX_DIGITS for d in digits):
                raise self.error(f"incomplete escape \\{c}{digits}", start)
            self.pos += len(digits)
            if int(digits, 16) > 0x10FFFF:
                raise self.error(f"bad escape \\{c}{digits}", start)
            return self.char(int(digits, 16), start)
        if c == "N":
            end = self.pattern.find("}", self.pos)
            if not self.eat("{") or end < 0:
                raise self.error("\\N must be followed by {name}", start)
            try:
                code = ord(unicodedata.lookup(self.pattern[self.pos : end]))
            except KeyError:
                raise self.error("undefined character name", start) from None
            self.pos = end + 1
            return self.char(code, start)
        if c in "0123456789":
            return self.octal_escape(start, in_class)
        if c in "bBAZ":
            raise self.error(f"the \\{c} assertion is not supported", start)
        if c in _ASCII_LETTERS:
            raise self.error(f"bad escape \\{c}", start)
        return self.char(ord(c), start)  # escaped punctuation, space or non-ASCII character: itself

    def octal_escape(self, start: int, in_class: bool) -> Char:
        """\\0, \\0o, \\0oo and \\ooo are octal; so are \\o and \\oo in a class, while outside one
        \\1-\\99 refer to a group. (pos is just past the first digit.)"""
        digits = self.pattern[start + 1]
        if digits == "0" or in_class and digits in _OCT_DIGITS:
            while len(digits) < 3 and self.peek() is not None and self.peek() in _OCT_DIGITS:
                digits += self.pattern[self.pos]
                self.pos += 1
        elif not in_class:
            if self.peek() is not None and self.peek() in "0123456789":
                digits += self.pattern[self.pos]
                self.pos += 1
                three = self.peek()
                if three is not None and three in _OCT_DIGITS and all(d in _OCT_DIGITS for d in digits):
                    digits += three
                    self.pos += 1
            if len(digits) < 3:
                raise self.error("backreferences are not supported", start)
        else:
            raise self.error(f"bad escape \\{digits}", start)
        if int(digits, 8) > 0o377:
            raise self.error(f"octal escape value \\{digits} outside of range 0-0o377", start)
        return Char(int(digits, 8))
