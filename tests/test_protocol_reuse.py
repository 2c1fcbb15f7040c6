"""Requests parsed before are reused by their exact payload bytes: a hit
gives the Request a fresh parse would, an object of its own, and a payload
that differs in any byte is parsed (and checked) afresh."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from errand_boy import protocol
from errand_boy.exceptions import RemoteProtocolError


def _parse(payload: bytes) -> Any:
    try:
        return protocol.parse_extended_block(payload)
    except RemoteProtocolError as exc:
        return ("error", exc.code, exc.message)


def _fresh(payload: bytes) -> Any:
    try:
        return protocol._parse_extended_block(payload)
    except RemoteProtocolError as exc:
        return ("error", exc.code, exc.message)


def test_a_hit_is_equal_and_its_own_object() -> None:
    payload = json.dumps({"cmd": "true", "cwd": "/tmp", "env": {"A": "1"}, "timeout": 2}).encode()
    first, second = protocol.parse_extended_block(payload), protocol.parse_extended_block(payload)
    assert first == second == protocol._parse_extended_block(payload)
    assert first is not second
    first.env = None  # (a server may drop a running request's env)
    first.cmd = b"changed"
    third = protocol.parse_extended_block(payload)
    assert third.env == {b"A": b"1"} and third.cmd == b"true"


def test_bounded() -> None:
    for n in range(100):
        protocol.parse_extended_block(json.dumps({"cmd": f"echo {n}"}).encode())
    assert len(protocol._PARSED) <= protocol._PARSED_ENTRIES
    big = json.dumps({"cmd": "x" * (protocol._PARSED_MAX_BYTES + 1)}).encode()
    protocol.parse_extended_block(big)
    assert big not in protocol._PARSED


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
_VALUE = st.one_of(_TEXT, st.integers(), st.none())


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["cmd", "argv", "cwd", "timeout", "stdin", "op"]), _VALUE, max_size=4),
    st.dictionaries(st.one_of(_TEXT, st.just("A=B")), _VALUE, max_size=3),
)
def test_parsed_twice_as_once(obj: Any, env: Any) -> None:
    """Whatever the payload, the second parse (a hit, or a miss for an
    error) gives what a fresh parse gives."""
    obj = {**obj, "env": env} if env else obj
    payload = json.dumps(obj).encode()
    expected = _fresh(payload)
    assert _parse(payload) == expected
    assert _parse(payload) == expected
    # A byte more (JSON whitespace): another payload, parsed afresh, alike.
    assert _parse(payload + b" ") == expected
