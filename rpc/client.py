"""A blocking client of the agent's socket, for agentctl.

Standard library sockets and orjson only: agentctl must start in well under 150 ms, so this
module must never import anyio, cattrs or rpc.server. One connection, opened on first use;
not thread-safe. Any failure of the connection closes it, and the next call reconnects.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Generator
from types import TracebackType
from typing import Any, Final

from rpc.errors import (
    AgentTimeout,
    AgentUnreachable,
    FrameDecodeError,
    FrameTooLarge,
    ProtocolError,
    RpcError,
)
from rpc.framing import NEED_DATA, LineDecoder, encode

__all__ = ["Client"]

# Replies such as agent.pods can be larger than a request; this only guards against garbage.
MAX_REPLY_SIZE: Final = 64 << 20

# errno of a failed connect -> what to tell the user.
_CONNECT_FAILURES: Final = {
    errno.ENOENT: "no socket (is podwire-agent running?)",
    errno.ENOTDIR: "no socket (is podwire-agent running?)",
    errno.ECONNREFUSED: "connection refused (podwire-agent is not running)",
    errno.EACCES: "permission denied (run as root or as a member of the socket's group)",
    errno.EPERM: "permission denied (run as root or as a member of the socket's group)",
    errno.ENOTSOCK: "not a socket",
}


class Client:
    """Calls methods of the agent listening on the Unix socket ``path``.

    ``timeout`` bounds connecting and waiting for each reply (not the wait between events of a
    stream, which may legitimately be idle for a long time).
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = LineDecoder(MAX_REPLY_SIZE)
        self._next_id = 1

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "not connected"
        return f"<Client {self.path} {state}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection, if any. Returns nothing; calling it twice is fine."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._decoder = LineDecoder(MAX_REPLY_SIZE)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Return the result of ``method`` called with ``params``.

        Raises RpcError with the agent's code, msg and details for an error reply,
        AgentUnreachable if the agent cannot be reached or the connection breaks, AgentTimeout
        if no reply comes within the timeout, ProtocolError for a malformed reply.
        """
        id = self._send(method, params)
        kind, payload = self._receive(id, self.timeout)
        if kind != "result":
            self.close()
            raise ProtocolError(f"unexpected event for request {id} (not a streaming method?)")
        return payload

    def stream(
        self, method: str, params: dict[str, Any] | None = None
    ) -> Generator[Any, None, None]:
        """Call a streaming ``method`` and return an iterator of its events.

        The request is sent before this returns; the iterator ends with the final result.
        Raises (when called or while iterating) what ``call`` raises. Leaving the iterator
        early (``close()``, or dropping it) closes the connection, since the agent would go on
        sending events for this request.
        """
        id = self._send(method, params)
        return self._events(id)

    def _events(self, id: int) -> Generator[Any, None, None]:
        done = False
        try:
            kind, payload = self._receive(id, self.timeout)
            while kind == "event":
                yield payload
                kind, payload = self._receive(id, None)
            done = True
        finally:
            if not done:
                self.close()

    def _send(self, method: str, params: dict[str, Any] | None) -> int:
        sock = self._connect()
        id = self._next_id
        self._next_id += 1
        line = encode({"id": id, "method": method, "params": params or {}})
        try:
            sock.sendall(line)
        except OSError as e:
            self.close()
            raise AgentUnreachable(self.path, f"connection broke: {e.strerror or e}") from None
        return id

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except TimeoutError:
            sock.close()
            raise AgentTimeout(self.path, self.timeout) from None
        except OSError as e:
            sock.close()
            reason = _CONNECT_FAILURES.get(e.errno or 0, e.strerror or str(e))
            raise AgentUnreachable(self.path, reason) from None
        self._sock = sock
        return sock

    def _receive(self, id: int, timeout: float | None) -> tuple[str, Any]:
        # Returns ("event", payload) or ("result", result); raises RpcError for an error reply.
        try:
            reply = self._next_reply(timeout)
            kind = _check_reply(reply, id)
        except RpcError:
            self.close()
            raise
        if kind == "error":
            if reply.get("id") is None:
                # The agent could not read our request (too large?) and may have hung up.
                self.close()
            error = reply["error"]
            raise RpcError(error["code"], error["msg"], error.get("details", ""))
        return kind, reply[kind]

    def _next_reply(self, timeout: float | None) -> dict[str, Any]:
        if self._sock is None:
            raise AgentUnreachable(self.path, "the connection was closed")
        self._sock.settimeout(timeout)
        while True:
            try:
                message = self._decoder.next_message()
            except (FrameDecodeError, FrameTooLarge) as e:
                raise ProtocolError(str(e)) from None
            if message is not NEED_DATA:
                return message
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                raise AgentTimeout(self.path, self.timeout) from None
            except OSError as e:
                raise AgentUnreachable(self.path, f"connection broke: {e.strerror or e}") from None
            if not data:
                raise AgentUnreachable(self.path, "podwire-agent closed the connection")
            self._decoder.feed(data)


def _check_reply(reply: dict[str, Any], id: int) -> str:
    """Return which of "result", "event" or "error" ``reply`` is. Raises ProtocolError."""
    if "error" in reply:
        error = reply["error"]
        # An error about a line the agent could not read carries a null id.
        if reply.get("id") not in (id, None):
            raise ProtocolError(f"reply for id {reply.get('id')!r} while waiting for {id}")
        if not (
            isinstance(error, dict)
            and isinstance(error.get("code"), int)
            and isinstance(error.get("msg"), str)
            and isinstance(error.get("details", ""), str)
        ):
            raise ProtocolError(f"malformed error in reply: {error!r}")
        return "error"
    if reply.get("id") != id:
        raise ProtocolError(f"reply for id {reply.get('id')!r} while waiting for {id}")
    for kind in ("result", "event"):
        if kind in reply:
            return kind
    raise ProtocolError("reply has neither result, event nor error")
