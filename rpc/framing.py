"""Line framing of the agent's wire protocol, with no I/O.

Theory of operation: the socket carries one JSON object per ``\\n``-terminated UTF-8 line, in
both directions. ``LineDecoder`` is fed whatever bytes arrived (``feed``) and hands out complete
objects (``next_message``), or ``NEED_DATA`` when the buffer holds no complete line. The shell
that owns the socket loops: ``next_message``; on ``NEED_DATA`` read and ``feed``. A bad line
(``FrameDecodeError``) costs only that line; an overlong one (``FrameTooLarge``) leaves the
stream unsynchronised, so the decoder refuses to go on and the shell closes the connection.

Replies are canonical bytes: ``{"id":<id>,"result":<result>}`` with keys in that order and
orjson's compact separators. The CNI plugin, which must start fast and uses only the standard
library, relies on this: it checks that a reply starts with exactly ``{"id":1,"result":`` and
slices the result's bytes out (up to the closing ``}\\n``) to print them as its own stdout,
without parsing JSON. Do not change the key order or spacing of ``encode_result``.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import orjson

from rpc.errors import FrameDecodeError, FrameTooLarge

__all__ = [
    "NEED_DATA",
    "LineDecoder",
    "NeedData",
    "encode",
    "encode_error",
    "encode_event",
    "encode_result",
]

DEFAULT_MAX_SIZE: Final = 1 << 20


class NeedData(enum.Enum):
    """Type of the ``NEED_DATA`` sentinel (an enum so that type checkers can narrow on it)."""

    NEED_DATA = enum.auto()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class LineDecoder:
    """Splits a byte stream into JSON objects, one per line, at most ``max_size`` bytes each.

    The limit counts a line's content without its ``\\n`` or ``\\r\\n`` terminator.
    """

    __slots__ = ("_broken", "_buffer", "_max_size", "_scanned")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._max_size = max_size
        self._buffer = bytearray()
        # Bytes at the head of the buffer already known to hold no newline: feeding a long
        # line byte by byte must not rescan it every time.
        self._scanned = 0
        self._broken = False

    def __repr__(self) -> str:
        state = "broken" if self._broken else f"{len(self._buffer)} bytes buffered"
        return f"<LineDecoder {state}, max_size={self._max_size}>"

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held (0 once broken)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer. Returns nothing; never raises."""
        if not self._broken:
            self._buffer += data

    def next_message(self) -> dict[str, Any] | NeedData:
        """Return the next complete JSON object, or ``NEED_DATA`` if no full line is buffered.

        Raises FrameDecodeError for a line that is not UTF-8, not JSON, or not an object (the
        line is dropped; call again for the next one), and FrameTooLarge when a line, complete
        or not, exceeds ``max_size`` (then and ever after: the stream cannot be resynchronised).
        """
        while True:
            if self._broken:
                raise FrameTooLarge(self._max_size)
            end = self._buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buffer)
                # One byte of slack for the "\r" of a "\r\n" whose "\n" has not arrived yet.
                slack = 1 if self._buffer.endswith(b"\r") else 0
                if len(self._buffer) > self._max_size + slack:
                    self._fail()
                return NEED_DATA
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self._max_size:
                self._fail()
            if not line.strip():
                continue
            return _parse(line)

    def _fail(self) -> None:
        self._broken = True
        self._buffer.clear()
        raise FrameTooLarge(self._max_size)


def _parse(line: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        # orjson reports invalid UTF-8 as a JSONDecodeError too; its message says which.
        raise FrameDecodeError(str(e)) from None
    if not isinstance(obj, dict):
        raise FrameDecodeError(f"expected a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(obj: object) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    if isinstance(obj, int | float):
        return "a number"
    if isinstance(obj, str):
        return "a string"
    return "an array"


def encode(obj: Any) -> bytes:
    """Return ``obj`` as one compact JSON line. Raises TypeError if it is not JSON-able."""
    return orjson.dumps(obj) + b"\n"


def encode_result(id: int | None, result: Any) -> bytes:
    """Return the canonical success reply ``{"id":<id>,"result":<result>}\\n``.

    Raises TypeError if ``result`` is not JSON-able.
    """
    # orjson keeps dict insertion order; the CNI plugin depends on "id" coming first.
    return orjson.dumps({"id": id, "result": result}) + b"\n"


def encode_error(id: int | None, code: int, msg: str, details: str = "") -> bytes:
    """Return the error reply ``{"id":<id>,"error":{"code":..,"msg":..,"details":..}}\\n``."""
    return orjson.dumps({"id": id, "error": {"code": code, "msg": msg, "details": details}}) + b"\n"


def encode_event(id: int, event: Any) -> bytes:
    """Return one item of a streaming reply, ``{"id":<id>,"event":<event>}\\n``.

    Raises TypeError if ``event`` is not JSON-able.
    """
    return orjson.dumps({"id": id, "event": event}) + b"\n"
