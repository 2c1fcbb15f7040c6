"""The server's X frame, written without the JSON encoder, is the encoder's."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from errand_boy.exceptions import LocalProtocolError
from errand_boy.protocol import EXIT_REASONS, exit_frame, timed_exit_frame

_SECONDS = st.floats(min_value=0, allow_nan=False, allow_infinity=False)


@given(st.integers(-255, 255), st.sampled_from(EXIT_REASONS), _SECONDS, _SECONDS)
def test_timed_exit_frame_is_exit_frame(returncode: int, reason: str, duration: float, cpu: float) -> None:
    assert timed_exit_frame(returncode, reason, duration, cpu) == exit_frame(
        returncode, reason, duration=duration, cpu=cpu
    )


def test_timed_exit_frame_refuses_what_exit_frame_refuses() -> None:
    with pytest.raises(LocalProtocolError):
        timed_exit_frame(0, "finished", 0.1, 0.1)
    with pytest.raises(ValueError):
        timed_exit_frame(0, "exit", math.inf, 0.1)
    with pytest.raises(ValueError):
        timed_exit_frame(0, "exit", 0.1, math.nan)
