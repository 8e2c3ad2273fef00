"""compile_regex against Python's re: a byte-level DFA must accept exactly the UTF-8 encodings of the strings
that re.fullmatch(pattern, s, flags=re.ASCII) accepts, be minimal, and refuse what it does not support."""

import re
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.structured.regex_dfa import ByteDFA, RegexError, compile_regex

JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
JSON_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
WS = r"[ \t\n\r]*"
JSON_OBJECT = (
    rf'\{{{WS}"name"{WS}:{WS}{JSON_STRING}{WS},{WS}"age"{WS}:{WS}{JSON_NUMBER}{WS},{WS}"tags"{WS}:{WS}'
    rf"\[{WS}(?:{JSON_STRING}(?:{WS},{WS}{JSON_STRING}){{0,3}})?{WS}\]{WS}\}}"
)

COMMON_STRINGS = ["", "a", "b", "ab", "abb", "aab", "abc", "é", "😀", "\n", " ", "-", ".", "{", "0", "A_1"]
PATTERN_STRINGS = {
    JSON_STRING: [
        '""',
        '"abc"',
        r'"a\"b"',
        r'"\u00e9"',
        r'"\u00g9"',
        '"é😀"',
        '"\x01"',
        '"a',
        'a"',
        r'"\x"',
        r'"\/\\"',
        '"\x7f"',
        '"""',
    ],
    JSON_NUMBER: [
        "0",
        "-0",
        "01",
        "1.5",
        "1.",
        ".5",
        "-1e10",
        "1E+3",
        "1e",
        "12345678901234567890",
        "-",
        "1e-0",
    ],
    JSON_OBJECT: [
        '{"name":"Ann","age":31,"tags":[]}',
        '{ "name" : "é" , "age" : -1.5e3 , "tags" : [ "x" , "y" ] }',
        '{"name":"Ann","age":31,"tags":["a","b","c","d","e"]}',
        '{"name":"Ann","age":031,"tags":[]}',
        '{"name":"Ann","age":31,"tags":["a",]}',
    ],
    "red|green|blue|": ["red", "green", "blue", "", "gree", "redgreen"],
    "(?:yes|no|maybe)!?": ["yes", "no!", "maybe!", "may", "yes!!"],
    r"[a-z]{2,4}": ["ab", "abcd", "abcde", "a", "aB"],
    r"\d{3}-\d{4}": ["555-1234", "555-123", "5551234", "٣٣٣-1234"],
    "(?:ab){0,2}c": ["c", "abc", "ababc", "abababc"],
    "x{,2}": ["", "x", "xx", "xxx", "x{,2}"],
    "a{2,}": ["a", "aa", "aaaaaaa"],
    "a{": ["a{"],
    "a{,": ["a{,"],
    "a{1,x}": ["a{1,x}"],
    "a{}": ["a{}"],
    "{": ["{"],
    "x{2}{": ["xx{"],
    "{1,2": ["{1,2"],
    r"\x41\u00e9\U0001F600": ["Aé😀", "Ae😀"],
    r"\N{EM DASH}+": ["—", "——", "-"],
    r"\0\101\07": ["\x00A\x07"],
    r"[\101-\103]+": ["ABC", "D"],
    r"\t\n\r\f\v\a": ["\t\n\r\f\v\a"],
    r"\/\"\-\.\*\ \é": ['/"-.* é'],
    ".": ["\n", "é", "😀", "\U0010ffff", "\x7f", "\x00", "ab"],
    "a.c": ["abc", "a\nc", "aéc", "a😀c"],
    ".*": ["", "anything é 😀", "two\nlines"],
    "[^a-z]": ["a", "A", "é", "\n", "😀", "\U0010ffff"],
    r"[\W\d]+": ["1!é", "a", "_", "٣"],
    r"\D\S\W": ["éé!", "a b", "1bc"],
    r"\w+": ["abc_123", "é", "Ab9"],
    r"\s+": [" \t\n\r\f\v", "\x1c", "\u00a0"],
    "[]]": ["]"],
    "[^]]": ["]", "a", "é"],
    "[a-]": ["a", "-"],
    "[-a]": ["a", "-"],
    r"[\]]": ["]"],
    r"[a\-z]": ["a", "-", "z", "b"],
    "[a-b-c]": ["a", "b", "-", "c"],
    r"[\s\S]": ["é", "\n", "a"],
    r"[^\s\S]": ["é", "\n", "a"],
    r"[\b]": ["\b"],
    "[.]": [".", "a"],
    r"[\x00-\x1f]": ["\x00", "\x1f", " "],
    r"[\w.-]+@[\w-]+\.[a-z]{2,}": ["a.b-c@d-e.com", "a@b.c", "é@b.com"],
    "^abc$": ["abc", "abc\n"],
    "^$": ["", "\n"],
    "$": ["", "\n"],
    "^": [""],
    "a$": ["a", "a\n"],
    "a|$": ["a", ""],
    r"a\$": ["a$"],
    r"(?P<year>\d{4})-(?P<month>\d\d)": ["2024-01", "24-01"],
    "a+?b": ["ab", "aaab", "b"],
    "a??": ["", "a", "aa"],
    "(?:ab)*?c": ["c", "ababc"],
    "a{1,3}?": ["a", "aaa", "aaaa"],
    "(?:a*)*b": ["b", "aaab"],
    "(?:a|)*": ["", "aaa"],
    "(?:a?){3}": ["", "aaa", "aaaa"],
    "(a*|b)+": ["", "abab", "bba"],
    "()*": [""],
    "(|a)b": ["b", "ab"],
    "é+": ["é", "éé", "e"],
    "ü?ber": ["über", "ber"],
    "日本語|中文": ["日本語", "中文", "日本"],
    "😀{2}": ["😀😀", "😀"],
    "a(?#a comment)b": ["ab"],
    "a(?#comment)*": ["", "aaa"],
    r"[\1-\7]": ["\x01", "\x07", "1"],
    "(a|b)*abb": ["abb", "aabb", "babb", "ab", "abba"],
    "[[]": ["["],
}


def re_accepts(pattern: str, text: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # re's "possible nested set" for "[[]"
        return re.fullmatch(pattern, text, flags=re.ASCII) is not None


def re_accepts_bytes(pattern: str, data: bytes) -> bool:
    try:
        text = data.decode("utf-8")  # strict: overlong forms, surrogates and > U+10FFFF are errors
    except UnicodeDecodeError:
        return False
    return re_accepts(pattern, text)


def moore_num_states(dfa: ByteDFA) -> int:
    """The number of states of the minimal equivalent complete DFA, by plain Moore refinement (the reference
    for compile_regex's Hopcroft)."""
    block = dfa.accepting.astype(np.int64)  # [num_states]
    num_blocks = len(np.unique(block))
    while True:
        signature = np.concatenate([block[:, None], block[dfa.transitions]], axis=1)  # [num_states, 257]
        _, block = np.unique(signature, axis=0, return_inverse=True)
        block = block.reshape(-1)
        if len(np.unique(block)) == num_blocks:
            return num_blocks
        num_blocks = len(np.unique(block))


def check_structure(dfa: ByteDFA) -> None:
    """The invariants ByteDFA promises: 0 is the only dead state, all states are reachable, it is minimal."""
    n = dfa.num_states
    assert dfa.transitions.shape == (n, 256) and dfa.transitions.dtype == np.int32
    assert dfa.accepting.shape == (n,) and dfa.accepting.dtype == np.bool_
    assert not dfa.transitions[0].any() and not dfa.accepting[0]
    assert not dfa.transitions[:, [0xC0, 0xC1, *range(0xF5, 0x100)]].any()  # never in UTF-8
    reached, frontier = {0, dfa.start}, [dfa.start]
    while frontier:
        for t in set(dfa.transitions[frontier.pop()].tolist()) - reached:
            reached.add(t)
            frontier.append(t)
    assert reached == set(range(n))
    live = set(np.flatnonzero(dfa.accepting).tolist())
    grew = True
    while grew:
        before = len(live)
        live |= {q for q in range(n) if live & set(dfa.transitions[q].tolist())}
        grew = len(live) > before
    assert live == set(range(1, n)) if dfa.start else live == set()
    assert moore_num_states(dfa) == n


@pytest.mark.parametrize("pattern", list(PATTERN_STRINGS), ids=lambda p: p if len(p) < 40 else p[:36] + "...")
def test_matches_re_fullmatch(pattern):
    dfa = compile_regex(pattern)
    check_structure(dfa)
    for text in COMMON_STRINGS + PATTERN_STRINGS[pattern]:
        assert dfa.matches(text.encode()) == re_accepts(pattern, text), (pattern, text)


def test_json_state_counts():
    # string: dead, start, inside, after \, after \u, 3 more hex digits, done, 7 for multi-byte UTF-8
    assert compile_regex(JSON_STRING).num_states == 16
    # number: dead, start, after -, 0, integer digits, after ., fraction, after e, after sign, exponent
    assert compile_regex(JSON_NUMBER).num_states == 10


def test_textbook_minimal_dfa():
    dfa = compile_regex("(a|b)*abb")
    assert dfa.num_states == 5  # the textbook's 4 states, plus the dead one
    assert compile_regex("a*").num_states == compile_regex("(a*)*").num_states == 2
    assert compile_regex("(?:a|b)*").num_states == compile_regex("[ab]*").num_states == 2
    # dead, start, done, and 7 states inside a multi-byte UTF-8 character
    assert compile_regex(".").num_states == compile_regex(r"[\s\S]").num_states == 10
    empty = compile_regex(r"[^\s\S]")
    assert empty.start == 0 and empty.num_states == 1 and not empty.matches(b"")


def test_advance_and_helpers():
    dfa = compile_regex("abc|abcd")
    state = dfa.advance(dfa.start, b"ab")
    assert state != 0 and not dfa.can_end(state)
    assert dfa.advance(state, b"c") == dfa.advance(dfa.start, b"abc")
    end = dfa.advance(state, b"c")
    assert dfa.can_end(end) and not dfa.is_final(end)
    assert dfa.is_final(dfa.advance(end, b"d"))
    assert dfa.advance(state, b"x") == 0
    assert dfa.advance(dfa.advance(state, b"x"), b"cd") == 0  # dead stays dead
    assert dfa.advance(0, b"abc") == 0
    with pytest.raises(ValueError):
        dfa.transitions[1, 0] = 5  # shared between requests: read-only


# Random patterns: small pieces that re and compile_regex both support, combined by a little grammar.
ATOMS = [
    "a",
    "b",
    "é",
    "😀",
    "",
    r"\.",
    "-",
    r"\n",
    r"\x61",
    r"\u00e9",
    ".",
    r"\d",
    r"\w",
    r"\W",
    r"\s",
    r"\S",
    "[ab]",
    "[^a]",
    "[a-c]",
    r"[^\d\n]",
    r"[\w.-]",
    "[]a]",
    r"[^\W_]",
    "{",
    "a{,",
]
QUANTIFIERS = ["*", "+", "?", "{2}", "{1,3}", "{2,}", "{,2}", "{0}", "*?", "+?", "{0,2}?"]
patterns = st.recursive(
    st.sampled_from(ATOMS),
    lambda inner: st.one_of(
        st.lists(inner, min_size=2, max_size=3).map("".join),
        st.lists(inner, min_size=2, max_size=3).map(lambda items: "(?:" + "|".join(items) + ")"),
        st.tuples(inner, st.sampled_from(QUANTIFIERS)).map(lambda t: f"(?:{t[0]}){t[1]}"),
        inner.map(lambda item: f"({item})"),
    ),
    max_leaves=8,
)
texts = st.one_of(st.text(alphabet="abé😀.-\n A_1{,", max_size=8), st.text(max_size=4))
BYTE_PIECES = [
    b"a",
    b"b",
    b".",
    b"-",
    b"\n",
    b"1",
    "é".encode(),
    "😀".encode(),
    "\U0010ffff".encode(),
    b"\xc3",
    b"\xa9",
    b"\x80",
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xc0\xaf",
    b"\xf0\x9f",
    b"\xff",
    b"\xf8\x88\x80\x80\x80",
]
byte_strings = st.one_of(
    st.lists(st.sampled_from(BYTE_PIECES), max_size=5).map(b"".join), st.binary(max_size=6)
)
property_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@property_settings
@given(pattern=patterns, data=st.data())
def test_random_patterns_match_re(pattern, data):
    dfa = compile_regex(pattern)
    candidates = data.draw(st.lists(texts, max_size=6))
    candidates += data.draw(st.lists(st.from_regex(pattern, fullmatch=True), min_size=1, max_size=3))
    for text in candidates:
        assert dfa.matches(text.encode()) == re_accepts(pattern, text), (pattern, text)


@property_settings
@given(pattern=patterns, data=st.data())
def test_random_bytes_match_only_valid_utf8(pattern, data):
    dfa = compile_regex(pattern)
    for raw in data.draw(st.lists(byte_strings, min_size=1, max_size=6)):
        assert dfa.matches(raw) == re_accepts_bytes(pattern, raw), (pattern, raw)


@settings(max_examples=40, deadline=None)
@given(pattern=patterns)
def test_random_patterns_give_minimal_dfas(pattern):
    check_structure(compile_regex(pattern))


# (pattern, what the message says, whether re itself accepts the pattern)
UNSUPPORTED = [
    (r"(a)\1", "backreferences", True),
    ("(?P<x>a)(?P=x)", "backreferences", True),
    ("a(?=b)", "lookahead", True),
    ("a(?!b)", "lookahead", True),
    ("(?<=a)b", "lookbehind", True),
    ("(?<!a)b", "lookbehind", True),
    ("(?i)a", "inline flags", True),
    ("(?i:a)", "inline flags", True),
    ("(?-i:a)", "inline flags", True),
    ("(?(1)a|b)", "conditional", False),  # (re: no group 1; with one it is still unsupported)
    ("(a)(?(1)a|b)", "conditional", True),
    ("(?>a)", "atomic", True),
    ("a*+", "possessive", True),
    ("a{2}+", "possessive", True),
    (r"\bfoo", r"\b assertion", True),
    (r"a\B", r"\B assertion", True),
    (r"\Aa", r"\A assertion", True),
    (r"a\Z", r"\Z assertion", True),
    ("[α-ω]", "only ASCII", True),
    ("[^é]", "only ASCII", True),
    (r"[\xe9]", "only ASCII", True),
    (r"[a-\u00ff]", "only ASCII", True),
    ("a^b", "only supported as the first character", True),
    ("a$b", "only supported as the last character", True),
    ("(^a)", "only supported as the first character", True),
    ("(a$)", "only supported as the last character", True),
    ("\ud800", "surrogate", True),
    (r"\ud800", "surrogate", True),
    ("*a", "nothing to repeat", False),
    ("^*", "nothing to repeat", False),
    ("a|*", "nothing to repeat", False),
    ("a**", "multiple repeat", False),
    ("a{2}{3}", "multiple repeat", False),
    ("(a", "missing )", False),
    ("a)", "unbalanced parenthesis", False),
    ("[a", "unterminated character set", False),
    ("[]", "unterminated character set", False),
    ("[z-a]", "bad character range", False),
    (r"[\d-z]", "bad character range", False),
    (r"\x4", "incomplete escape", False),
    (r"\u12", "incomplete escape", False),
    (r"\U00110000", "bad escape", False),
    ("a{3,2}", "min repeat greater than max repeat", False),
    (r"\q", "bad escape", False),
    ("\\", "bad escape (end of pattern)", False),
    (r"[\8]", "bad escape", False),
    (r"\400", "octal escape", False),
    ("(?P<1>a)", "bad group name", False),
    ("(?P<a>x)(?P<a>y)", "redefinition of group name", False),
    ("(?<n>a)", "unknown extension", False),
    ("a{4294967295}", "repetition number is too large", False),
    ("a{" + "9" * 30 + "}", "repetition number is too large", False),
    ("(" * 101 + ")" * 101, "nested more than 100 deep", True),
]


@pytest.mark.parametrize("pattern, reason, re_supports", UNSUPPORTED)
def test_unsupported_and_malformed_patterns_raise(pattern, reason, re_supports):
    with pytest.raises(RegexError, match=re.escape(reason)) as info:
        compile_regex(pattern)
    assert str(info.value).startswith("regex position ")
    if re_supports:
        re.compile(pattern, flags=re.ASCII)
    else:
        with pytest.raises((re.error, OverflowError)):
            re.compile(pattern, flags=re.ASCII)


def test_max_states():
    assert compile_regex("a{8}", max_states=10).num_states == 10
    with pytest.raises(RegexError, match="max_states=10 "):
        compile_regex("a{9}", max_states=10)
    # 2**13 states before minimisation and after: subset construction must stop at the limit
    started = time.perf_counter()
    with pytest.raises(RegexError, match="max_states=1000 "):
        compile_regex("(?:a|b)*a(?:a|b){12}", max_states=1000)
    # a huge bound fails before its NFA is built
    with pytest.raises(RegexError, match="max_states=10000"):
        compile_regex("a{100000}")
    with pytest.raises(RegexError, match="max_states=10000"):
        compile_regex("(?:[^x]{1000}){1000}")
    assert time.perf_counter() - started < 5
    with pytest.raises(ValueError, match="max_states"):
        compile_regex("a", max_states=1)
