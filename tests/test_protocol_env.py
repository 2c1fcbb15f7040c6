"""The request parser's two ways through ``env``: without a ``\\u`` escape in
the payload it encodes every variable at once; with one it checks each.
Both must give the same Request, or the same error."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from errand_boy.exceptions import RemoteProtocolError
from errand_boy.protocol import parse_extended_block


def _parse(payload: bytes) -> Any:
    try:
        return parse_extended_block(payload)
    except RemoteProtocolError as exc:
        return ("error", exc.code, exc.message)


def _both(obj: Any) -> Any:
    """(parsed from raw UTF-8, parsed from all-escaped JSON)."""
    raw = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    escaped = json.dumps(obj, ensure_ascii=True).encode("ascii")
    return _parse(raw), _parse(escaped)


_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
_VALUE = st.one_of(_TEXT, _TEXT, st.integers(), st.none(), st.lists(_TEXT, max_size=1))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.one_of(_TEXT, st.just(""), st.just("A=B")), _VALUE, max_size=6))
def test_env_fast_and_checked_paths_agree(env: Any) -> None:
    fast, checked = _both({"cmd": "true", "env": env})
    assert fast == checked


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, {}),
        ({"A": "", "B": "x=y"}, {b"A": b"", b"B": b"x=y"}),
        ({"\u00e9": "\u20ac"}, {"\u00e9".encode(): "\u20ac".encode()}),
    ],
)
def test_env_without_escapes(env: Any, expected: Any) -> None:
    payload = json.dumps({"cmd": "true", "env": env}, ensure_ascii=False).encode()
    assert b"\\u" not in payload
    assert parse_extended_block(payload).env == expected


@pytest.mark.parametrize(
    "env, message",
    [
        ({"": "x"}, "illegal variable name ''"),
        ({"A=B": "x"}, "illegal variable name 'A=B'"),
        ({"A": 1}, "must be a string"),
        ({"A": None}, "must be a string"),
        ({"A": "x\u0000y"}, "contains a NUL character"),
        ({"A": "\udc80"}, None),  # a byte that is not UTF-8: allowed
        ({"A": "\ud800"}, "lone surrogate"),
    ],
)
def test_env_errors_are_the_checked_paths(env: Any, message: Any) -> None:
    payload = json.dumps({"cmd": "true", "env": env}).encode()
    if message is None:
        assert parse_extended_block(payload).env == {b"A": b"\x80"}
        return
    with pytest.raises(RemoteProtocolError, match=message):
        parse_extended_block(payload)
