"""JSON Schema (and "any JSON") to a regular expression that fullmatches exactly the JSON texts to allow.

The regex is meant for a byte DFA (regex_dfa.py), so it keeps to a small subset: literals, escapes, classes
with ASCII ranges, groups, alternation and counted repetition; no lookaround, backreferences or anchors.

How each schema maps (the text of a value is written as a serialiser writes it):
  string    "..." of JSON string characters, an escape (or an escaped surrogate pair) counting as one
            character for minLength/maxLength; `format` or `pattern` (json_pattern.py) instead gives the
            characters a regex of their own.
  integer   -?(0|[1-9][0-9]*), or an exact digit-range regex for minimum/maximum/exclusive*.
  number    JSON's number grammar (bounds are not supported: only integer bounds are).
  object    the `properties` in declared order, each optional one free to be left out.
  array     `prefixItems` then `items`, counted by minItems/maxItems.
  enum/const, anyOf/oneOf, allOf, local $ref: alternation, merging and inlining.

Decisions, all on the side of "every text matched is valid" rather than "every valid text is matched":
  - Whitespace (`whitespace`, default `[ ]?`) may stand after `{` and `[`, before `}` and `]`, and on both
    sides of `:` and `,`; nowhere else, not around the whole value. One optional space lets both compact
    and json.dumps() texts through, and leaves no room for a model to pad forever.
  - `pattern` is the whole string content (as vLLM and xgrammar treat it), not a search: a leading `^` and a
    trailing `$` are dropped. Characters JSON must escape are written as json.dumps writes them; other
    characters are never written as escapes.
  - additionalProperties absent is false, as OpenAI's strict mode requires: with `properties` (even `{}`, a
    function that takes no arguments) no other key is ever written (even when additionalProperties allows
    them); without `properties`, an object with any string keys (values per additionalProperties when it is
    a schema).
  - oneOf is anyOf: exclusivity is not enforced. allOf, and keywords beside anyOf/oneOf/$ref, are merged
    into one schema when they share no keyword (else SchemaError).
  - Free-form values (`{}`, `true`, objects without properties, arrays without items) nest containers
    at most DEFAULT_MAX_DEPTH deep counted from the document's top: a regex cannot count brackets.
  - enum/const values are filtered by `type`; other keywords beside them are not checked.
  - `-0`, `1.0` as an integer, and non-canonical escapes inside `pattern`/`format` strings are never written.
"""

from __future__ import annotations

import json
import math
from urllib.parse import unquote

from nanovllm.structured.json_pattern import alt as _alt
from nanovllm.structured.json_pattern import escape as _escape
from nanovllm.structured.json_pattern import pattern_to_regex

DEFAULT_WHITESPACE = r"[ ]?"  # between JSON tokens: a strict serialiser never pads, so neither may a model
# Free-form JSON nests at most this many objects/arrays deep. Each level holds the one below four times
# (two members of an object, two elements of an array), so the regex grows 4x per level: ~12 kB at 3,
# ~50 kB at 4. Its byte DFA sets the bound: 656 states at 3 (0.25 s to build on a small CPU), while at 4 the
# subset construction passes regex_dfa's 10,000-state limit before minimising. Three levels hold
# {"data": {"items": [...]}}; deeper free-form JSON needs a schema that spells its structure.
DEFAULT_MAX_DEPTH = 3


class SchemaError(ValueError):
    """An invalid or unsupported schema; the message starts with the JSON pointer of the keyword at fault."""


_STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_STRING = f'"{_STRING_CHAR}*"'
# One character for minLength/maxLength, which count code points: an escaped surrogate pair is one, a lone
# surrogate escape none (it is not a character).
_COUNTED_CHAR = (
    r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-Ce-fE-F][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2})'
    r"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)
_INTEGER = r"-?(?:0|[1-9][0-9]*)"
_NUMBER = _INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_SCALARS = [_STRING, _NUMBER, "true", "false", "null"]

_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
# Keywords that say nothing about which values are valid (plus $defs, which only holds $ref targets).
_IGNORED = {"title", "description", "examples", "default", "$schema", "$id", "$comment", "deprecated"}
_IGNORED |= {"readOnly", "writeOnly", "$defs", "definitions"}
_UNSUPPORTED = {"multipleOf", "patternProperties", "if", "then", "else", "not", "contains", "minContains"}
_UNSUPPORTED |= {"maxContains", "dependentRequired", "dependentSchemas", "dependencies", "propertyNames"}
_UNSUPPORTED |= {"unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef"}
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# Keywords that imply a type when `type` is absent (bounds imply integer: number bounds are unsupported).
_IMPLIED_TYPE = {
    "string": ("minLength", "maxLength", "pattern", "format"),
    "integer": _BOUNDS,
    "object": ("properties", "required", "additionalProperties", "minProperties", "maxProperties"),
    "array": ("items", "prefixItems", "additionalItems", "minItems", "maxItems"),
}

_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_HH_MM = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
_TIME = rf"{_HH_MM}:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[zZ]|[+-]{_HH_MM})"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"  # a hostname label: 1..63, no '-' at an end
_OCTET = r"(?:[0-9]|[1-9][0-9]|1[0-9]{2}|2(?:[0-4][0-9]|5[0-5]))"  # 0..255 as _int_range(0, 255) writes it
_FORMATS = {  # RFC 3339 date/time, RFC 4122 uuid; email is a common approximation (no quoted local parts)
    "date-time": f"{_DATE}[tT]{_TIME}",
    "date": _DATE,
    "time": _TIME,
    "uuid": "-".join(f"[0-9a-fA-F]{{{n}}}" for n in (8, 4, 4, 4, 12)),
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
    "hostname": rf"{_LABEL}(?:\.{_LABEL})*",
    "email": rf"[a-zA-Z0-9._%+-]+@{_LABEL}(?:\.{_LABEL})+",
    "uri": r"[a-zA-Z][a-zA-Z0-9+.-]*:[a-zA-Z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+",
}


def schema_to_regex(schema: dict | str | bool, whitespace: str | None = None) -> str:
    """A regex that fullmatches the JSON texts of the instances valid under `schema` (see the module doc)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise SchemaError(f"#: the schema is not valid JSON ({e})") from None
    return _Compiler(schema, whitespace).value(schema, "#", 0)


def json_value_regex(max_depth: int = DEFAULT_MAX_DEPTH, whitespace: str | None = None) -> str:
    """Any JSON value, with objects and arrays nested at most `max_depth` deep (0: scalars only)."""
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be an integer >= 0, got {max_depth!r}")
    return _Compiler(True, whitespace).any(max_depth)


def choice_regex(choices: list[str]) -> str:
    """Exactly one of `choices`, each taken literally."""
    if not isinstance(choices, (list, tuple)) or not choices:
        raise SchemaError(f"choice: expected a non-empty list of strings, got {choices!r}")
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise SchemaError(f"choice: every choice must be a string, got {bad[0]!r}")
    return _alt([_escape(c) for c in dict.fromkeys(choices)])


# ---- regex text helpers ----


def _quant(lo: int, hi: int | None) -> str:
    """The quantifier for lo..hi repetitions (hi None: unbounded)."""
    if hi is None:
        return {0: "*", 1: "+"}.get(lo, f"{{{lo},}}")
    if lo == hi:
        return "" if lo == 1 else f"{{{lo}}}"
    return "?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}"


def _pointer(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


# ---- integers in a range: the classic construction, digit string by digit string ----


def _digits(lo: str, hi: str) -> str:
    """Digit strings of len(lo) == len(hi) from lo to hi, lo <= hi."""
    n = len(lo)
    if lo == hi:
        return lo
    if lo == "0" * n and hi == "9" * n:
        return f"[0-9]{_quant(n, n)}"
    if lo[0] == hi[0]:
        return lo[0] + _digits(lo[1:], hi[1:])
    if n == 1:
        return f"[{lo}-{hi}]"
    parts, first, last = [], int(lo[0]), int(hi[0])
    if lo[1:] != "0" * (n - 1):  # lo's first digit with the rest from lo[1:] up
        parts.append(lo[0] + _digits(lo[1:], "9" * (n - 1)))
        first += 1
    split_last = hi[1:] != "9" * (n - 1)
    last -= split_last
    if first <= last:  # the full middle: any digits after
        middle = str(first) if first == last else f"[{first}-{last}]"
        parts.append(middle + _digits("0" * (n - 1), "9" * (n - 1)))
    if split_last:
        parts.append(hi[0] + _digits("0" * (n - 1), hi[1:]))
    return _alt(parts)


def _uint_range(lo: int, hi: int | None) -> list[str]:
    """Alternatives for the decimals (no leading zeros) from lo >= 0 to hi (None: unbounded)."""
    top = 10 ** len(str(lo)) - 1 if hi is None else hi  # unbounded: lo..99..9, then anything longer
    parts = []
    for n in range(len(str(lo)), len(str(top)) + 1):
        a, b = max(lo, 10 ** (n - 1) if n > 1 else 0), min(top, 10**n - 1)
        if a <= b:
            parts.append(_digits(str(a), str(b)))
    return parts + ([f"[1-9][0-9]{_quant(len(str(lo)), None)}"] if hi is None else [])


def _int_range(lo: int | None, hi: int | None) -> str:
    """Integers from lo to hi inclusive (None: unbounded on that side); `-0` is never written."""
    parts = []
    if lo is None or lo < 0:  # negatives, by magnitude
        mag_lo = 1 if hi is None or hi >= 0 else -hi
        parts.append("-" + _alt(_uint_range(mag_lo, None if lo is None else -lo)))
    if hi is None or hi >= 0:
        parts += _uint_range(max(lo or 0, 0), hi)
    return _alt(parts)


# ---- the compiler: one method per kind of schema ----


# Bounds on the work one schema may ask for: it is translated on the engine's thread, and inlining $refs
# that fan out (two properties pointing at the next level, ...) doubles the work a level.
MAX_SUBSCHEMAS = 4_096
MAX_NESTING = 64


class _Compiler:
    def __init__(self, root, whitespace: str | None):
        ws = DEFAULT_WHITESPACE if whitespace is None else whitespace
        self.ws = f"(?:{ws})" if "|" in ws else ws
        self.root = root
        self.active_refs: list[str] = []  # $refs being inlined, innermost last: one seen again is a cycle
        self.num_subschemas = 0  # translated so far: $refs are inlined, so a small schema can fan out

    def _wrap(self, open_: str, body: str, close: str, optional: bool) -> str:
        ws = self.ws
        if not body:
            return open_ + ws + close
        return open_ + ws + (f"(?:{body}{ws})?" if optional else body + ws) + close

    def _list(self, item: str, lo: int, hi: int | None) -> str:
        """lo..hi copies of `item`, comma separated (lo >= 1)."""
        rest = _quant(lo - 1, None if hi is None else hi - 1)
        return item + (f"(?:{self.ws},{self.ws}{item}){rest}" if rest != "{0}" else "")

    def any(self, depth_left: int) -> str:
        """Any JSON value with containers at most depth_left deep."""
        if depth_left <= 0:
            return _alt(_SCALARS)
        inner = self.any(depth_left - 1)
        member = f"{_STRING}{self.ws}:{self.ws}{inner}"
        obj = self._wrap(r"\{", self._list(member, 1, None), r"\}", True)
        arr = self._wrap(r"\[", self._list(inner, 1, None), r"\]", True)
        return _alt(_SCALARS + [obj, arr])

    def value(self, schema, path: str, depth: int) -> str:
        """The regex for `schema` at `path`, for a value inside `depth` containers."""
        self.num_subschemas += 1
        if self.num_subschemas > MAX_SUBSCHEMAS:
            raise SchemaError(
                f"{path}: the schema expands to more than {MAX_SUBSCHEMAS} subschemas once its $refs are "
                "inlined (each $ref is copied where it is used)"
            )
        if depth > MAX_NESTING or len(self.active_refs) > MAX_NESTING:
            raise SchemaError(f"{path}: nested more than {MAX_NESTING} deep (containers or $refs)")
        if schema is True:
            return self.any(DEFAULT_MAX_DEPTH - depth)
        if schema is False:
            raise SchemaError(f"{path}: the schema false admits no value")
        if not isinstance(schema, dict):
            raise SchemaError(f"{path}: a schema must be an object or a boolean, got {schema!r}")
        for key in schema:
            if key in _UNSUPPORTED:
                raise SchemaError(f"{path}/{key}: the keyword {key!r} is not supported")
        if "$ref" in schema:
            return self._ref(schema, path, depth)
        if "allOf" in schema:
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.value(self._merge(rest, schema["allOf"], f"{path}/allOf"), path, depth)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                branches = schema[key]
                if not isinstance(branches, list) or not branches:
                    raise SchemaError(f"{path}/{key}: expected a non-empty list of schemas")
                rest = {k: v for k, v in schema.items() if k != key}
                paths = [f"{path}/{key}/{i}" for i in range(len(branches))]
                merged = [(self._merge(rest, [b], p), p) for b, p in zip(branches, paths)]
                return _alt([self.value(m, p, depth) for m, p in merged])
        if schema.get("nullable") is True:
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return _alt([self.value(rest, path, depth), "null"])
        types = schema.get("type")
        if isinstance(types, str):
            types = [types]
        if types is not None and (not isinstance(types, list) or any(t not in _TYPES for t in types)):
            raise SchemaError(f"{path}/type: expected one of {', '.join(_TYPES)} or a list, got {types!r}")
        if "const" in schema or "enum" in schema:
            return self._enum(schema, types, path)
        if types is None:
            types = [t for t, keys in _IMPLIED_TYPE.items() if any(k in schema for k in keys)]
            if not types:
                return self.any(DEFAULT_MAX_DEPTH - depth)
        return _alt([self._typed(t, schema, path, depth) for t in types])

    def _merge(self, base: dict, subs, where: str) -> dict:
        """base and the schemas in subs as one schema; they must not share a value keyword."""
        if not isinstance(subs, list) or not subs:
            raise SchemaError(f"{where}: expected a non-empty list of schemas")
        merged = dict(base)
        for i, sub in enumerate(subs):
            if sub is True:
                continue
            if not isinstance(sub, dict):
                raise SchemaError(f"{where}/{i}: only object schemas can be combined, got {sub!r}")
            shared = (set(merged) & set(sub)) - _IGNORED
            if shared:
                raise SchemaError(f"{where}/{i}: {sorted(shared)} set twice; only disjoint keywords combine")
            merged.update(sub)
        return merged

    def _ref(self, schema: dict, path: str, depth: int) -> str:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{path}/$ref: only local references (#/...) are supported, got {ref!r}")
        if ref in self.active_refs:
            raise SchemaError(f"{path}/$ref: {ref!r} refers back to itself (recursion is not supported)")
        target = self.root
        for part in ref[1:].split("/")[1:]:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise SchemaError(f"{path}/$ref: {ref!r} points at nothing in the schema")
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        self.active_refs.append(ref)
        try:
            if set(rest) - _IGNORED:
                return self.value(self._merge(rest, [target], f"{path}/$ref"), path, depth)
            return self.value(target, ref, depth)
        finally:
            self.active_refs.pop()

    def _enum(self, schema: dict, types: list[str] | None, path: str) -> str:
        key = "const" if "const" in schema else "enum"
        values = [schema["const"]] if key == "const" else schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{path}/enum: expected a non-empty list, got {values!r}")
        if key == "const" and "enum" in schema and values[0] not in schema["enum"]:
            values = []
        if types is not None:
            widened = set(types) | ({"integer"} if "number" in types else set())
            values = [v for v in values if _json_type(v) in widened]
        if not values:
            raise SchemaError(f"{path}/{key}: no listed value has the declared type {types}")
        return _alt([self._literal(v, f"{path}/{key}") for v in values])

    def _literal(self, value, where: str) -> str:
        """One JSON value, exactly, with whitespace allowed between its tokens."""
        ws = self.ws
        if isinstance(value, dict):
            members = [f"{_escape(json.dumps(k, ensure_ascii=False))}{ws}:{ws}{self._literal(v, where)}"
                       for k, v in value.items()]  # fmt: skip
            return self._wrap(r"\{", f"{ws},{ws}".join(members), r"\}", not members)
        if isinstance(value, list):
            items = [self._literal(v, where) for v in value]
            return self._wrap(r"\[", f"{ws},{ws}".join(items), r"\]", not items)
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaError(f"{where}: {value} is not a JSON value")
        if value is None or isinstance(value, (str, bool, int, float)):
            return _escape(json.dumps(value, ensure_ascii=False))
        raise SchemaError(f"{where}: {value!r} is not a JSON value")

    def _typed(self, type_: str, schema: dict, path: str, depth: int) -> str:
        if type_ == "string":
            return self._string(schema, path)
        if type_ == "integer":
            return self._integer(schema, path)
        if type_ == "number":
            for key in _BOUNDS:
                if key in schema:
                    raise SchemaError(f"{path}/{key}: bounds are only supported for type integer, not number")
            return _NUMBER
        if type_ == "object":
            return self._object(schema, path, depth)
        if type_ == "array":
            return self._array(schema, path, depth)
        return "(?:true|false)" if type_ == "boolean" else "null"

    def _string(self, schema: dict, path: str) -> str:
        lo, hi = _count(schema, "minLength", path, 0), _count(schema, "maxLength", path, None)
        shaped = [k for k in ("format", "pattern") if k in schema]
        if shaped and (len(shaped) == 2 or "minLength" in schema or "maxLength" in schema):
            raise SchemaError(f"{path}/{shaped[-1]}: cannot be combined with format, minLength or maxLength")
        if "format" in schema:
            if schema["format"] not in _FORMATS:
                raise SchemaError(f"{path}/format: {schema['format']!r} is not one of {', '.join(_FORMATS)}")
            return f'"{_FORMATS[schema["format"]]}"'
        if "pattern" in schema:
            try:
                return f'"{pattern_to_regex(schema["pattern"])}"'
            except ValueError as e:
                raise SchemaError(f"{path}/pattern: {e}") from None
        if hi is not None and hi < lo:
            raise SchemaError(f"{path}/maxLength: {hi} is below minLength {lo}")
        if (lo, hi) == (0, None):
            return _STRING
        return '"' + (_COUNTED_CHAR + _quant(lo, hi) if hi != 0 else "") + '"'

    def _integer(self, schema: dict, path: str) -> str:
        bounds = {}
        for key in _BOUNDS:
            v = schema.get(key)
            if v is not None and not (isinstance(v, bool) and key.startswith("exclusive")):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise SchemaError(f"{path}/{key}: expected a number, got {v!r}")
                bounds[key] = v
        lo = math.ceil(bounds["minimum"]) if "minimum" in bounds else None
        hi = math.floor(bounds["maximum"]) if "maximum" in bounds else None
        # exclusive bounds: a number (draft 6 on) or, beside minimum/maximum, true (draft 4)
        if schema.get("exclusiveMinimum") is True and lo is not None:
            lo = math.floor(bounds["minimum"]) + 1
        if "exclusiveMinimum" in bounds:
            lo = max(math.floor(bounds["exclusiveMinimum"]) + 1, -math.inf if lo is None else lo)
        if schema.get("exclusiveMaximum") is True and hi is not None:
            hi = math.ceil(bounds["maximum"]) - 1
        if "exclusiveMaximum" in bounds:
            hi = min(math.ceil(bounds["exclusiveMaximum"]) - 1, math.inf if hi is None else hi)
        if lo is None and hi is None:
            return _INTEGER
        if lo is not None and hi is not None and lo > hi:
            raise SchemaError(f"{path}/maximum: no integer lies within the bounds {bounds}")
        return _int_range(lo, hi)

    def _object(self, schema: dict, path: str, depth: int) -> str:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", False if "properties" in schema else None)
        if not isinstance(props, dict):
            raise SchemaError(f"{path}/properties: expected an object, got {props!r}")
        if not isinstance(required, list) or any(k not in props for k in required):
            raise SchemaError(f"{path}/required: every required key must be one of the properties")
        num_keys = (len(required), len(props)) if props or extra is False else (0, None)
        min_props = _count(schema, "minProperties", path, 0)
        max_props = _count(schema, "maxProperties", path, None)
        if min_props > num_keys[0]:
            raise SchemaError(f"{path}/minProperties: only a count that every instance meets is supported")
        if max_props is not None and (num_keys[1] is None or max_props < num_keys[1]):
            raise SchemaError(f"{path}/maxProperties: only a count that every instance meets is supported")
        ws = self.ws
        if not props:  # free keys: values per additionalProperties, or any value
            if extra is False:
                return self._wrap(r"\{", "", r"\}", False)
            values = self.value(True if extra is None else extra, f"{path}/additionalProperties", depth + 1)
            return self._wrap(r"\{", self._list(f"{_STRING}{ws}:{ws}{values}", 1, None), r"\}", True)
        members = [
            (f"{_escape(json.dumps(k, ensure_ascii=False))}{ws}:{ws}"
             + self.value(s, f"{path}/properties/{_pointer(k)}", depth + 1), k in required)
            for k, s in props.items()
        ]  # fmt: skip
        # tails[i]: members i.. each after a comma, the optional ones in (...)?. A body is then its first
        # member and that member's tail, for each member that can come first (one before it is required).
        tails = [""] * (len(members) + 1)
        for i in reversed(range(len(members))):
            member, req = members[i]
            tails[i] = (f"{ws},{ws}{member}" if req else f"(?:{ws},{ws}{member})?") + tails[i + 1]
        firsts = []
        for i, (member, req) in enumerate(members):
            firsts.append(member + tails[i + 1])
            if req:
                break
        return self._wrap(r"\{", _alt(firsts), r"\}", not required)

    def _array(self, schema: dict, path: str, depth: int) -> str:
        prefix, items, items_key = schema.get("prefixItems", []), schema.get("items"), "items"
        if isinstance(items, list):  # drafts 4-7: items as a list is the tuple form
            prefix, items, items_key = items, schema.get("additionalItems"), "additionalItems"
        if schema.get("uniqueItems", False) is not False:
            raise SchemaError(f"{path}/uniqueItems: uniqueItems true is not supported")
        if not isinstance(prefix, list):
            raise SchemaError(f"{path}/prefixItems: expected a list of schemas, got {prefix!r}")
        lo, hi = _count(schema, "minItems", path, 0), _count(schema, "maxItems", path, None)
        prefix = [self.value(s, f"{path}/prefixItems/{i}", depth + 1) for i, s in enumerate(prefix[:hi])]
        items = True if items is None else items
        rest = None if items is False else self.value(items, f"{path}/{items_key}", depth + 1)
        num_rest = (max(lo - len(prefix), 0), None if hi is None else hi - len(prefix))
        if rest is None:
            num_rest = (num_rest[0], 0)
        if num_rest[1] is not None and num_rest[0] > num_rest[1]:
            raise SchemaError(f"{path}/minItems: {lo} items do not fit maxItems, or prefixItems and no items")
        if not prefix:
            if num_rest[1] == 0:
                return self._wrap(r"\[", "", r"\]", False)
            return self._wrap(r"\[", self._list(rest, max(lo, 1), hi), r"\]", lo == 0)
        ws = self.ws
        body = "" if num_rest[1] == 0 else f"(?:{ws},{ws}{rest}){_quant(*num_rest)}"
        for i in reversed(range(len(prefix))):  # element i may be where the array ends when i >= minItems
            body = (f"{ws},{ws}" if i else "") + prefix[i] + body
            if 0 < i and i >= lo:
                body = f"(?:{body})?"
        return self._wrap(r"\[", body, r"\]", lo == 0)


def _count(schema: dict, key: str, path: str, default: int | None) -> int | None:
    if key not in schema:
        return default
    v = schema[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SchemaError(f"{path}/{key}: expected an integer >= 0, got {v!r}")
    return v


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "?")
