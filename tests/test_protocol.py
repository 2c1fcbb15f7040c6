"""The wire protocol on bytes, without sockets (h11's ``test_io.py`` habit).

Every complete input is fed whole, one byte at a time and in several
seeded random splits (the ``split`` fixture); where the protocol says bytes
after the end are ignored, with trailing data too. Events are compared
after :func:`normalise` joins adjacent ``Input`` (or same-fd ``Output``)
pieces, since how a payload is cut into pieces depends on the split.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errand_boy.exceptions import LocalProtocolError, ProtocolError, RemoteProtocolError
from errand_boy.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    ERROR_CODES,
    MAGIC,
    MAX_FDS,
    MAX_PASS_FDS,
    MAX_SMALL_PAYLOAD,
    NEED_DATA,
    TERMINATOR,
    EndOfInput,
    EndOfStream,
    Exited,
    Failed,
    Input,
    Output,
    ReplyParser,
    Request,
    RequestParser,
    SignalRequest,
    Started,
    StatusReply,
    encode_request,
    encode_simple_request,
    encode_status_request,
    end_of_input_frame,
    error_frame,
    exit_frame,
    frame,
    frame_header,
    input_frame,
    signal_frame,
    started_frame,
    status_frame,
)

SIGNALS = sorted(int(s) for s in signal.valid_signals() if int(s) > 0)
SIMPLE_LS = b"ls -al\r\n\r\n\r\n\r\n"
CAT = encode_request(cmd="cat")
CAT_REQUEST = Request(cmd=b"cat")

# --------------------------------------------------------------------------
# Feeding helpers

Split = Callable[[bytes], List[bytes]]


def split_whole(data: bytes) -> List[bytes]:
    return [data] if data else []


def split_bytewise(data: bytes) -> List[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_split(seed: int) -> Split:
    def split(data: bytes) -> List[bytes]:
        rng = random.Random(seed * 1_000_003 + len(data))
        chunks, i = [], 0
        while i < len(data):
            n = rng.choice((1, 1, 2, 3, 4, 7, 16, 100, 4096))
            chunks.append(data[i : i + n])
            i += n
        return chunks

    split.__name__ = f"random{seed}"
    return split


SPLITS = [split_whole, split_bytewise, random_split(1), random_split(2), random_split(3)]


@pytest.fixture(params=SPLITS, ids=lambda f: f.__name__)
def split(request: Any) -> Split:
    return request.param


def drain(parser: Any, into: List[Any]) -> None:
    for _ in range(10_000):  # a parser that never says NEED_DATA fails, not hangs
        event = parser.next_event()
        if event is NEED_DATA:
            return
        into.append(event)
    raise AssertionError("the parser keeps producing events without new data")


def feed(
    parser: Any, chunks: List[bytes], *, eof: bool = False, into: Optional[List[Any]] = None
) -> List[Any]:
    """Feed each chunk and take every event it allows; ``eof`` feeds b"" last."""
    events: List[Any] = [] if into is None else into
    for chunk in chunks:
        assert chunk, "an empty chunk would mean end of stream"
        parser.receive_data(chunk)
        drain(parser, events)
    if eof:
        parser.receive_data(b"")
        drain(parser, events)
    return events


def normalise(events: List[Any]) -> List[Any]:
    out: List[Any] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, Input) and isinstance(last, Input):
            out[-1] = Input(last.data + event.data)
        elif isinstance(event, Output) and isinstance(last, Output) and last.fd == event.fd:
            out[-1] = Output(event.fd, last.data + event.data)
        else:
            out.append(event)
    return out


def request_events(data: bytes, split: Split, *, eof: bool = False, **limits: int) -> List[Any]:
    return normalise(feed(RequestParser(**limits), split(data), eof=eof))


def request_error(
    data: bytes, split: Split, *, eof: bool = False, **limits: int
) -> Tuple[List[Any], RemoteProtocolError]:
    """The events before the error, and the error."""
    events: List[Any] = []
    with pytest.raises(RemoteProtocolError) as info:
        feed(RequestParser(**limits), split(data), eof=eof, into=events)
    return normalise(events), info.value


def reply_events(data: bytes, split: Split, *, eof: bool = False, **limits: int) -> List[Any]:
    return normalise(feed(ReplyParser(**limits), split(data), eof=eof))


def reply_error(data: bytes, split: Split, *, eof: bool = False) -> Tuple[List[Any], RemoteProtocolError]:
    events: List[Any] = []
    with pytest.raises(RemoteProtocolError) as info:
        feed(ReplyParser(), split(data), eof=eof, into=events)
    return normalise(events), info.value


def extended(payload: bytes) -> bytes:
    return MAGIC + payload + TERMINATOR


# --------------------------------------------------------------------------
# Simple form


def test_simple_form(split: Split) -> None:
    expected = [Request(cmd=b"ls -al", simple=True), EndOfInput()]
    assert request_events(SIMPLE_LS, split) == expected
    assert request_events(SIMPLE_LS, split, eof=True) == [*expected, EndOfStream()]


@pytest.mark.parametrize("trailing", [b"x", b"\r\n\r\n", b"I 0\r\n", b"\x00" * 100, b"ERRAND/1 {}\r\n\r\n"])
def test_simple_form_ignores_bytes_after_the_terminator(split: Split, trailing: bytes) -> None:
    expected = [Request(cmd=b"ls -al", simple=True), EndOfInput()]
    assert request_events(SIMPLE_LS + trailing, split) == expected
    assert request_events(SIMPLE_LS + trailing, split, eof=True) == [*expected, EndOfStream()]


def test_simple_form_keeps_no_ignored_bytes() -> None:
    parser = RequestParser()
    assert feed(parser, [SIMPLE_LS + b"junk"]) == [Request(cmd=b"ls -al", simple=True), EndOfInput()]
    assert parser.buffered == 0
    assert feed(parser, [b"x" * 100_000]) == []
    assert parser.buffered == 0


def test_simple_form_with_input(split: Split) -> None:
    data = b"cat -n\r\n\r\nline 1\r\nline 2\n\x00\xff\r\n\r\n"
    assert request_events(data, split) == [
        Request(cmd=b"cat -n", simple=True),
        Input(b"line 1\r\nline 2\n\x00\xff"),
        EndOfInput(),
    ]


def test_simple_form_streams_input_before_its_terminator(split: Split) -> None:
    # No terminator yet: the input so far is handed on, and nothing more.
    assert request_events(b"cat\r\n\r\nhello", split) == [Request(cmd=b"cat", simple=True), Input(b"hello")]


def test_simple_form_first_input_piece_comes_without_waiting() -> None:
    parser = RequestParser()
    assert feed(parser, [b"cat\r\n\r\n"]) == [Request(cmd=b"cat", simple=True)]
    assert feed(parser, [b"a"]) == [Input(b"a")]
    assert feed(parser, [b"bc"]) == [Input(b"bc")]
    assert parser.buffered == 0


def test_simple_form_holds_back_a_partial_terminator() -> None:
    parser = RequestParser()
    assert feed(parser, [b"cat\r\n\r\nab\r\n"]) == [Request(cmd=b"cat", simple=True), Input(b"ab")]
    assert parser.buffered == 2  # the CR LF that may start the terminator
    assert feed(parser, [b"\r"]) == []
    assert feed(parser, [b"x"]) == [Input(b"\r\n\rx")]
    assert feed(parser, [b"\r"]) == []
    assert feed(parser, [b"\n\r"]) == []
    assert parser.buffered == 3
    assert feed(parser, [b"\n"]) == [EndOfInput()]


@pytest.mark.parametrize(
    "stdin",
    [b"ab\r\ncd", b"ab\r\n\rcd", b"\r", b"\n", b"\r\n\r", b"a\rb\r\n\rc\r\r", b"\n\r\n\r\r", b"\r\r\n\r"],
)
def test_simple_form_never_leaks_terminator_bytes(split: Split, stdin: bytes) -> None:
    data = b"cat\r\n\r\n" + stdin + TERMINATOR + b"more\r\n"
    assert request_events(data, split) == [Request(cmd=b"cat", simple=True), Input(stdin), EndOfInput()]


def test_simple_form_empty_input(split: Split) -> None:
    assert request_events(b"true\r\n\r\n\r\n\r\n", split) == [Request(cmd=b"true", simple=True), EndOfInput()]


@pytest.mark.parametrize(
    ("after_command", "stdin"),
    [(b"", b""), (b"ab", b"ab"), (b"ab\r", b"ab\r"), (b"ab\r\n", b"ab\r\n"), (b"ab\r\n\r", b"ab\r\n\r")],
)
def test_simple_form_half_close_before_the_input_terminator(
    split: Split, after_command: bytes, stdin: bytes
) -> None:
    # The client closed its sending side instead of sending the terminator:
    # what it sent is the whole input (bytes that never completed a
    # terminator are input), then standard input ends.
    data = b"cat\r\n\r\n" + after_command
    events = [Request(cmd=b"cat", simple=True)]
    if stdin:
        events.append(Input(stdin))
    assert request_events(data, split, eof=True) == [*events, EndOfInput(), EndOfStream()]


def test_simple_form_end_of_stream_after_the_terminator(split: Split) -> None:
    parser = RequestParser()
    assert normalise(feed(parser, split(SIMPLE_LS + b"junk"))) == [
        Request(cmd=b"ls -al", simple=True),
        EndOfInput(),
    ]
    assert feed(parser, [], eof=True) == [EndOfStream()]
    assert parser.next_event() is NEED_DATA


def test_simple_form_command_bytes_are_kept() -> None:
    cmd = b"printf '\xff\xfe' ; echo \r\n done\r"
    assert request_events(cmd + TERMINATOR + TERMINATOR, split_whole) == [
        Request(cmd=cmd, simple=True),
        EndOfInput(),
    ]
    assert Request(cmd=cmd, simple=True).args() == [b"/bin/sh", b"-c", cmd]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\r\n\r\n\r\n\r\n", "empty"),
        (b"ls\x00 -al\r\n\r\n\r\n\r\n", "NUL"),
        (b"\x00\r\n\r\n", "NUL"),
        (b'ERRAND/2 {"cmd":"ls"}\r\n\r\n', "ERRAND/2"),
        (b"ERRAND/10 x\r\n\r\n", "ERRAND/10"),
        (b'ERRAND/01 {"cmd":"ls"}\r\n\r\n', "ERRAND/01"),
        (b"ERRAND/0 \r\n\r\n", "ERRAND/0"),
    ],
)
def test_simple_form_refused(split: Split, data: bytes, words: str) -> None:
    events, error = request_error(data, split)
    assert events == []
    assert error.code == "bad-request"
    assert words in error.message


@pytest.mark.parametrize("data", [b"ERRAND/2 {}\r\n\r\n", b"ERRAND/99 x\r\n\r\n"])
def test_unsupported_version_is_named(data: bytes) -> None:
    _, error = request_error(data, split_whole)
    assert "unsupported protocol version" in error.message


@pytest.mark.parametrize(
    "cmd", [b"ERRAND/1", b"ERRAND/1{}", b"ERRAND/ x", b"ERRAND/x y", b"errand/1 {}", b"ERRAND/1\t{}"]
)
def test_commands_that_only_look_like_a_version(split: Split, cmd: bytes) -> None:
    assert request_events(cmd + TERMINATOR + TERMINATOR, split) == [
        Request(cmd=cmd, simple=True),
        EndOfInput(),
    ]


@pytest.mark.parametrize("data", [b"", b"l", b"ls -al", b"ls\r", b"ls\r\n", b"ls\r\n\r", b"ERRAND/1 {}\r\n"])
def test_half_close_before_the_command_block_ends(split: Split, data: bytes) -> None:
    parser = RequestParser()
    assert feed(parser, split(data)) == []
    with pytest.raises(RemoteProtocolError) as info:
        feed(parser, [], eof=True)
    assert info.value.code == "bad-request"


def test_a_failed_parser_stays_failed() -> None:
    parser = RequestParser()
    parser.receive_data(b"\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        parser.next_event()
    with pytest.raises(RuntimeError):
        parser.next_event()


def test_data_after_end_of_stream_is_a_caller_bug() -> None:
    parser = RequestParser()
    parser.receive_data(b"")
    with pytest.raises(RuntimeError):
        parser.receive_data(b"x")


# --------------------------------------------------------------------------
# Extended form: the JSON object


@pytest.mark.parametrize(
    ("payload", "request_"),
    [
        (b'{"cmd":"ls -al"}', Request(cmd=b"ls -al")),
        (b'{"op":"run","cmd":"ls"}', Request(cmd=b"ls")),
        (b'{"cmd":""}', Request(cmd=b"")),
        (b'{"argv":["ls","-al",""]}', Request(argv=(b"ls", b"-al", b""))),
        (b'{"argv":["true"]}', Request(argv=(b"true",))),
        (b'{"cmd":"x","cwd":"/tmp"}', Request(cmd=b"x", cwd=b"/tmp")),
        (b'{"cmd":"x","env":{}}', Request(cmd=b"x", env={})),
        (
            b'{"cmd":"x","env":{"A":"1","B_2":"","PATH":"/bin"}}',
            Request(cmd=b"x", env={b"A": b"1", b"B_2": b"", b"PATH": b"/bin"}),
        ),
        (b'{"cmd":"x","env":{"A":"=b=c"}}', Request(cmd=b"x", env={b"A": b"=b=c"})),
        (b'{"cmd":"x","timeout":5}', Request(cmd=b"x", timeout=5.0)),
        (b'{"cmd":"x","timeout":0.25}', Request(cmd=b"x", timeout=0.25)),
        (b'{"cmd":"x","timeout":1e-9}', Request(cmd=b"x", timeout=1e-9)),
        (b'{"cmd":"x","timeout":1e300}', Request(cmd=b"x", timeout=1e300)),
        (b'{"cmd":"x","stdin":"null"}', Request(cmd=b"x", stdin="null")),
        (b'{"cmd":"x","stdin":"pipe"}', Request(cmd=b"x")),
        (b'{"cmd":"x","stdout":"null"}', Request(cmd=b"x", stdout="null")),
        (b'{"cmd":"x","stderr":"stdout"}', Request(cmd=b"x", stderr="stdout")),
        (b'{"cmd":"x","stderr":"null"}', Request(cmd=b"x", stderr="null")),
        (b'{"cmd":"x","stdout":"null","stderr":"stdout"}', Request(cmd=b"x", stdout="null", stderr="stdout")),
        (
            b'{"argv":["ls","-l"],"cwd":"/","env":{"A":"1"},"timeout":2.5,'
            b'"stdin":"null","stdout":"null","stderr":"null","op":"run"}',
            Request(
                argv=(b"ls", b"-l"),
                cwd=b"/",
                env={b"A": b"1"},
                timeout=2.5,
                stdin="null",
                stdout="null",
                stderr="null",
            ),
        ),
        (b'{"op":"status"}', Request(op="status")),
        (b' { "cmd" : "x" }\t', Request(cmd=b"x")),
        (b'{"cmd":"caf\\u00e9 \xe2\x82\xac"}', Request(cmd="café €".encode())),
        (b'{"cmd":"\\ud83d\\ude00"}', Request(cmd="\N{GRINNING FACE}".encode())),
        (b'{"cmd":"a\\r\\n\\r\\nb"}', Request(cmd=b"a\r\n\r\nb")),
    ],
)
def test_extended_form_members(split: Split, payload: bytes, request_: Request) -> None:
    assert request_events(extended(payload), split) == [request_]
    assert request_events(extended(payload), split, eof=True) == [request_, EndOfStream()]


def test_timeout_is_a_float() -> None:
    [request] = request_events(extended(b'{"cmd":"x","timeout":5}'), split_whole)
    assert type(request.timeout) is float


def test_argv_request_args() -> None:
    assert Request(argv=(b"ls", b"-l")).args() == [b"ls", b"-l"]


@pytest.mark.parametrize(
    ("payload", "request_"),
    [
        (b'{"cmd":"\\udcff"}', Request(cmd=b"\xff")),
        (b'{"cmd":"a\\udc80b\\udcfe"}', Request(cmd=b"a\x80b\xfe")),
        (b'{"argv":["ls","\\udcff.txt"]}', Request(argv=(b"ls", b"\xff.txt"))),
        (b'{"argv":["\\udcc3\\udca9"]}', Request(argv=("é".encode(),))),
        (b'{"cmd":"x","env":{"N\\udcff":"v\\udcfe"}}', Request(cmd=b"x", env={b"N\xff": b"v\xfe"})),
        (b'{"cmd":"x","cwd":"/tmp/\\udcff"}', Request(cmd=b"x", cwd=b"/tmp/\xff")),
    ],
)
def test_surrogate_escapes_become_bytes(split: Split, payload: bytes, request_: Request) -> None:
    assert request_events(extended(payload), split) == [request_]


@pytest.mark.parametrize(
    ("payload", "member"),
    [
        (b'{"cmd":"\\ud800"}', "cmd"),
        (b'{"cmd":"\\udfff"}', "cmd"),
        (b'{"cmd":"\\udc41"}', "cmd"),  # a low surrogate outside \udc80-\udcff
        (b'{"cmd":"a\\ude00"}', "cmd"),
        (b'{"argv":["ls","\\ud800"]}', "argv"),
        (b'{"cmd":"x","env":{"\\ud800":"v"}}', "env"),
        (b'{"cmd":"x","env":{"N":"\\ud800"}}', "env"),
        (b'{"cmd":"x","cwd":"\\ud800"}', "cwd"),
    ],
)
def test_lone_surrogates_are_refused(split: Split, payload: bytes, member: str) -> None:
    _, error = request_error(extended(payload), split)
    assert error.code == "bad-request"
    assert f"'{member}'" in error.message


BAD_MEMBERS = [
    # exactly one of cmd and argv
    (b"{}", "cmd"),
    (b"{}", "argv"),
    (b'{"cwd":"/"}', "cmd"),
    (b'{"cmd":"ls","argv":["ls"]}', "cmd"),
    (b'{"cmd":"ls","argv":["ls"]}', "argv"),
    (b'{"cmd":"ls","argv":null}', "argv"),
    (b'{"op":"run"}', "cmd"),
    # unknown members
    (b'{"cmd":"ls","bogus":1}', "bogus"),
    (b'{"cmd":"ls","Cmd":"x"}', "Cmd"),
    (b'{"cmd":"ls","input":"x"}', "input"),
    # wrong types
    (b'{"cmd":1}', "cmd"),
    (b'{"cmd":null}', "cmd"),
    (b'{"cmd":["ls"]}', "cmd"),
    (b'{"cmd":true}', "cmd"),
    (b'{"argv":"ls"}', "argv"),
    (b'{"argv":[]}', "argv"),
    (b'{"argv":[""]}', "argv"),
    (b'{"argv":["ls",1]}', "argv"),
    (b'{"argv":["ls",null]}', "argv"),
    (b'{"argv":{"0":"ls"}}', "argv"),
    (b'{"cmd":"x","cwd":1}', "cwd"),
    (b'{"cmd":"x","cwd":null}', "cwd"),
    (b'{"cmd":"x","env":["A=1"]}', "env"),
    (b'{"cmd":"x","env":"A=1"}', "env"),
    (b'{"cmd":"x","env":null}', "env"),
    (b'{"cmd":"x","env":{"A":1}}', "env"),
    (b'{"cmd":"x","env":{"A":null}}', "env"),
    (b'{"cmd":"x","env":{"A":["1"]}}', "env"),
    # env names
    (b'{"cmd":"x","env":{"A=B":"1"}}', "env"),
    (b'{"cmd":"x","env":{"=A":"1"}}', "env"),
    (b'{"cmd":"x","env":{"":"1"}}', "env"),
    # NUL
    (b'{"cmd":"ls\\u0000"}', "cmd"),
    (b'{"argv":["ls","a\\u0000b"]}', "argv"),
    (b'{"argv":["\\u0000"]}', "argv"),
    (b'{"cmd":"x","cwd":"/\\u0000"}', "cwd"),
    (b'{"cmd":"x","env":{"A\\u0000":"1"}}', "env"),
    (b'{"cmd":"x","env":{"A":"1\\u0000"}}', "env"),
    # timeout
    (b'{"cmd":"x","timeout":0}', "timeout"),
    (b'{"cmd":"x","timeout":0.0}', "timeout"),
    (b'{"cmd":"x","timeout":-0.0}', "timeout"),
    (b'{"cmd":"x","timeout":-1}', "timeout"),
    (b'{"cmd":"x","timeout":-0.5}', "timeout"),
    (b'{"cmd":"x","timeout":1e400}', "timeout"),  # overflows to inf
    (b'{"cmd":"x","timeout":-1e400}', "timeout"),
    (b'{"cmd":"x","timeout":true}', "timeout"),
    (b'{"cmd":"x","timeout":false}', "timeout"),
    (b'{"cmd":"x","timeout":"5"}', "timeout"),
    (b'{"cmd":"x","timeout":null}', "timeout"),
    (b'{"cmd":"x","timeout":[5]}', "timeout"),
    (b'{"cmd":"x","timeout":{}}', "timeout"),
    # stream choices
    (b'{"cmd":"x","stdin":"stdout"}', "stdin"),
    (b'{"cmd":"x","stdin":"file"}', "stdin"),
    (b'{"cmd":"x","stdin":null}', "stdin"),
    (b'{"cmd":"x","stdin":0}', "stdin"),
    (b'{"cmd":"x","stdin":"PIPE"}', "stdin"),
    (b'{"cmd":"x","stdout":"stdout"}', "stdout"),
    (b'{"cmd":"x","stdout":"stderr"}', "stdout"),
    (b'{"cmd":"x","stdout":["pipe"]}', "stdout"),
    (b'{"cmd":"x","stderr":"stderr"}', "stderr"),
    (b'{"cmd":"x","stderr":"devnull"}', "stderr"),
    (b'{"cmd":"x","stderr":1}', "stderr"),
    # op
    (b'{"op":"exec","cmd":"x"}', "op"),
    (b'{"op":"STATUS"}', "op"),
    (b'{"op":null,"cmd":"x"}', "op"),
    (b'{"op":1,"cmd":"x"}', "op"),
    (b'{"op":["status"]}', "op"),
    (b'{"op":"status","cmd":"x"}', "cmd"),
    (b'{"op":"status","timeout":1}', "timeout"),
    (b'{"op":"status","stdin":"pipe"}', "stdin"),
    (b'{"op":"status","bogus":null}', "bogus"),
]


@pytest.mark.parametrize(("payload", "member"), BAD_MEMBERS)
def test_bad_members_are_named(split: Split, payload: bytes, member: str) -> None:
    events, error = request_error(extended(payload), split)
    assert events == []
    assert error.code == "bad-request"
    assert f"'{member}'" in error.message


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b" ",
        b"[]",
        b'["cmd","ls"]',
        b'"ls"',
        b"1",
        b"null",
        b"true",
        b'{"cmd":"x"} {}',
        b'{"cmd":"x"}x',
        b'{"cmd":"x",}',
        b"{'cmd':'x'}",
        b'{"cmd":"x"',
        b'{"cmd":"\xff"}',  # invalid UTF-8
        b'{"cmd":"\xc3"}',
        b'{"cmd":"\xed\xa0\x80"}',  # a surrogate encoded as UTF-8
        b'\xef\xbb\xbf{"cmd":"x"}',  # a byte order mark
        b'{"cmd":\n"x"}',  # raw LF
        b'{"cmd":"x",\r"cwd":"/"}',  # raw CR
        b'{"cmd":"a\nb"}',
        b'{"cmd":"x","timeout":NaN}',
        b'{"cmd":"x","timeout":Infinity}',
        b'{"cmd":"x","timeout":-Infinity}',
        b'{"cmd":"x","env":{"A":NaN}}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"cmd":"x","env":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"cmd":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    ],
    ids=lambda p: repr(p[:40]),
)
def test_unparseable_json_is_bad_request(payload: bytes) -> None:
    # Deeply nested input must not leak a RecursionError; the byte-by-byte
    # split is left to the shorter cases of the other tests.
    for split in (split_whole, random_split(1)):
        events, error = request_error(extended(payload), split)
        assert events == []
        assert error.code == "bad-request"


def test_deep_nesting_fed_byte_by_byte() -> None:
    payload = b"[" * 100_000 + b"]" * 100_000
    _, error = request_error(extended(payload), split_bytewise)
    assert error.code == "bad-request"


def test_huge_integer_timeout_is_bad_request() -> None:
    # JSON integers are exact in Python: 10**400 is a valid int that no
    # float can hold.
    _, error = request_error(extended(b'{"cmd":"x","timeout":1' + b"0" * 400 + b"}"), split_whole)
    assert error.code == "bad-request"
    assert "'timeout'" in error.message


def test_too_many_digits_is_bad_request() -> None:
    # Beyond Python's int digit limit json.loads itself refuses the number.
    _, error = request_error(extended(b'{"cmd":"x","timeout":1' + b"0" * 5000 + b"}"), split_whole)
    assert error.code == "bad-request"


# --------------------------------------------------------------------------
# The command block limit


@pytest.mark.parametrize("limit", [24, 100, 1000])
def test_command_block_of_exactly_the_limit(split: Split, limit: int) -> None:
    cmd = b"x" * limit
    assert request_events(cmd + TERMINATOR + TERMINATOR, split, max_request_bytes=limit) == [
        Request(cmd=cmd, simple=True),
        EndOfInput(),
    ]
    payload = b'{"cmd":"' + b"y" * (limit - len(MAGIC) - 10) + b'"}'
    block = MAGIC + payload
    assert len(block) == limit
    assert request_events(block + TERMINATOR, split, max_request_bytes=limit) == [
        Request(cmd=b"y" * (limit - len(MAGIC) - 10))
    ]


@pytest.mark.parametrize("limit", [24, 100, 1000])
def test_command_block_one_byte_over_the_limit(split: Split, limit: int) -> None:
    # The whole block and its terminator are sent, no end of stream.
    _, error = request_error(b"x" * (limit + 1) + TERMINATOR + TERMINATOR, split, max_request_bytes=limit)
    assert error.code == "too-large"
    payload = b'{"cmd":"' + b"y" * (limit - len(MAGIC) - 9) + b'"}'
    _, error = request_error(MAGIC + payload + TERMINATOR, split, max_request_bytes=limit)
    assert error.code == "too-large"


def test_too_large_is_seen_before_the_terminator() -> None:
    limit = 100
    parser = RequestParser(max_request_bytes=limit)
    # N+3 bytes may still be an N-byte block plus three terminator bytes.
    assert feed(parser, [b"x" * limit + b"\r\n\r"]) == []
    parser = RequestParser(max_request_bytes=limit)
    assert feed(parser, [b"x" * (limit + 3)]) == []
    with pytest.raises(RemoteProtocolError) as info:
        feed(parser, [b"x"])
    assert info.value.code == "too-large"


def test_too_large_before_the_terminator_any_split(split: Split) -> None:
    _, error = request_error(b"x" * 1004, split, max_request_bytes=1000)
    assert error.code == "too-large"


def test_n_plus_three_bytes_then_the_last_terminator_byte() -> None:
    parser = RequestParser(max_request_bytes=100)
    assert feed(parser, [b"x" * 100 + b"\r\n\r"]) == []
    assert feed(parser, [b"\n"]) == [Request(cmd=b"x" * 100, simple=True)]


def test_default_command_block_limit() -> None:
    assert DEFAULT_MAX_REQUEST_BYTES == 1 << 20
    assert RequestParser().max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    parser = RequestParser()
    assert feed(parser, [b"x" * (DEFAULT_MAX_REQUEST_BYTES + 3)]) == []
    with pytest.raises(RemoteProtocolError) as info:
        feed(parser, [b"x"])
    assert info.value.code == "too-large"


# --------------------------------------------------------------------------
# Client frames


def test_input_frames(split: Split) -> None:
    data = CAT + b"I 5\r\nhelloI 2\r\n\r\nI 0\r\n"
    assert request_events(data, split) == [CAT_REQUEST, Input(b"hello\r\n"), EndOfInput()]
    assert request_events(data, split, eof=True) == [
        CAT_REQUEST,
        Input(b"hello\r\n"),
        EndOfInput(),
        EndOfStream(),
    ]


def test_input_frame_payload_is_opaque(split: Split) -> None:
    payload = bytes(range(256)) + TERMINATOR + b"I 0\r\nK 1\r\n9"
    data = CAT + input_frame(payload) + end_of_input_frame()
    assert request_events(data, split) == [CAT_REQUEST, Input(payload), EndOfInput()]


def test_frames_after_the_status_request(split: Split) -> None:
    assert request_events(encode_status_request() + b"I 0\r\n", split, eof=True) == [
        Request(op="status"),
        EndOfInput(),
        EndOfStream(),
    ]


def test_input_frame_pieces_come_as_they_arrive() -> None:
    parser = RequestParser()
    assert feed(parser, [CAT + b"I 10\r\nabc"]) == [CAT_REQUEST, Input(b"abc")]
    assert feed(parser, [b"defg"]) == [Input(b"defg")]
    assert feed(parser, [b"hij" + b"I 0"]) == [Input(b"hij")]
    assert feed(parser, [b"\r\n"]) == [EndOfInput()]


def test_big_input_frame_is_streamed() -> None:
    payload = random.Random(7).randbytes(1 << 20)
    data = frame(b"I", payload)
    parser = RequestParser()
    assert feed(parser, [CAT]) == [CAT_REQUEST]
    pieces: List[bytes] = []
    for i in range(0, len(data), 1000):
        chunk = data[i : i + 1000]
        parser.receive_data(chunk)
        assert parser.buffered <= len(chunk)
        events: List[Any] = []
        drain(parser, events)
        assert parser.buffered == 0
        assert all(isinstance(e, Input) and 0 < len(e.data) <= 1000 for e in events)
        pieces.extend(e.data for e in events)
    assert b"".join(pieces) == payload
    assert len(pieces) > 1000
    assert feed(parser, [b"I 0\r\n"], eof=True) == [EndOfInput(), EndOfStream()]


@pytest.mark.parametrize("signum", [15, 9, 2, 1, 64, 34])
def test_signal_frame(split: Split, signum: int) -> None:
    data = CAT + b"I 1\r\na" + b"K %d\r\n%d" % (len(str(signum)), signum) + b"I 1\r\nb"
    assert request_events(data, split) == [CAT_REQUEST, Input(b"a"), SignalRequest(signum), Input(b"b")]


def test_signal_frame_after_end_of_input(split: Split) -> None:
    data = CAT + end_of_input_frame() + signal_frame(15) + signal_frame(9)
    assert request_events(data, split, eof=True) == [
        CAT_REQUEST,
        EndOfInput(),
        SignalRequest(15),
        SignalRequest(9),
        EndOfStream(),
    ]


@pytest.mark.parametrize(
    "frame_bytes",
    [
        b"K 1\r\n0",
        b"K 5\r\n99999",
        b"K 2\r\n-9",
        b"K 2\r\n09",
        b"K 3\r\nabc",
        b"K 0\r\n",
        b"K 2\r\n32",
        b"K 2\r\n65",
        b"K 3\r\n999",
        b"K 2\r\n+9",
        b"K 2\r\n 9",
        b"K 2\r\n9 ",
        b"K 4\r\n15\r\n",
        b"K 3\r\n1.0",
        b"K 7\r\nSIGTERM",
    ],
)
def test_bad_signal_frames(split: Split, frame_bytes: bytes) -> None:
    events, error = request_error(CAT + b"I 1\r\nx" + frame_bytes, split)
    assert events == [CAT_REQUEST, Input(b"x")]
    assert error.code == "bad-request"


def test_bad_signal_frame_is_named() -> None:
    _, error = request_error(CAT + b"K 5\r\n99999", split_whole)
    assert "signal" in error.message


@pytest.mark.parametrize(
    "frame_bytes", [b"Z 1\r\nx", b"i 1\r\nx", b"X 0\r\n", b"O 1\r\nx", b"\r\n", b" ", b"\x00", b"KK"]
)
def test_unknown_frame_kind(split: Split, frame_bytes: bytes) -> None:
    events, error = request_error(CAT + b"I 1\r\nx" + frame_bytes, split)
    assert events == [CAT_REQUEST, Input(b"x")]
    assert error.code == "bad-request"


@pytest.mark.parametrize(
    "header",
    [
        b"I 01\r\nx",
        b"I 00\r\n",
        b"I1\r\nx",
        b"I  1\r\nx",
        b"I\t1\r\nx",
        b"I +1\r\nx",
        b"I -1\r\nx",
        b"I 1 \r\nx",
        b"I 0x1\r\nx",
        b"I 1\nx",
        b"I 1\n",
        b"I 1\r\r\nx",
        b"I 1\rx",
        b"I \r\n",
        b"I\r\n",
        b"I 1" + b"1" * 40,  # no CR LF within the header limit
        b"I " + b"0" * 30,
    ],
)
def test_malformed_frame_headers(split: Split, header: bytes) -> None:
    # Without an end of stream: each is seen as soon as it is malformed.
    events, error = request_error(CAT + b"I 1\r\nx" + header, split)
    assert events == [CAT_REQUEST, Input(b"x")]
    assert error.code == "bad-request"
    assert "header" in error.message


def test_header_digits_beyond_the_header_limit() -> None:
    # 20 digits never make a valid length: refused at the 23rd byte.
    parser = RequestParser()
    assert feed(parser, [CAT, b"I " + b"1" * 19 + b"\r"]) == [CAT_REQUEST]
    with pytest.raises(RemoteProtocolError) as info:
        feed(parser, [b"1"])
    assert info.value.code == "bad-request"


@pytest.mark.parametrize("limit", [1, 10, 1000])
def test_frame_limit(split: Split, limit: int) -> None:
    payload = b"z" * limit
    assert request_events(CAT + frame(b"I", payload), split, max_frame_bytes=limit) == [
        CAT_REQUEST,
        Input(payload),
    ]
    events, error = request_error(CAT + b"I %d\r\n" % (limit + 1), split, max_frame_bytes=limit)
    assert events == [CAT_REQUEST]
    assert error.code == "too-large"


def test_default_frame_limit() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 16 << 20
    parser = RequestParser()
    assert feed(parser, [CAT + b"I %d\r\n" % DEFAULT_MAX_FRAME_BYTES]) == [CAT_REQUEST]
    _, error = request_error(CAT + b"I %d\r\n" % (DEFAULT_MAX_FRAME_BYTES + 1), split_whole)
    assert error.code == "too-large"


def test_a_length_is_not_an_allocation() -> None:
    # A header announcing 16 MiB costs nothing until the bytes come.
    parser = RequestParser()
    assert feed(parser, [CAT, b"I %d\r\nab" % DEFAULT_MAX_FRAME_BYTES]) == [CAT_REQUEST, Input(b"ab")]
    assert parser.buffered == 0


@pytest.mark.parametrize(
    ("tail", "before"),
    [
        (b"I 5\r\nab", [Input(b"ab")]),
        (b"I 5\r\n", []),
        (b"I 5\r", []),
        (b"I 5", []),
        (b"I ", []),
        (b"I", []),
        (b"K", []),
        (b"K 2\r\n1", []),
        (b"K 2\r\n", []),
        (b"I 1\r\naI 3\r\nbc", [Input(b"abc")]),
    ],
)
def test_half_close_inside_a_frame(split: Split, tail: bytes, before: List[Any]) -> None:
    events, error = request_error(CAT + tail, split, eof=True)
    assert events == [CAT_REQUEST, *before]
    assert error.code == "bad-request"


@pytest.mark.parametrize(
    ("tail", "events"),
    [
        (b"", []),
        (b"I 2\r\nab", [Input(b"ab")]),
        (b"I 2\r\nabI 0\r\n", [Input(b"ab"), EndOfInput()]),
        (b"K 1\r\n2", [SignalRequest(2)]),
    ],
)
def test_half_close_at_a_frame_boundary(split: Split, tail: bytes, events: List[Any]) -> None:
    assert request_events(CAT + tail, split, eof=True) == [CAT_REQUEST, *events, EndOfStream()]


def test_end_of_stream_is_reported_once() -> None:
    parser = RequestParser()
    assert feed(parser, [CAT], eof=True) == [CAT_REQUEST, EndOfStream()]
    assert parser.next_event() is NEED_DATA
    assert parser.next_event() is NEED_DATA


# --------------------------------------------------------------------------
# Encoders, through the parsers

OPTIONAL_MEMBERS: Dict[str, Tuple[Any, Any]] = {
    # name: (value given to encode_request, value in the parsed Request)
    "cwd": ("/tmp/d\udcff", b"/tmp/d\xff"),
    "env": (
        {"A": "1", b"B\xff": b"\xfe", "PATH": "/usr/bin:/bin"},
        {b"A": b"1", b"B\xff": b"\xfe", b"PATH": b"/usr/bin:/bin"},
    ),
    "timeout": (2.5, 2.5),
    "stdin": ("null", "null"),
    "stdout": ("null", "null"),
    "stderr": ("stdout", "stdout"),
}
MEMBER_COMBINATIONS = [
    combo for n in range(len(OPTIONAL_MEMBERS) + 1) for combo in itertools.combinations(OPTIONAL_MEMBERS, n)
]


@pytest.mark.parametrize("program", ["cmd", "argv"])
@pytest.mark.parametrize("members", MEMBER_COMBINATIONS, ids="+".join)
def test_encode_request_round_trips(program: str, members: Tuple[str, ...]) -> None:
    kwargs: Dict[str, Any] = {name: OPTIONAL_MEMBERS[name][0] for name in members}
    expected: Dict[str, Any] = {name: OPTIONAL_MEMBERS[name][1] for name in members}
    if program == "cmd":
        kwargs["cmd"], expected["cmd"] = b"echo \xff; cat", b"echo \xff; cat"
    else:
        kwargs["argv"], expected["argv"] = ["ls", b"-l", "\udcfe"], (b"ls", b"-l", b"\xfe")
    data = encode_request(**kwargs)
    assert data.startswith(MAGIC) and data.endswith(TERMINATOR)
    assert data.count(b"\r") == 2 and data.count(b"\n") == 2  # the terminator's only
    assert request_events(data, random_split(len(members))) == [Request(**expected)]


def test_encode_request_leaves_defaults_out() -> None:
    data = encode_request(cmd="ls", stdin="pipe", stdout="pipe", stderr="pipe")
    assert data == b'ERRAND/1 {"cmd":"ls"}\r\n\r\n'


def test_encode_request_escapes_what_would_break_the_block() -> None:
    data = encode_request(cmd="a\r\n\r\nb\u2028\udcff", env={"X": "\n"})
    assert data.count(TERMINATOR) == 1 and data.endswith(TERMINATOR)
    assert max(data) < 0x80
    assert request_events(data, split_bytewise) == [
        Request(cmd=b"a\r\n\r\nb\xe2\x80\xa8\xff", env={b"X": b"\n"})
    ]


def test_encode_request_takes_paths() -> None:
    import pathlib

    data = encode_request(argv=[pathlib.Path("/bin/ls")], cwd=pathlib.Path("/tmp"))
    assert request_events(data, split_whole) == [Request(argv=(b"/bin/ls",), cwd=b"/tmp")]


def test_encode_status_request() -> None:
    assert request_events(encode_status_request(), split_bytewise, eof=True) == [
        Request(op="status"),
        EndOfStream(),
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"cmd": "ls", "argv": ["ls"]},
        {"cwd": "/"},
        {"cmd": "ls\0"},
        {"cmd": b"ls\0"},
        {"argv": ["ls", "a\0"]},
        {"argv": []},
        {"argv": [""]},
        {"argv": "ls"},
        {"argv": b"ls"},
        {"argv": ["ls", 1]},
        {"cmd": 1},
        {"cmd": "\ud800"},
        {"argv": ["ls", "\udc41"]},
        {"cmd": "ls", "cwd": "/\0"},
        {"cmd": "ls", "cwd": "\ud800"},
        {"cmd": "ls", "env": {"A=B": "1"}},
        {"cmd": "ls", "env": {"=A": "1"}},
        {"cmd": "ls", "env": {"": "1"}},
        {"cmd": "ls", "env": {b"": b"1"}},
        {"cmd": "ls", "env": {"A\0": "1"}},
        {"cmd": "ls", "env": {"A": "1\0"}},
        {"cmd": "ls", "env": {"A": 1}},
        {"cmd": "ls", "env": {"A": "\ud800"}},
        {"cmd": "ls", "timeout": 0},
        {"cmd": "ls", "timeout": 0.0},
        {"cmd": "ls", "timeout": -1},
        {"cmd": "ls", "timeout": float("nan")},
        {"cmd": "ls", "timeout": float("inf")},
        {"cmd": "ls", "timeout": float("-inf")},
        {"cmd": "ls", "timeout": True},
        {"cmd": "ls", "timeout": "5"},
        {"cmd": "ls", "stdin": "stdout"},
        {"cmd": "ls", "stdin": None},
        {"cmd": "ls", "stdout": "stdout"},
        {"cmd": "ls", "stdout": -1},
        {"cmd": "ls", "stderr": "stderr"},
        {"cmd": "ls", "stderr": "PIPE"},
    ],
    ids=repr,
)
def test_encode_request_refuses(kwargs: Dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_request(**kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ProtocolError)
    assert not isinstance(info.value, RemoteProtocolError)


def test_encode_request_refuses_a_huge_integer_timeout() -> None:
    with pytest.raises(LocalProtocolError):
        encode_request(cmd="ls", timeout=10**400)


def test_encode_request_and_parser_agree_on_empty_cwd() -> None:
    # Either side may change, but they must agree: the encoder refuses
    # what the parser refuses.
    try:
        encoded: Optional[bytes] = encode_request(cmd="ls", cwd="")
    except LocalProtocolError:
        encoded = None
    by_hand = extended(b'{"cmd": "ls", "cwd": ""}')
    try:
        parsed: Optional[List[Any]] = request_events(by_hand, split_whole)
    except RemoteProtocolError:
        parsed = None
    assert (encoded is None) == (parsed is None), (encoded, parsed)
    if encoded is not None:
        assert request_events(encoded, split_whole) == parsed == [Request(cmd=b"ls", cwd=b"")]


@pytest.mark.parametrize(
    ("command", "stdin"),
    [
        ("ls -al", b""),
        (b"cat", b"hello\nworld\r\n!"),
        ("echo caf\u00e9", b"\x00\xff\r"),
        (b"x\r", b"\r\n\r"),
        (b"a\r\nb", b"\n"),
        (b"echo \xff", b"\r\r\n\rx"),
        ("\udcff", b""),
    ],
)
def test_encode_simple_request_round_trips(split: Split, command: Any, stdin: bytes) -> None:
    cmd = command if isinstance(command, bytes) else command.encode("utf-8", "surrogateescape")
    data = encode_simple_request(command, stdin)
    assert data == cmd + TERMINATOR + stdin + TERMINATOR
    expected = [Request(cmd=cmd, simple=True), *([Input(stdin)] if stdin else []), EndOfInput()]
    assert request_events(data, split) == expected


@pytest.mark.parametrize(
    ("command", "stdin"),
    [
        ("", b""),
        (b"", b"x"),
        ("ls\0", b""),
        ("a\r\n\r\nb", b""),
        ("ls\r\n", b""),
        (b"ls\r\n\r\n", b""),
        ("ls", b"a\r\n\r\nb"),
        ("ls", b"a\r\n"),
        ("ls", b"\r\n"),
        ("ls", b"\r\n\r\n"),
        ('ERRAND/1 {"cmd":"ls"}', b""),
        ("ERRAND/2 x", b""),
        ("ERRAND/12 x", b""),
    ],
)
def test_encode_simple_request_refuses(command: Any, stdin: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        encode_simple_request(command, stdin)


def test_frame_encoders() -> None:
    assert frame(b"O", b"abc") == b"O 3\r\nabc"
    assert frame(b"O", b"") == b"O 0\r\n"
    assert frame_header(b"E", 1 << 30) == b"E 1073741824\r\n"
    assert input_frame(b"x\r\n") == b"I 3\r\nx\r\n"
    assert end_of_input_frame() == b"I 0\r\n"
    assert signal_frame(signal.SIGTERM) == b"K 2\r\n15"
    assert signal_frame(9) == b"K 1\r\n9"
    assert started_frame(41234) == b"P 5\r\n41234"
    assert exit_frame(3, "exit") == b'X 32\r\n{"returncode":3,"reason":"exit"}'


@pytest.mark.parametrize("signum", [0, -9, 32, 65, 99999])
def test_signal_frame_refuses(signum: int) -> None:
    with pytest.raises(LocalProtocolError):
        signal_frame(signum)


@pytest.mark.parametrize("pid", [0, -5])
def test_started_frame_refuses_what_the_parser_refuses(pid: int) -> None:
    with pytest.raises(LocalProtocolError):
        started_frame(pid)


def test_error_frame_extra_members_cannot_replace_the_code() -> None:
    try:
        data = error_frame("internal", "boom", error="teapot")
    except (LocalProtocolError, TypeError):
        return
    [failed] = reply_events(data, split_whole)
    assert failed.error == "internal"


def test_input_frame_refuses_empty() -> None:
    with pytest.raises(LocalProtocolError):
        input_frame(b"")


def test_exit_and_error_frames_refuse_unknown_words() -> None:
    with pytest.raises(LocalProtocolError):
        exit_frame(0, "finished")
    with pytest.raises(LocalProtocolError):
        error_frame("teapot", "short and stout")


def test_client_frame_encoders_round_trip(split: Split) -> None:
    data = (
        CAT + input_frame(b"ab") + signal_frame(signal.SIGINT) + input_frame(b"\r\n") + end_of_input_frame()
    )
    assert request_events(data, split, eof=True) == [
        CAT_REQUEST,
        Input(b"ab"),
        SignalRequest(signal.SIGINT),
        Input(b"\r\n"),
        EndOfInput(),
        EndOfStream(),
    ]


# --------------------------------------------------------------------------
# The client's side: ReplyParser

TRAILING = [b"", b"garbage", b"Z 1\r\nx", b"X 1\r\n{", b"\x00" * 64]


@pytest.fixture(params=TRAILING, ids=repr)
def trailing(request: Any) -> bytes:
    return request.param


def test_reply(split: Split, trailing: bytes) -> None:
    data = (
        started_frame(41234)
        + frame(b"O", b"hi\n")
        + frame(b"E", b"oops\n")
        + frame(b"O", b"more\r\n")
        + frame(b"O", b"!")
        + exit_frame(3, "exit", wall=0.25, cpu={"user": 0.1})
    )
    expected = [
        Started(41234),
        Output(1, b"hi\n"),
        Output(2, b"oops\n"),
        Output(1, b"more\r\n!"),
        Exited(3, "exit", {"returncode": 3, "reason": "exit", "wall": 0.25, "cpu": {"user": 0.1}}),
    ]
    assert reply_events(data + trailing, split) == expected
    assert reply_events(data + trailing, split, eof=True) == expected


def test_protocol_md_example(split: Split) -> None:
    data = b'P 5\r\n41234O 3\r\nhi\nE 5\r\noops\nX 35\r\n{"returncode": 3, "reason": "exit"}'
    assert reply_events(data, split, eof=True) == [
        Started(41234),
        Output(1, b"hi\n"),
        Output(2, b"oops\n"),
        Exited(3, "exit", {"returncode": 3, "reason": "exit"}),
    ]


def test_reply_parser_state() -> None:
    parser = ReplyParser()
    assert feed(parser, [started_frame(7)]) == [Started(7)]
    assert parser.pid == 7 and not parser.done
    assert feed(parser, [exit_frame(-9, "signal"), b"junk"]) == [
        Exited(-9, "signal", {"returncode": -9, "reason": "signal"})
    ]
    assert parser.done
    assert feed(parser, [b"more junk"], eof=True) == []
    assert parser.next_event() is NEED_DATA


@pytest.mark.parametrize("reason", ["exit", "signal", "timeout"])
def test_exit_reasons(split: Split, reason: str) -> None:
    assert reply_events(exit_frame(-15, reason), split) == [
        Exited(-15, reason, {"returncode": -15, "reason": reason})
    ]


def test_exit_frame_with_unknown_members_and_reason(split: Split) -> None:
    # Clients ignore what they do not know, a newer reason included.
    data = frame(b"X", b'{"reason":"oom","returncode":137,"new":[1,{"a":null}]}')
    assert reply_events(data, split) == [
        Exited(137, "oom", {"reason": "oom", "returncode": 137, "new": [1, {"a": None}]})
    ]


@pytest.mark.parametrize("code", ERROR_CODES)
def test_error_frames(split: Split, code: str) -> None:
    message = 'it failed:\n"quoted" caf\u00e9 \udcff'
    data = error_frame(code, message, errno=2)
    assert reply_events(data, split) == [
        Failed(code, message, {"error": code, "message": message, "errno": 2})
    ]


def test_error_frame_after_started(split: Split) -> None:
    data = started_frame(12) + frame(b"O", b"x") + error_frame("internal", "boom") + b"O 1\r\ny"
    assert reply_events(data, split, eof=True) == [
        Started(12),
        Output(1, b"x"),
        Failed("internal", "boom", {"error": "internal", "message": "boom"}),
    ]


def test_error_frame_with_an_unknown_code_and_no_message(split: Split) -> None:
    assert reply_events(b'! 17\r\n{"error":"newer"}', split) == [Failed("newer", "", {"error": "newer"})]


def test_status_frame(split: Split, trailing: bytes) -> None:
    info = {"workers": 2, "running": 0, "pid": 100, "version": "1.0", "nested": {"a": [1, 2.5, None, True]}}
    assert reply_events(status_frame(info) + trailing, split) == [StatusReply(info)]


def test_empty_output_frames_give_no_event(split: Split) -> None:
    data = frame(b"O", b"") + frame(b"E", b"") + frame(b"O", b"a") + frame(b"O", b"") + exit_frame(0, "exit")
    assert reply_events(data, split) == [
        Output(1, b"a"),
        Exited(0, "exit", {"returncode": 0, "reason": "exit"}),
    ]


def test_many_empty_output_frames() -> None:
    data = frame(b"O", b"") * 5000 + exit_frame(0, "exit")
    assert reply_events(data, split_whole) == [Exited(0, "exit", {"returncode": 0, "reason": "exit"})]


@pytest.mark.parametrize(
    ("data", "before"),
    [
        (b"Z 1\r\nx", []),
        (b"HTTP/1.1 200 OK\r\n", []),
        (b"\r\n", []),
        (b"p 1\r\n1", []),
        (b"I 1\r\nx", []),
        (b"K 1\r\n9", []),
        (started_frame(5) + b"Q 0\r\n", [Started(5)]),
        (frame(b"O", b"ab") + b"o 1\r\nx", [Output(1, b"ab")]),
        (b"O 01\r\nx", []),
        (b"O1\r\nx", []),
        (b"O 1\nx", []),
        (b"O -1\r\n", []),
        (b"O " + b"9" * 30, []),
        (b"P 1\r\n0", []),
        (b"P 2\r\n-1", []),
        (b"P 2\r\n01", []),
        (b"P 3\r\nabc", []),
        (b"P 0\r\n", []),
        (b"P 20\r\n" + b"9" * 20, []),
        (frame(b"X", b'{"reason":"exit"}'), []),
        (frame(b"X", b'{"returncode":0}'), []),
        (frame(b"X", b'{"returncode":"0","reason":"exit"}'), []),
        (frame(b"X", b'{"returncode":true,"reason":"exit"}'), []),
        (frame(b"X", b'{"returncode":0.0,"reason":"exit"}'), []),
        (frame(b"X", b'{"returncode":0,"reason":null}'), []),
        (frame(b"X", b'{"returncode":null,"reason":"exit"}'), []),
        (b"X 2\r\n[]", []),
        (b"X 1\r\n0", []),
        (b"X 0\r\n", []),
        (b"X 3\r\n{\xff}", []),
        (frame(b"!", b'{"message":"x"}'), []),
        (frame(b"!", b'{"error":1}'), []),
        (frame(b"!", b'{"error":null,"message":"x"}'), []),
        (b"S 2\r\n[]", []),
        (b"S 4\r\nnull", []),
        (b"S 1\r\n{", []),
        (b"S 7\r\n" + b"[" * 7, []),
    ],
)
def test_reply_protocol_errors(split: Split, data: bytes, before: List[Any]) -> None:
    events, _ = reply_error(data, split)
    assert events == before


def test_deeply_nested_reply_object() -> None:
    payload = b"[" * 100_000 + b"]" * 100_000
    events, _ = reply_error(frame(b"S", payload), split_whole)
    assert events == []


@pytest.mark.parametrize(
    ("data", "before"),
    [
        (b"", []),
        (b"P", []),
        (b"P 5\r\n412", []),
        (started_frame(41234), [Started(41234)]),
        (started_frame(41234) + b"O 5\r\nab", [Started(41234), Output(1, b"ab")]),
        (started_frame(41234) + frame(b"E", b"ab"), [Started(41234), Output(2, b"ab")]),
        (exit_frame(3, "exit")[:-1], []),
        (b"S 5\r\n", []),
    ],
)
def test_reply_end_of_stream_before_the_last_frame(split: Split, data: bytes, before: List[Any]) -> None:
    events, error = reply_error(data, split, eof=True)
    assert events == before
    assert "closed" in error.message


def test_reply_frame_limits() -> None:
    assert reply_events(frame(b"O", b"1234567890"), split_whole, max_frame_bytes=10) == [
        Output(1, b"1234567890")
    ]
    events: List[Any] = []
    with pytest.raises(RemoteProtocolError) as info:
        feed(ReplyParser(max_frame_bytes=10), [b"E 11\r\n"], into=events)
    assert info.value.code == "too-large"
    # X, !, S and P are collected whole, so they have a fixed cap.
    with pytest.raises(RemoteProtocolError) as info:
        feed(ReplyParser(), [frame_header(b"X", MAX_SMALL_PAYLOAD + 1)])
    assert info.value.code == "too-large"
    assert feed(ReplyParser(), [frame_header(b"S", MAX_SMALL_PAYLOAD)]) == []


def test_big_output_frame_is_streamed() -> None:
    payload = random.Random(11).randbytes(1 << 20)
    data = frame(b"O", payload) + exit_frame(0, "exit")
    parser = ReplyParser()
    header_len = len(frame_header(b"O", len(payload)))
    got: List[bytes] = []
    for i in range(0, len(data), 1000):
        chunk = data[i : i + 1000]
        events = feed(parser, [chunk])
        outputs = [e.data for e in events if isinstance(e, Output)]
        assert all(isinstance(e, Output) and e.fd == 1 for e in events[: len(outputs)])
        # Nothing is held back: what arrived of the payload is handed on.
        arrived = data[max(i, header_len) : min(i + 1000, header_len + len(payload))]
        assert b"".join(outputs) == arrived
        got.extend(outputs)
    assert b"".join(got) == payload
    assert len(got) > 1000
    assert parser.done


# --------------------------------------------------------------------------
# Properties

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FRAGMENTS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b"ERRAND/1 ",
    b"ERRAND/2 ",
    b'{"cmd":"x"}',
    b'{"op":"status"}',
    b'{"argv":["a","\\udcff"],"timeout":1,"env":{"A":"b"}}',
    b'{"cmd":"\\ud800"}',
    b"I ",
    b"K ",
    b"I 0\r\n",
    b"I 3\r\n",
    b"I 1\r\n",
    b"K 1\r\n9",
    b"K 2\r\n15",
    b"K 2\r\n99",
    b"0",
    b"1",
    b"9",
    b"\x00",
    b" ",
    b"ls",
    b"[",
    b"]",
]
PREFIXES = [b"", CAT, encode_status_request(), b"ls\r\n\r\n", b"ls\r\n\r\nab", MAGIC, b"ERRAND/1 {"]
request_like_bytes = st.one_of(
    st.binary(max_size=40),
    st.tuples(
        st.sampled_from(PREFIXES),
        st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=3)), max_size=20).map(b"".join),
    ).map(b"".join),
)
LIMITS = [{}, {"max_request_bytes": 24, "max_frame_bytes": 2}]


def outcome(
    parser_class: Any, chunks: List[bytes], eof: bool, limits: Dict[str, int]
) -> Tuple[List[Any], Any]:
    """Normalised events, and the protocol error's code if one was raised."""
    events: List[Any] = []
    try:
        feed(parser_class(**limits), chunks, eof=eof, into=events)
    except RemoteProtocolError as exc:
        assert exc.code in ("bad-request", "too-large")
        return normalise(events), exc.code
    return normalise(events), None


def draw_split(data_strategy: Any, data: bytes) -> List[bytes]:
    cuts = sorted(set(data_strategy.draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=10))))
    bounds = [0, *(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@PROPERTY_SETTINGS
@given(data=request_like_bytes, eof=st.booleans(), limits=st.sampled_from(LIMITS), draw=st.data())
def test_any_bytes_parse_or_raise_the_protocol_error(
    data: bytes, eof: bool, limits: Dict[str, int], draw: Any
) -> None:
    whole = outcome(RequestParser, split_whole(data), eof, limits)
    assert outcome(RequestParser, draw_split(draw, data), eof, limits) == whole
    assert outcome(RequestParser, split_bytewise(data), eof, limits) == whole


@PROPERTY_SETTINGS
@given(
    data=request_like_bytes.map(lambda b: b.replace(b"I", b"O").replace(b"K", b"X")),
    eof=st.booleans(),
    draw=st.data(),
)
def test_any_bytes_to_the_reply_parser(data: bytes, eof: bool, draw: Any) -> None:
    whole = outcome(ReplyParser, split_whole(data), eof, {})
    assert outcome(ReplyParser, draw_split(draw, data), eof, {}) == whole
    assert outcome(ReplyParser, split_bytewise(data), eof, {}) == whole


def to_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


no_nul_bytes = st.binary(max_size=12).map(lambda b: b.replace(b"\0", b""))
wire_text = st.one_of(
    st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=12),
    no_nul_bytes.map(lambda b: b.decode("utf-8", "surrogateescape")),  # lone \udcXX escapes
    no_nul_bytes,
)
nonempty_wire_text = wire_text.filter(lambda v: len(v) > 0)
env_names = nonempty_wire_text.filter(lambda v: b"=" not in to_bytes(v))


pass_fds_lists = st.lists(st.integers(min_value=3, max_value=1023), unique=True, max_size=MAX_PASS_FDS)


@st.composite
def run_requests(draw: Any) -> Tuple[Dict[str, Any], Request]:
    kwargs: Dict[str, Any] = {}
    expected: Dict[str, Any] = {}
    if draw(st.booleans()):
        kwargs["cmd"] = draw(wire_text)
        expected["cmd"] = to_bytes(kwargs["cmd"])
    else:
        kwargs["argv"] = [draw(nonempty_wire_text), *draw(st.lists(wire_text, max_size=3))]
        expected["argv"] = tuple(to_bytes(a) for a in kwargs["argv"])
    if draw(st.booleans()):
        kwargs["cwd"] = draw(nonempty_wire_text)
        expected["cwd"] = to_bytes(kwargs["cwd"])
    if draw(st.booleans()):
        kwargs["env"] = draw(st.dictionaries(env_names, wire_text, max_size=3))
        expected["env"] = {to_bytes(k): to_bytes(v) for k, v in kwargs["env"].items()}
    if draw(st.booleans()):
        kwargs["timeout"] = draw(
            st.one_of(
                st.floats(min_value=1e-9, max_value=1e12, allow_nan=False, allow_infinity=False),
                st.integers(min_value=1, max_value=10**12),
            )
        )
        expected["timeout"] = float(kwargs["timeout"])
    for name, choices in (
        ("stdin", ("pipe", "null", "fd")),
        ("stdout", ("pipe", "null", "fd")),
        ("stderr", ("pipe", "stdout", "null", "fd")),
    ):
        if draw(st.booleans()):
            kwargs[name] = expected[name] = draw(st.sampled_from(choices))
    if draw(st.booleans()):
        kwargs["pass_fds"] = draw(pass_fds_lists)
        expected["pass_fds"] = tuple(kwargs["pass_fds"])
    return kwargs, Request(**expected)


client_frames = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=40).map(lambda b: ("I", b)),
        st.sampled_from(SIGNALS).map(lambda s: ("K", s)),
    ),
    max_size=6,
)


@PROPERTY_SETTINGS
@given(request=run_requests(), frames=client_frames, close=st.booleans(), eof=st.booleans(), draw=st.data())
def test_extended_requests_round_trip(
    request: Tuple[Dict[str, Any], Request], frames: List[Tuple[str, Any]], close: bool, eof: bool, draw: Any
) -> None:
    kwargs, expected_request = request
    data = encode_request(**kwargs)
    expected: List[Any] = [expected_request]
    for kind, value in frames:
        if kind == "I":
            data += input_frame(value)
            expected.append(Input(value))
        else:
            data += signal_frame(value)
            expected.append(SignalRequest(value))
    if close:
        data += end_of_input_frame()
        expected.append(EndOfInput())
    if eof:
        expected.append(EndOfStream())
    expected = normalise(expected)
    assert outcome(RequestParser, draw_split(draw, data), eof, {}) == (expected, None)


@PROPERTY_SETTINGS
@given(
    command=st.one_of(st.binary(max_size=20), wire_text),
    stdin=st.binary(max_size=40),
    eof=st.booleans(),
    draw=st.data(),
)
def test_simple_requests_round_trip(command: Any, stdin: bytes, eof: bool, draw: Any) -> None:
    cmd = to_bytes(command)
    try:
        data = encode_simple_request(command, stdin)
    except LocalProtocolError:
        # Refused only for what the simple form cannot carry.
        assert (
            not cmd
            or b"\0" in cmd
            or cmd.startswith(b"ERRAND/")
            or any(TERMINATOR in part or part.endswith(b"\r\n") for part in (cmd, stdin))
        )
        return
    expected = [Request(cmd=cmd, simple=True), *([Input(stdin)] if stdin else []), EndOfInput()]
    if eof:
        expected.append(EndOfStream())
    assert outcome(RequestParser, draw_split(draw, data), eof, {}) == (expected, None)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_objects = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        json_scalars,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
        max_leaves=6,
    ),
    max_size=4,
)
messages = st.one_of(st.text(max_size=30), no_nul_bytes.map(lambda b: b.decode("utf-8", "surrogateescape")))


@st.composite
def replies(draw: Any) -> Tuple[bytes, List[Any]]:
    data, events = b"", []
    ending = draw(st.sampled_from(["exit", "error", "status"]))
    if ending == "status":
        info = draw(json_objects)
        return status_frame(info), [StatusReply(info)]
    if ending == "exit" or draw(st.booleans()):
        pid = draw(st.integers(min_value=1, max_value=2**22))
        data += started_frame(pid)
        events.append(Started(pid))
    if events:
        for fd, chunk in draw(
            st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(max_size=50)), max_size=8)
        ):
            data += frame(b"O" if fd == 1 else b"E", chunk)
            if chunk:
                events.append(Output(fd, chunk))
    if ending == "exit":
        returncode = draw(st.integers(min_value=-64, max_value=255))
        reason = draw(st.sampled_from(["exit", "signal", "timeout"]))
        extra = draw(
            json_objects.map(lambda d: {k: v for k, v in d.items() if k not in ("returncode", "reason")})
        )
        data += exit_frame(returncode, reason, **extra)
        events.append(Exited(returncode, reason, {"returncode": returncode, "reason": reason, **extra}))
    else:
        code = draw(st.sampled_from(ERROR_CODES))
        message = draw(messages)
        extra = draw(
            st.dictionaries(st.sampled_from(["errno", "filename", "limit"]), json_scalars, max_size=2)
        )
        data += error_frame(code, message, **extra)
        events.append(Failed(code, message, {"error": code, "message": message, **extra}))
    return data, events


@PROPERTY_SETTINGS
@given(reply=replies(), trailing=st.binary(max_size=20), eof=st.booleans(), draw=st.data())
def test_replies_round_trip(reply: Tuple[bytes, List[Any]], trailing: bytes, eof: bool, draw: Any) -> None:
    data, expected = reply
    data += trailing
    assert outcome(ReplyParser, draw_split(draw, data), eof, {}) == (normalise(expected), None)
    assert outcome(ReplyParser, split_bytewise(data), eof, {}) == (normalise(expected), None)


# --------------------------------------------------------------------------
# Descriptors (revision 2): "fd" streams and pass_fds

FD_REQUESTS = [
    (b'{"cmd":"x","stdin":"fd"}', Request(cmd=b"x", stdin="fd"), (0,)),
    (b'{"cmd":"x","stdout":"fd"}', Request(cmd=b"x", stdout="fd"), (1,)),
    (b'{"cmd":"x","stderr":"fd"}', Request(cmd=b"x", stderr="fd"), (2,)),
    (b'{"cmd":"x","stdout":"fd","stderr":"stdout"}', Request(cmd=b"x", stdout="fd", stderr="stdout"), (1,)),
    (
        b'{"cmd":"x","stderr":"fd","stdin":"fd","stdout":"fd"}',
        Request(cmd=b"x", stdin="fd", stdout="fd", stderr="fd"),
        (0, 1, 2),
    ),
    (b'{"cmd":"x","pass_fds":[]}', Request(cmd=b"x"), ()),
    (b'{"cmd":"x","pass_fds":[9,3,1023]}', Request(cmd=b"x", pass_fds=(9, 3, 1023)), (9, 3, 1023)),
    (
        b'{"argv":["cat"],"pass_fds":[5],"stdout":"fd","stdin":"null"}',
        Request(argv=(b"cat",), stdin="null", stdout="fd", pass_fds=(5,)),
        (1, 5),
    ),
    (
        b'{"cmd":"x","pass_fds":[' + b",".join(b"%d" % n for n in range(100, 100 + MAX_PASS_FDS)) + b"]}",
        Request(cmd=b"x", pass_fds=tuple(range(100, 100 + MAX_PASS_FDS))),
        tuple(range(100, 100 + MAX_PASS_FDS)),
    ),
]


@pytest.mark.parametrize(("payload", "request_", "targets"), FD_REQUESTS)
def test_descriptor_members(
    split: Split, payload: bytes, request_: Request, targets: Tuple[int, ...]
) -> None:
    assert request_events(extended(payload), split) == [request_]
    # ... with the frames that follow the block as trailing data
    tail = b"I 3\r\nabcK 2\r\n15I 0\r\n"
    assert request_events(extended(payload) + tail, split, eof=True) == [
        request_, Input(b"abc"), SignalRequest(15), EndOfInput(), EndOfStream(),
    ]  # fmt: skip
    assert request_.fd_targets == targets
    assert request_.fd_count == len(targets)


@pytest.mark.parametrize(
    "request_",
    [
        Request(cmd=b"x"),
        Request(cmd=b"x", simple=True),
        Request(op="status"),
        Request(cmd=b"x", stdin="null", stderr="stdout"),
    ],
    ids=repr,
)
def test_requests_without_descriptors(request_: Request) -> None:
    assert request_.fd_targets == ()
    assert request_.fd_count == 0


def test_simple_form_takes_no_descriptors(split: Split) -> None:
    # The simple form cannot ask for any: its requests say so.
    [request] = request_events(b"ls\r\n\r\n", split)[:1]
    assert request.simple and request.fd_count == 0


def test_the_limit_on_descriptors() -> None:
    assert MAX_PASS_FDS >= 16  # what the protocol asks of every server
    assert MAX_FDS == 3 + MAX_PASS_FDS
    # One SCM_RIGHTS message carries at most 253 descriptors on Linux.
    assert MAX_FDS <= 253


BAD_PASS_FDS = [
    b'"3"',
    b"3",
    b"null",
    b"{}",
    b'{"3":3}',
    b"[[3]]",
    b'["3"]',
    b"[null]",
    b"[true]",
    b"[false]",
    b"[3.0]",
    b"[3.5]",
    b"[1e1]",
    b"[0]",
    b"[1]",
    b"[2]",
    b"[-3]",
    b"[1024]",
    b"[99999999999999999999999]",
    b"[3,3]",
    b"[3,4,5,4]",
    b"[" + b",".join(b"%d" % n for n in range(3, 4 + MAX_PASS_FDS)) + b"]",  # one too many
]


@pytest.mark.parametrize("value", BAD_PASS_FDS, ids=lambda v: repr(v[:30]))
def test_bad_pass_fds_are_named(split: Split, value: bytes) -> None:
    events, error = request_error(extended(b'{"cmd":"x","pass_fds":' + value + b"}"), split)
    assert events == []
    assert error.code == "bad-request"
    assert "'pass_fds'" in error.message


@pytest.mark.parametrize("value", [b"[]", b"[3]"])
def test_status_takes_no_pass_fds(split: Split, value: bytes) -> None:
    _, error = request_error(extended(b'{"op":"status","pass_fds":' + value + b"}"), split)
    assert error.code == "bad-request" and "'pass_fds'" in error.message


@pytest.mark.parametrize(
    ("payload", "member"),
    [
        (b'{"cmd":"x","stdin":"FD"}', "stdin"),
        (b'{"cmd":"x","stdout":"fds"}', "stdout"),
        (b'{"cmd":"x","stderr":"Fd"}', "stderr"),
        (b'{"cmd":"x","stdin":3}', "stdin"),
        (b'{"cmd":"x","stdout":{"fd":1}}', "stdout"),
        (b'{"cmd":"x","pass_fd":[3]}', "pass_fd"),
        (b'{"cmd":"x","fds":[3]}', "fds"),
    ],
)
def test_bad_descriptor_members_are_named(split: Split, payload: bytes, member: str) -> None:
    events, error = request_error(extended(payload), split)
    assert events == [] and error.code == "bad-request"
    assert f"'{member}'" in error.message


def test_encode_request_with_descriptors() -> None:
    data = encode_request(cmd="x", stdin="fd", stdout="fd", stderr="stdout", pass_fds=[7, 3])
    payload = b'{"cmd":"x","stdin":"fd","stdout":"fd","stderr":"stdout","pass_fds":[7,3]}'
    assert data == MAGIC + payload + TERMINATOR
    [request] = request_events(data, split_bytewise)
    assert request.fd_targets == (0, 1, 7, 3)
    assert encode_request(cmd="x", pass_fds=()) == b'ERRAND/1 {"cmd":"x"}\r\n\r\n'
    assert encode_request(cmd="x", pass_fds=range(3, 5)).endswith(b'"pass_fds":[3,4]}\r\n\r\n')


@pytest.mark.parametrize(
    "pass_fds",
    [[2], [1024], [3, 3], [True], [3.0], ["3"], "3", b"3", 3, None, list(range(3, 4 + MAX_PASS_FDS))],
    ids=repr,
)
def test_encode_request_refuses_bad_pass_fds(pass_fds: Any) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_request(cmd="x", pass_fds=pass_fds)
    assert "pass_fds" in str(info.value)


pass_fds_values = st.one_of(
    pass_fds_lists.map(list),
    st.lists(
        st.one_of(st.integers(-5, 1100), st.booleans(), st.floats(allow_nan=False), st.text(max_size=2))
    ),
    json_scalars,
)


@PROPERTY_SETTINGS
@given(value=pass_fds_values, draw=st.data())
def test_any_pass_fds_parse_or_are_named(value: Any, draw: Any) -> None:
    data = extended(b'{"cmd":"x","pass_fds":' + json.dumps(value).encode() + b"}")
    events, code = outcome(RequestParser, draw_split(draw, data), False, {})
    valid = (
        isinstance(value, list)
        and len(value) <= MAX_PASS_FDS
        and len(set(map(repr, value))) == len(value)
        and all(type(n) is int and 3 <= n <= 1023 for n in value)
    )
    if valid:
        assert code is None and events == [Request(cmd=b"x", pass_fds=tuple(value))]
        assert events[0].fd_targets == tuple(value)
    else:
        assert code == "bad-request" and events == []
    assert outcome(RequestParser, split_bytewise(data), False, {}) == (events, code)
