"""Errors of the rpc package: one base carrying a CNI error code, subclasses named by cause.

Every error here is an ``RpcError`` with ``code``, ``msg`` and ``details``, so whatever goes
wrong on either side of the socket is reported the same way: the server turns it into an error
reply, the client raises it, agentctl prints it. Codes follow the CNI numbering; 100 and up is
the range CNI leaves to plugins.

This module imports nothing beyond the standard library: agentctl and the client load it.
"""

from __future__ import annotations

CODE_DECODE = 6
CODE_TRY_AGAIN = 11
CODE_PERMISSION_DENIED = 100
CODE_UNKNOWN_METHOD = 101
CODE_INTERNAL = 999


class RpcError(Exception):
    """An error with a CNI code: raised by method handlers, sent as an error reply, and raised
    by the client when the reply is an error."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(code, msg, details)
        self.code = code
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg


class DecodeError(RpcError):
    """A request (or its params) does not have the expected shape; ``details`` says where."""

    def __init__(self, details: str) -> None:
        super().__init__(CODE_DECODE, "invalid request", details)


class FrameDecodeError(DecodeError):
    """A line is not UTF-8, not JSON, or not a JSON object. The next line may still be fine."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FrameTooLarge(RpcError):
    """A line is longer than the decoder's limit; the stream cannot be resynchronised."""

    def __init__(self, limit: int) -> None:
        super().__init__(CODE_DECODE, "request too large", f"a line may hold at most {limit} bytes")
        self.limit = limit


class AgentUnreachable(RpcError):
    """The client cannot talk to the agent: no socket, nobody listening, no permission, or the
    connection broke. CNI code 11 so the runtime retries (the agent may be restarting)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(CODE_TRY_AGAIN, f"podwire-agent is unreachable at {path}", reason)
        self.path = path
        self.reason = reason


class AgentTimeout(RpcError):
    """The agent accepted the request but did not answer within the client's timeout."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(
            CODE_TRY_AGAIN,
            f"podwire-agent at {path} did not answer",
            f"no reply within {timeout:g} s",
        )
        self.path = path
        self.timeout = timeout


class ProtocolError(RpcError):
    """The agent's reply is malformed: not a frame, not an object, wrong id or shape."""

    def __init__(self, reason: str) -> None:
        super().__init__(CODE_INTERNAL, "malformed reply from podwire-agent", reason)
        self.reason = reason


class AddressInUse(RpcError):
    """Another process is listening on the socket path (a second agent?)."""

    def __init__(self, path: str) -> None:
        super().__init__(CODE_INTERNAL, "socket already in use", f"something listens on {path}")
        self.path = path


class NotASocket(RpcError):
    """The socket path is taken by something that is not a socket; it is left alone."""

    def __init__(self, path: str) -> None:
        super().__init__(
            CODE_INTERNAL, "socket path is taken", f"{path} exists and is not a socket"
        )
        self.path = path
