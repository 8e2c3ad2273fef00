"""JSON Schema -> regex, checked with Python's `re` (which reads the DFA subset the same way) and `json`:
valid instances match in compact and json.dumps() spacing, invalid ones don't; integer ranges exhaustively;
`pattern` against its own meaning; unsupported keywords name their path; every regex stays in the subset."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.structured.json_pattern import pattern_to_regex
from nanovllm.structured.json_schema import (
    DEFAULT_MAX_DEPTH,
    SchemaError,
    choice_regex,
    json_value_regex,
    schema_to_regex,
)


def matches(rx: str, text: str) -> bool:
    return re.fullmatch(rx, text, flags=re.ASCII) is not None


def texts(value) -> list[str]:
    """The ways a serialiser writes `value` that the default whitespace must allow."""
    return [
        json.dumps(value, separators=(",", ":"), ensure_ascii=False),
        json.dumps(value, ensure_ascii=False),
        json.dumps(value),
    ]


def assert_in_dfa_subset(rx: str) -> None:
    """No lookaround, backreferences, anchors or boundaries, no non-ASCII class ranges, no flags."""
    i, in_class = 0, False
    while i < len(rx):
        c = rx[i]
        if c == "\\":
            e = rx[i + 1]
            assert not (e.isdigit() and e != "0"), f"backreference at {i}: {rx[i - 20 : i + 20]!r}"
            assert in_class or e not in "bBAZzG", f"anchor/boundary \\{e} at {i}"
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
            elif c == "-" and rx[i - 1] != "[" and rx[i + 1] != "]":
                assert ord(rx[i - 1]) < 0x80 and ord(rx[i + 1]) < 0x80, f"non-ASCII range at {i}"
        elif c == "[":
            in_class = True
            i += 1 + rx.startswith("^", i + 1)  # a leading ] would be literal: we never write one
        elif c == "(" and rx.startswith("(?", i):
            assert rx.startswith("(?:", i), f"group {rx[i : i + 4]!r} at {i}"
        else:
            assert c not in "^$", f"anchor {c} at {i}"
        i += 1
    assert not in_class
    re.compile(rx)


# ---- a dozen realistic schemas: (schema, valid instances, invalid instances) ----

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20, "description": "full name"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "phone": {"type": "string", "pattern": r"^\+?[0-9]{7,15}$"},
        "nickname": {"type": ["string", "null"]},
    },
    "required": ["name", "age"],
    "title": "Person",
}
ORDER = {
    "$defs": {
        "item": {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "pattern": "[A-Z]{3}-[0-9]{4}"},
                "qty": {"type": "integer", "minimum": 1},
                "price": {"type": "number"},
            },
            "required": ["sku", "qty", "price"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
    },
    "required": ["id", "items", "status", "note"],
}
ENUMS = {
    "type": "object",
    "properties": {"kind": {"const": "event"}, "level": {"enum": [1, "two", None, True, {"a": [1, 2]}, []]}},
    "required": ["kind", "level"],
}
ANY_OF = {
    "anyOf": [
        {"type": "integer"},
        {"type": "string", "maxLength": 3},
        {"type": "array", "items": {"type": "boolean"}},
    ]
}
REFS = {
    "definitions": {
        "point": {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
        }
    },
    "type": "object",
    "properties": {
        "a": {"$ref": "#/definitions/point"},
        "path": {"type": "array", "items": {"$ref": "#/definitions/point"}},
    },
    "required": ["a"],
}
RANGES = {
    "type": "object",
    "properties": {
        "byte": {"type": "integer", "minimum": 0, "maximum": 255},
        "temp": {"type": "integer", "minimum": -40, "exclusiveMaximum": 50},
        "pos": {"type": "integer", "exclusiveMinimum": 0},
        "neg": {"type": "integer", "maximum": -1},
    },
    "required": ["byte", "temp", "pos", "neg"],
}
TUPLE = {
    "type": "array",
    "prefixItems": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}],
    "items": False,
    "minItems": 2,
}
FORMATS = {
    "type": "object",
    "properties": {
        f: {"type": "string", "format": f} for f in ("date", "date-time", "time", "uuid", "ipv4", "hostname")
    },
    "required": ["date", "date-time", "time", "uuid", "ipv4", "hostname"],
}
LENGTHS = {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 4}, "maxItems": 2}
SLUG = {"type": "string", "pattern": "^[a-z]+(-[a-z]+)*$"}
ALL_OPTIONAL = {"type": "object", "properties": {k: {"type": "integer"} for k in "abcd"}}
FREE = {
    "type": "object",
    "properties": {
        "meta": {"type": "object"},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
    "required": ["meta", "counts"],
    "additionalProperties": False,
}
MERGED = {
    "allOf": [{"$ref": "#/$defs/base"}],
    "$defs": {"base": {"type": "integer", "minimum": 3}},
    "maximum": 5,
}

CASES = [
    (
        PERSON,
        [
            {"name": "Ada", "age": 36},
            {"name": 'Zoë "Z" \\ \n', "age": 0, "email": "ada@math.example.org"},
            {"name": "B", "age": 150, "phone": "+441234567", "nickname": None},
            {"name": "C", "age": 7, "nickname": "c"},
        ],
        [
            {"name": "Ada"},
            {"name": "", "age": 3},
            {"name": "x" * 21, "age": 3},
            {"name": "A", "age": 151},
            {"name": "A", "age": -1},
            {"name": "A", "age": "3"},
            {"age": 3, "name": "A"},
            {"name": "A", "age": 3, "x": 1},
            {"name": "A", "age": 3, "email": "no-at-sign"},
            {"name": "A", "age": 3, "phone": "12ab567"},
            {"name": "A", "age": 3.5},
        ],
    ),
    (
        ORDER,
        [
            {
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "items": [{"sku": "ABC-1234", "qty": 2, "price": 9.5}],
                "status": "shipped",
                "note": None,
            },
            {
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "items": [{"sku": "XYZ-0001", "qty": 1, "price": 1e3}] * 3,
                "status": "pending",
                "note": "fragile",
            },
        ],
        [
            {"id": "123e4567-e89b-12d3-a456-426614174000", "items": [], "status": "shipped", "note": None},
            {
                "id": "123e4567-e89b-12d3-a456-42661417400",
                "items": [{"sku": "ABC-1234", "qty": 2, "price": 1}],
                "status": "shipped",
                "note": None,
            },
            {
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "items": [{"sku": "ABC-1234", "qty": 0, "price": 1}],
                "status": "shipped",
                "note": None,
            },
            {
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "items": [{"sku": "ABC-1234", "qty": 1, "price": 1}],
                "status": "lost",
                "note": None,
            },
            {
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "items": [{"sku": "ABC-1234", "qty": 1, "price": 1}] * 4,
                "status": "shipped",
                "note": None,
            },
            {
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "items": [{"sku": "ABC-1234", "qty": 1, "price": 1}],
                "status": "shipped",
                "note": "far too long a note",
            },
        ],
    ),
    (
        ENUMS,
        [{"kind": "event", "level": v} for v in (1, "two", None, True, {"a": [1, 2]}, [])],
        [
            {"kind": "Event", "level": 1},
            {"kind": "event", "level": 2},
            {"kind": "event", "level": False},
            {"kind": "event", "level": {"a": [1]}},
            {"kind": "event", "level": "Two"},
        ],
    ),
    (ANY_OF, [0, -17, "", "abc", [], [True, False]], ["abcd", 1.5, None, [1], {}]),
    (
        REFS,
        [
            {"a": {"x": 1, "y": -2.5}},
            {"a": {"x": 0, "y": 0}, "path": [{"x": 1, "y": 2}, {"x": 3e-2, "y": 4}]},
        ],
        [{"a": {"x": 1}}, {"path": []}, {"a": {"y": 1, "x": 2}}, {"a": {"x": 1, "y": 2}, "path": [{"x": 1}]}],
    ),
    (
        RANGES,
        [
            {"byte": 0, "temp": -40, "pos": 1, "neg": -1},
            {"byte": 255, "temp": 49, "pos": 10**12, "neg": -(10**12)},
            {"byte": 100, "temp": 0, "pos": 99, "neg": -100},
        ],
        [
            {"byte": 256, "temp": 0, "pos": 1, "neg": -1},
            {"byte": -1, "temp": 0, "pos": 1, "neg": -1},
            {"byte": 1, "temp": 50, "pos": 1, "neg": -1},
            {"byte": 1, "temp": -41, "pos": 1, "neg": -1},
            {"byte": 1, "temp": 0, "pos": 0, "neg": -1},
            {"byte": 1, "temp": 0, "pos": 1, "neg": 0},
        ],
    ),
    (
        TUPLE,
        [["a", 1], ["a", 1, True], ["", -5, False]],
        [["a"], [], ["a", 1, True, 1], [1, "a"], ["a", 1, 1]],
    ),
    (
        FORMATS,
        [
            {
                "date": "2024-02-29",
                "date-time": "2024-02-29T23:59:60.5+05:30",
                "time": "00:00:00Z",
                "uuid": "123E4567-e89b-12d3-a456-426614174000",
                "ipv4": "192.168.0.255",
                "hostname": "a-b.example.com",
            }
        ],
        [
            {
                "date": "2024-13-01",
                "date-time": "2024-02-29T23:59:00Z",
                "time": "00:00:00Z",
                "uuid": "123e4567-e89b-12d3-a456-426614174000",
                "ipv4": "1.2.3.4",
                "hostname": "h",
            },
            {
                "date": "2024-01-01",
                "date-time": "2024-02-29 23:59:00Z",
                "time": "00:00:00Z",
                "uuid": "123e4567-e89b-12d3-a456-426614174000",
                "ipv4": "1.2.3.4",
                "hostname": "h",
            },
            {
                "date": "2024-01-01",
                "date-time": "2024-02-29T23:59:00Z",
                "time": "24:00:00Z",
                "uuid": "123e4567-e89b-12d3-a456-426614174000",
                "ipv4": "1.2.3.4",
                "hostname": "h",
            },
            {
                "date": "2024-01-01",
                "date-time": "2024-02-29T23:59:00Z",
                "time": "00:00:00Z",
                "uuid": "123e4567-e89b-12d3-a456-426614174000",
                "ipv4": "1.2.3.256",
                "hostname": "h",
            },
            {
                "date": "2024-01-01",
                "date-time": "2024-02-29T23:59:00Z",
                "time": "00:00:00Z",
                "uuid": "123e4567-e89b-12d3-a456-426614174000",
                "ipv4": "01.2.3.4",
                "hostname": "h",
            },
            {
                "date": "2024-01-01",
                "date-time": "2024-02-29T23:59:00Z",
                "time": "00:00:00Z",
                "uuid": "123e4567-e89b-12d3-a456-426614174000",
                "ipv4": "1.2.3.4",
                "hostname": "-h",
            },
        ],
    ),
    (LENGTHS, [[], ["ab"], ["abcd", "\n\t"], ["日本語"]], [["a"], ["abcde"], ["ab", "ab", "ab"], [1]]),
    (SLUG, ["a", "hello-world", "a-b-c"], ["", "-a", "a-", "A", "a--b", "a b"]),
    (
        ALL_OPTIONAL,
        [{}, {"a": 1}, {"d": 4}, {"b": 2, "c": 3}, {"a": 1, "b": 2, "c": 3, "d": 4}, {"a": 1, "d": 4}],
        [{"b": 1, "a": 2}, {"e": 1}, {"a": "1"}, [], None],
    ),
    (
        FREE,
        [
            {"meta": {}, "counts": {}},
            {"meta": {"x": [1, "y", None], "z": "w"}, "counts": {"a": 1, "b": -2}},
        ],
        [{"meta": [], "counts": {}}, {"meta": {}, "counts": {"a": 1.5}}, {"meta": {}, "counts": {}, "x": 1}],
    ),
    (MERGED, [3, 4, 5], [2, 6, "4"]),
    # `properties: {}` (a tool that takes no arguments) is the empty object; without it, any keys
    ({"type": "object", "properties": {}}, [{}], [{"a": 1}]),
    ({"type": "object"}, [{}, {"a": 1}], [[]]),
    (True, [None, 1, "x", [1, [2, {"a": 3}]], {"a": {"b": {"c": 1}}}], []),
]


@pytest.mark.parametrize("schema,valid,invalid", CASES, ids=[str(i) for i in range(len(CASES))])
def test_realistic_schemas(schema, valid, invalid):
    rx = schema_to_regex(schema)
    assert_in_dfa_subset(rx)
    for value in valid:
        for text in texts(value):
            assert matches(rx, text), text
    for value in invalid:
        for text in texts(value):
            assert not matches(rx, text), text


def test_schema_as_json_text_and_whitespace_choice():
    text = '{"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array"}}}'
    rx = schema_to_regex(text)
    assert matches(rx, '{"a": 1, "b": [1, 2]}') and matches(rx, '{"a":1,"b":[1,2]}')
    assert not matches(rx, '{"a":  1}') and not matches(rx, ' {"a":1}') and not matches(rx, '{"a":1}\n')
    compact = schema_to_regex(text, whitespace="")
    assert matches(compact, '{"a":1,"b":[1,2]}') and not matches(compact, '{"a": 1}')
    pretty = schema_to_regex(text, whitespace=r"[ \n]*")
    assert matches(pretty, json.dumps({"a": 1, "b": [1, [2]]}, indent=2))
    with pytest.raises(SchemaError, match="not valid JSON"):
        schema_to_regex("{'type': 1}")


def test_choice_regex():
    rx = choice_regex(["yes", "no", "a.b*", "(x|y)", "naïve", "tab\there", "[1-2]"])
    assert_in_dfa_subset(rx)
    for c in ["yes", "no", "a.b*", "(x|y)", "naïve", "tab\there", "[1-2]"]:
        assert matches(rx, c)
    for c in ["ye", "yesno", "aXb*", "x", "1", "naive"]:
        assert not matches(rx, c)
    for bad in ([], ["a", 1], "abc"):
        with pytest.raises(SchemaError, match="choice"):
            choice_regex(bad)


def test_json_value_depth_and_length():
    lengths = [len(json_value_regex(d)) for d in range(5)]
    assert lengths[DEFAULT_MAX_DEPTH] < 65_000 and all(b < 4.5 * a for a, b in zip(lengths[1:], lengths[2:]))
    rx = json_value_regex(2)
    assert_in_dfa_subset(rx)
    for value in [1, -0.5e-3, "s", None, [], {}, [[1]], {"a": {"b": 1}}, [{"a": 1, "b": "c"}]]:
        for text in texts(value):
            assert matches(rx, text)
    for text in ["[[[1]]]", '{"a": {"b": []}}', '[{"a": []}]', "[1,]", "{1: 2}", "01", "'a'", "[1 2]", "nul"]:
        assert not matches(rx, text)
    assert matches(json_value_regex(0), "3") and not matches(json_value_regex(0), "[]")


def test_regex_sizes_stay_polynomial():
    sizes = {
        name: len(schema_to_regex(s))
        for name, s in [("person", PERSON), ("order", ORDER), ("formats", FORMATS)]
    }
    assert sizes["person"] < 2_000 and sizes["order"] < 2_000 and sizes["formats"] < 2_000, sizes

    def optional_object(n):
        return {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(n)}}

    small, large = len(schema_to_regex(optional_object(10))), len(schema_to_regex(optional_object(40)))
    assert large < 20 * small  # quadratic at worst (4x the keys: 16x), never 2**n

    def first_required(n):
        return {**optional_object(n), "required": ["k0"]}

    assert len(schema_to_regex(first_required(40))) < 4.5 * len(schema_to_regex(first_required(10)))  # linear


# ---- integer ranges: exhaustive over a window ----

VALUES = list(range(-300, 301)) + [-100000, -1234, -1000, -999, -512, 512, 999, 1000, 1234, 100000]
VALUES_TEXT = "\n".join(map(str, VALUES)) + "\n-0\n007\n+5\n1.0"


def matched_integers(rx: str) -> set[int]:
    return {int(t) for t in re.findall(f"(?m)^(?:{rx})$", VALUES_TEXT, flags=re.ASCII)}


def test_integer_ranges_exhaustive():
    # Every lower bound in -120..120 against every third upper bound (all: 3x the time, no new shapes).
    for lo in range(-120, 121):
        for hi in range(lo, 121, 3):
            rx = schema_to_regex({"type": "integer", "minimum": lo, "maximum": hi})
            assert matched_integers(rx) == {v for v in VALUES if lo <= v <= hi}, (lo, hi, rx)
            if (lo + hi) % 5 == 0:  # exclusive bounds, either draft's: the same regex, not just the same set
                exclusive = {"exclusiveMinimum": lo - 1, "exclusiveMaximum": hi + 1}
                assert rx == schema_to_regex({"type": "integer", **exclusive})
                draft4 = {
                    "minimum": lo - 1,
                    "maximum": hi + 1,
                    "exclusiveMinimum": True,
                    "exclusiveMaximum": True,
                }
                assert rx == schema_to_regex({"type": "integer", **draft4})


def test_integer_one_sided_and_fractional_bounds():
    for bound in range(-120, 121):
        assert matched_integers(schema_to_regex({"type": "integer", "minimum": bound})) == {
            v for v in VALUES if v >= bound
        }
        assert matched_integers(schema_to_regex({"type": "integer", "maximum": bound})) == {
            v for v in VALUES if v <= bound
        }
    assert matched_integers(schema_to_regex({"minimum": 2.5, "exclusiveMaximum": 7.5})) == {3, 4, 5, 6, 7}
    assert matched_integers(schema_to_regex({"type": "integer", "exclusiveMinimum": -0.5})) == {
        v for v in VALUES if v >= 0
    }
    assert len(schema_to_regex({"type": "integer", "minimum": 0, "maximum": 255})) < 60


@settings(max_examples=150, deadline=None)
@given(
    st.integers(-(10**15), 10**15),
    st.integers(0, 10**15),
    st.lists(st.integers(-(10**16), 10**16), max_size=30),
)
def test_integer_ranges_large(lo, width, probes):
    hi = lo + width
    rx = re.compile(schema_to_regex({"type": "integer", "minimum": lo, "maximum": hi}), flags=re.ASCII)
    for v in probes + [
        lo - 1,
        lo,
        lo + 1,
        hi - 1,
        hi,
        hi + 1,
        0,
        -1,
        10 ** len(str(abs(hi))),
        -(10 ** len(str(abs(lo)))),
    ]:
        assert (rx.fullmatch(str(v)) is not None) == (lo <= v <= hi), (lo, hi, v)


# ---- random instances of a few schemas match compactly ----

short_text = st.text(max_size=12)
json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | short_text
)


def in_declared_order(schema):
    keys = list(schema["properties"])
    return lambda d: {k: d[k] for k in keys if k in d}


PERSON_INSTANCES = st.fixed_dictionaries(
    {"name": st.text(min_size=1, max_size=20), "age": st.integers(0, 150)},
    optional={
        "email": st.from_regex(r"[a-z0-9._%+-]{1,8}@[a-z0-9]{1,8}\.(com|org)", fullmatch=True),
        "phone": st.from_regex(r"\+?[0-9]{7,15}", fullmatch=True),
        "nickname": st.none() | short_text,
    },
).map(in_declared_order(PERSON))
ORDER_ITEMS = st.fixed_dictionaries(
    {
        "sku": st.from_regex(r"[A-Z]{3}-[0-9]{4}", fullmatch=True),
        "qty": st.integers(1, 10**9),
        "price": st.floats(allow_nan=False, allow_infinity=False) | st.integers(),
    }
).map(in_declared_order(ORDER["$defs"]["item"]))
ORDER_INSTANCES = st.fixed_dictionaries(
    {
        "id": st.uuids().map(str),
        "items": st.lists(ORDER_ITEMS, min_size=1, max_size=3),
        "status": st.sampled_from(["pending", "shipped", "delivered"]),
        "note": st.none() | st.text(max_size=10),
    }
).map(in_declared_order(ORDER))
TUPLE_INSTANCES = st.tuples(short_text, st.integers()).map(list) | st.tuples(
    short_text, st.integers(), st.booleans()
).map(list)
OPTIONAL_INSTANCES = st.fixed_dictionaries({}, optional={k: st.integers() for k in "abcd"}).map(
    in_declared_order(ALL_OPTIONAL)
)
ANY_INSTANCES = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=8,
)


def depth_of(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
@pytest.mark.parametrize(
    "schema,instances",
    [
        (PERSON, PERSON_INSTANCES),
        (ORDER, ORDER_INSTANCES),
        (TUPLE, TUPLE_INSTANCES),
        (ALL_OPTIONAL, OPTIONAL_INSTANCES),
        (True, ANY_INSTANCES),
    ],
    ids=["person", "order", "tuple", "all-optional", "any"],
)
def test_random_instances_match(schema, instances, data):
    rx = re.compile(schema_to_regex(schema), flags=re.ASCII)
    value = data.draw(instances)
    if schema is True and depth_of(value) > DEFAULT_MAX_DEPTH:
        return
    assert rx.fullmatch(json.dumps(value, separators=(",", ":"), ensure_ascii=False)), value
    assert rx.fullmatch(json.dumps(value)), value


# ---- `pattern`: the JSON text matches exactly when the decoded content matches ----

PATTERNS = [
    r"[ -~]{2,5}",
    r"\w+@\w+\.com",
    r"[^abc]{1,4}",
    r".{0,3}x",
    r"\s\S\d\D",
    r"(?:ab|c\d)+",
    r"^a\\b\"c$",
    r"[\x00-\x1f\\\"]{1,2}",
    r"[\W]z",
    r"é[éa]?",
    r"a{,2}b",
    r"[]a]\n?",
]


@settings(max_examples=80, deadline=None)
@given(st.data())
@pytest.mark.parametrize("pattern", PATTERNS)
def test_pattern_means_the_decoded_content(pattern, data):
    rx = schema_to_regex({"type": "string", "pattern": pattern})
    assert_in_dfa_subset(rx)
    content_rx = pattern.removeprefix("^").removesuffix("$")
    s = data.draw(
        st.text(max_size=6)
        | st.from_regex(content_rx, fullmatch=True)
        | st.sampled_from(['a\\b"c', "\x01", '"'])
    )
    expected = re.fullmatch(content_rx, s, flags=re.ASCII) is not None
    assert matches(rx, json.dumps(s, ensure_ascii=False)) == expected, (s, rx)


def test_pattern_rewrites():
    assert pattern_to_regex("^[a-z]+$") == "(?:[a-z]+)"
    assert matches(schema_to_regex({"type": "string", "pattern": "."}), r'"\u0001"')  # any \u00XX form
    for bad, what in [
        ("a(?=b)", "groups"),
        (r"(a)\1", "backreference"),
        ("a^b", "anchors"),
        (r"\bword", "boundary"),
        ("[α-ω]", "ASCII"),
        ("(?P<n>a)", "groups"),
        ("[", "valid regex"),
    ]:
        with pytest.raises(SchemaError, match=what) as e:
            schema_to_regex({"properties": {"p": {"type": "string", "pattern": bad}}})
        assert str(e.value).startswith("#/properties/p/pattern:")


# ---- what is not supported says where ----

UNSUPPORTED = [
    ({"type": "number", "multipleOf": 2}, "#/multipleOf"),
    ({"type": "object", "patternProperties": {"a": {}}}, "#/patternProperties"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "#/if"),
    ({"properties": {"x": {"not": {"type": "null"}}}}, "#/properties/x/not"),
    ({"type": "array", "uniqueItems": True}, "#/uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "#/contains"),
    ({"properties": {"price": {"type": "number", "minimum": 0}}}, "#/properties/price/minimum"),
    (
        {"$defs": {"n": {"properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
        "#/$defs/n/properties/next/$ref",
    ),
    ({"$ref": "https://example.com/s.json"}, "#/$ref"),
    ({"$ref": "#/$defs/missing"}, "#/$ref"),
    ({"allOf": [{"type": "integer"}, {"type": "string"}]}, "#/allOf/1"),
    ({"type": "string", "format": "ipv6"}, "#/format"),
    ({"type": "string", "format": "date", "maxLength": 3}, "#/format"),
    ({"type": "object", "properties": {"a": {}}, "minProperties": 1}, "#/minProperties"),
    ({"type": "object", "maxProperties": 3}, "#/maxProperties"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "#/required"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "#/maximum"),
    ({"type": "tuple"}, "#/type"),
    (
        {"properties": {"a/b~": {"type": "integer", "maxLength": -1, "minimum": "x"}}},
        "#/properties/a~1b~0/minimum",
    ),
    ({"type": "array", "items": False, "minItems": 1}, "#/minItems"),
    ({"enum": [1, 2], "type": "string"}, "#/enum"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "#/maxLength"),
    (False, "#"),
]


@pytest.mark.parametrize("schema,where", UNSUPPORTED, ids=[w for _, w in UNSUPPORTED])
def test_unsupported_names_its_path(schema, where):
    with pytest.raises(SchemaError) as e:
        schema_to_regex(schema)
    assert str(e.value).startswith(where + ":"), str(e.value)


def test_annotations_and_unknown_keywords_are_ignored():
    plain = schema_to_regex({"type": "integer"})
    noted = {
        "type": "integer",
        "title": "t",
        "description": "d",
        "examples": [1],
        "default": 0,
        "$comment": "c",
        "deprecated": True,
        "readOnly": True,
        "writeOnly": False,
        "$schema": "x",
        "$id": "y",
        "x-vendor": 1,
    }
    assert schema_to_regex(noted) == plain
    assert matches(schema_to_regex({"type": "integer", "nullable": True}), "null")
