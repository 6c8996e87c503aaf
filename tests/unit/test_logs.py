"""The JSON log format: one object per line, call-site fields at the top level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from agent.logs import JsonFormatter


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("podwire.test_logs")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.handlers.clear()


def test_one_json_object_per_line_with_fields_at_the_top(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    logger.info("ADD", extra={"key": "podwire/abc/eth0", "duration_ms": 12.5})
    logger.warning(
        "DEL failed\nsecond line", extra={"key": "podwire/def/eth0", "code": 11, "ip": object()}
    )
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("crashed", extra={"service": "rpc"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # a newline in a message or a traceback never splits an event
    events = [json.loads(line) for line in lines]
    assert all(isinstance(e, dict) for e in events)
    first = events[0]
    assert first["level"] == "info" and first["msg"] == "ADD"
    assert first["logger"] == "podwire.test_logs"
    assert first["key"] == "podwire/abc/eth0" and first["duration_ms"] == 12.5
    assert first["ts"].endswith("Z")
    assert set(first) == {"ts", "level", "logger", "msg", "key", "duration_ms"}
    second = events[1]
    assert second["level"] == "warning" and second["msg"] == "DEL failed\nsecond line"
    assert second["code"] == 11 and second["ip"].startswith("<object")  # str() of the unknown
    third = events[2]
    assert third["level"] == "error" and third["service"] == "rpc"
    assert "ValueError: boom" in third["exc"]
