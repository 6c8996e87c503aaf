"""Fault injection per EC2 action: throttling, server errors, latency, slow attaches.

``FaultPlan.decide(action)`` is the whole policy: it consumes one planned fault and returns what
the server must do (wait, then answer an EC2 error instead of calling moto). Latency applies to
every call of the action; throttles and errors are counted down, throttles first.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from xml.sax.saxutils import escape

import attrs

_ERROR_CODES = {
    500: ("InternalError", "An internal error has occurred."),
    503: ("Unavailable", "The server is overloaded and can't handle the request."),
}


@attrs.frozen(kw_only=True)
class ErrorReply:
    """An EC2 error response: HTTP status, error code, message."""

    status: int
    code: str
    message: str

    def body(self) -> bytes:
        """The EC2 query-protocol error document botocore parses."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Response><Errors><Error><Code>{escape(self.code)}</Code>"
            f"<Message>{escape(self.message)}</Message></Error></Errors>"
            f"<RequestID>{secrets.token_hex(16)}</RequestID></Response>"
        ).encode()


THROTTLE = ErrorReply(status=503, code="RequestLimitExceeded", message="Request limit exceeded.")


@attrs.frozen(kw_only=True)
class Decision:
    """What to do with one request: sleep ``delay`` seconds, then answer ``reply`` if set."""

    delay: float = 0.0
    reply: ErrorReply | None = None


@attrs.define
class _ActionFaults:
    throttles: int = 0
    errors: int = 0
    error_status: int = 500
    latency: float = 0.0


class FaultPlan:
    """Planned faults per EC2 action name (``AssignPrivateIpAddresses``), thread-safe."""

    def __init__(self, on_attach_delay: Callable[[float], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._by_action: dict[str, _ActionFaults] = {}
        self._on_attach_delay = on_attach_delay
        self.attach_delay_seconds = 0.0

    def throttle(self, action: str, count: int) -> None:
        """Answer the next ``count`` calls of ``action`` with RequestLimitExceeded (HTTP 503)."""
        with self._lock:
            self._faults(action).throttles += count

    def error(self, action: str, count: int, status: int = 500) -> None:
        """Answer the next ``count`` calls of ``action`` with an HTTP ``status`` server error."""
        if status not in _ERROR_CODES:
            raise ValueError(f"status must be one of {sorted(_ERROR_CODES)}")
        with self._lock:
            faults = self._faults(action)
            faults.errors += count
            faults.error_status = status

    def latency(self, action: str, seconds: float) -> None:
        """Delay every call of ``action`` by ``seconds`` (0 removes the delay)."""
        with self._lock:
            self._faults(action).latency = seconds

    def attach_delay(self, seconds: float) -> None:
        """Keep attachments made from now on ``attaching`` (no link yet) for ``seconds``."""
        with self._lock:
            self.attach_delay_seconds = seconds
        if self._on_attach_delay is not None:
            self._on_attach_delay(seconds)

    def clear(self) -> None:
        """Remove every planned fault."""
        with self._lock:
            self._by_action.clear()
        self.attach_delay(0.0)

    def decide(self, action: str) -> Decision:
        """Consume the next planned fault of ``action`` and return what to do."""
        with self._lock:
            faults = self._by_action.get(action)
            if faults is None:
                return Decision()
            reply = None
            if faults.throttles > 0:
                faults.throttles -= 1
                reply = THROTTLE
            elif faults.errors > 0:
                faults.errors -= 1
                code, message = _ERROR_CODES[faults.error_status]
                reply = ErrorReply(status=faults.error_status, code=code, message=message)
            return Decision(delay=faults.latency, reply=reply)

    def _faults(self, action: str) -> _ActionFaults:
        return self._by_action.setdefault(action, _ActionFaults())

    def __repr__(self) -> str:
        with self._lock:
            planned = {a: attrs.asdict(f) for a, f in self._by_action.items()}
        return f"FaultPlan({planned}, attach_delay={self.attach_delay_seconds})"
