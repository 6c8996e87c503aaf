from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rpc.errors import CODE_DECODE, FrameDecodeError, FrameTooLarge
from rpc.framing import (
    NEED_DATA,
    LineDecoder,
    NeedData,
    encode,
    encode_error,
    encode_event,
    encode_result,
)

FRAMES: list[dict[str, Any]] = [
    {"id": 1, "method": "cni.add", "params": {"env": {"CNI_COMMAND": "ADD"}}},
    {"id": 2, "method": "agent.status", "params": {}},
    {"id": 3, "method": "x", "params": {"s": "é ✓ \n inside a string"}},
]


def drain(decoder: LineDecoder) -> list[dict[str, Any] | NeedData]:
    """Every message available now, then the NEED_DATA that ended the run."""
    out: list[dict[str, Any] | NeedData] = []
    while True:
        message = decoder.next_message()
        out.append(message)
        if message is NEED_DATA:
            return out


def test_empty_decoder_needs_data() -> None:
    assert LineDecoder().next_message() is NEED_DATA


def test_byte_by_byte() -> None:
    decoder = LineDecoder()
    wire = b"".join(encode(f) for f in FRAMES)
    got: list[dict[str, Any] | NeedData] = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        got.extend(m for m in drain(decoder) if m is not NEED_DATA)
    assert got == FRAMES


def test_coalesced_frames_in_one_chunk() -> None:
    decoder = LineDecoder()
    decoder.feed(b"".join(encode(f) for f in FRAMES))
    assert drain(decoder) == [*FRAMES, NEED_DATA]


def test_frame_split_across_chunks() -> None:
    decoder = LineDecoder()
    wire = encode(FRAMES[0]) + encode(FRAMES[1])
    cut = len(encode(FRAMES[0])) + 5
    decoder.feed(wire[:7])
    assert decoder.next_message() is NEED_DATA
    decoder.feed(wire[7:cut])
    assert drain(decoder) == [FRAMES[0], NEED_DATA]
    decoder.feed(wire[cut:])
    assert drain(decoder) == [FRAMES[1], NEED_DATA]


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_any_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    wire = b"".join(encode(f) for f in FRAMES)
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    decoder = LineDecoder()
    got: list[dict[str, Any] | NeedData] = []
    for start, end in itertools.pairwise(bounds):
        decoder.feed(wire[start:end])
        got.extend(m for m in drain(decoder) if m is not NEED_DATA)
    assert got == FRAMES


def test_crlf_and_blank_lines() -> None:
    decoder = LineDecoder()
    decoder.feed(b'\n\r\n  \n{"id":1}\r\n\r\n{"id":2}\n')
    assert drain(decoder) == [{"id": 1}, {"id": 2}, NEED_DATA]


def line_of(size: int) -> bytes:
    """A JSON object line of exactly ``size`` bytes, without the newline."""
    head = b'{"pad":"'
    tail = b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_exactly_max_size_is_accepted(terminator: bytes) -> None:
    decoder = LineDecoder(max_size=64)
    line = line_of(64)
    # The unterminated line, then its terminator byte by byte: never too large on the way.
    decoder.feed(line)
    assert decoder.next_message() is NEED_DATA
    for byte in terminator:
        decoder.feed(bytes([byte]))
        message = decoder.next_message()
    assert message == orjson.loads(line)


def test_one_byte_over_raises_frame_too_large() -> None:
    decoder = LineDecoder(max_size=64)
    decoder.feed(line_of(65) + b"\n")
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_message()
    assert info.value.limit == 64
    assert info.value.code == CODE_DECODE
    assert info.value.msg == "request too large"


def test_too_large_before_any_newline() -> None:
    decoder = LineDecoder(max_size=64)
    decoder.feed(b"x" * 64)
    assert decoder.next_message() is NEED_DATA
    decoder.feed(b"x")
    with pytest.raises(FrameTooLarge):
        decoder.next_message()


def test_decoder_is_unusable_after_frame_too_large() -> None:
    decoder = LineDecoder(max_size=8)
    decoder.feed(b"x" * 9)
    with pytest.raises(FrameTooLarge):
        decoder.next_message()
    decoder.feed(b'\n{"id":1}\n')
    with pytest.raises(FrameTooLarge):
        decoder.next_message()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"id":1,"s":"\xff\xfe"}', "UTF-8"),
        (b'{"id":1,', ""),
        (b"not json", ""),
        (b"[1,2]", "got an array"),
        (b"42", "got a number"),
        (b'"s"', "got a string"),
        (b"null", "got null"),
        (b"true", "got a boolean"),
    ],
)
def test_bad_line_raises_and_decoder_continues(line: bytes, reason: str) -> None:
    decoder = LineDecoder()
    decoder.feed(line + b'\n{"id":2}\n')
    with pytest.raises(FrameDecodeError) as info:
        decoder.next_message()
    assert reason in info.value.reason
    assert info.value.code == CODE_DECODE
    assert drain(decoder) == [{"id": 2}, NEED_DATA]


def test_encode_result_is_canonical() -> None:
    assert encode_result(1, {"cniVersion": "1.0.0", "ips": []}) == (
        b'{"id":1,"result":{"cniVersion":"1.0.0","ips":[]}}\n'
    )
    assert encode_result(7, None) == b'{"id":7,"result":null}\n'
    assert encode_result(1, {"z": 1, "a": 2}).startswith(b'{"id":1,"result":')


def test_encode_error_and_event() -> None:
    assert encode_error(3, 11, "deadline exceeded", "cni.add") == (
        b'{"id":3,"error":{"code":11,"msg":"deadline exceeded","details":"cni.add"}}\n'
    )
    assert encode_error(None, 6, "invalid request") == (
        b'{"id":null,"error":{"code":6,"msg":"invalid request","details":""}}\n'
    )
    assert encode_event(4, {"kind": "add"}) == b'{"id":4,"event":{"kind":"add"}}\n'


def test_encoded_lines_decode_back() -> None:
    decoder = LineDecoder()
    decoder.feed(encode_result(1, [1, "a"]) + encode_error(2, 999, "boom") + encode_event(3, 5))
    assert drain(decoder) == [
        {"id": 1, "result": [1, "a"]},
        {"id": 2, "error": {"code": 999, "msg": "boom", "details": ""}},
        {"id": 3, "event": 5},
        NEED_DATA,
    ]
