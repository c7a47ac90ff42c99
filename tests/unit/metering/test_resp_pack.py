"""The limits store packs its own Redis commands (metering.redislimits.pack): byte for byte
what redis-py's own packer sends, for every argument the store passes (str, int, bytes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer

from metering.redislimits import pack

ARG = st.one_of(st.text(max_size=40), st.integers(-(2**70), 2**70), st.binary(max_size=40),
                st.binary(min_size=6000, max_size=7000))  # over redis-py's buffer cutoff
REDIS_PY = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


@given(st.sampled_from(["EVALSHA", "SCRIPT"]), st.lists(ARG, max_size=10))
def test_a_command_is_packed_as_redis_py_packs_it(name: str, args: list[object]) -> None:
    command = (name, *args)
    assert pack(command) == b"".join(REDIS_PY.pack(*command))


@pytest.mark.parametrize("arg", [1.5, True, None, [1]])
def test_an_argument_redis_cannot_take_exactly_is_refused(arg: object) -> None:
    with pytest.raises(TypeError):
        pack(("EVALSHA", "x", 1, "k", arg))
