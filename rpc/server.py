"""The agent's side of the wire: a Unix socket server that answers JSON-lines requests.

Theory of operation: ``serve`` owns the socket file, an accept loop and a task per connection.
A connection is a loop over ``LineDecoder``: each complete request goes to ``dispatch``, which
checks access, calls the handler under the deadline and writes the reply; one connection's
requests are answered in order, connections run concurrently. ``dispatch`` maps every failure
to an error reply, so one bad request never ends the server, and writes through a ``send``
callable so it can be tested without sockets. Cancellation is never caught.

No local client can bring the server down (``Limits``): an ``accept`` that fails for want of
descriptors or memory backs off and retries, so the server keeps serving once they free up; at
``max_connections`` a new connection closes the longest-idle one, and is refused with an error
line only when every connection is busy; a connection idle for ``idle_timeout`` is closed, and
one that takes longer than ``read_timeout`` to send a request line (or to take a reply) too.

A handler may return an async iterator instead of a value: the method streams. Each item is
sent as ``{"id":N,"event":...}`` and the stream ends with ``{"id":N,"result":null}`` (or an error
reply). The deadline covers the handler call, not the stream, which may follow events forever.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from functools import partial
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from rpc.errors import (
    CODE_DECODE,
    CODE_INTERNAL,
    CODE_PERMISSION_DENIED,
    CODE_TRY_AGAIN,
    AddressInUse,
    DecodeError,
    FrameDecodeError,
    FrameTooLarge,
    NotASocket,
    RpcError,
)
from rpc.framing import NEED_DATA, LineDecoder, encode_error, encode_event, encode_result
from rpc.messages import Peer, Request, structure, unstructure

__all__ = [
    "CURRENT_REQUEST",
    "Access",
    "Handler",
    "Limits",
    "RequestTiming",
    "Send",
    "ServerStats",
    "dispatch",
    "serve",
]

logger = logging.getLogger("podwire.rpc")

Send = Callable[[bytes], Awaitable[None]]

_PEERCRED = struct.Struct("3i")


class Handler(Protocol):
    """Answers one method call. Returns a JSON-able value, an attrs instance, or an async
    iterator of those (a streaming method). Raises RpcError to send that error reply."""

    async def __call__(self, method: str, params: dict[str, Any], peer: Peer) -> Any: ...


@attrs.define(kw_only=True)
class ServerStats:
    """Counters kept by ``serve``, read by metrics and agentctl."""

    connections_total: int = 0
    connections_active: int = 0
    requests_total: int = 0
    connections_refused: int = 0  # every connection was busy at the limit
    connections_evicted: int = 0  # idle, closed to admit a new one at the limit
    connections_timed_out: int = 0  # idle too long, or too slow to send a request
    accept_errors: int = 0  # accept failed for want of descriptors or memory


@attrs.define(kw_only=True)
class RequestTiming:
    """When the request being handled was read, and (for the handler to learn) when its reply
    was written: ``on_replied`` is called with that time, once the reply is written or could
    not be (the client gone): work the answer need not wait for goes there. CLOCK_MONOTONIC
    nanoseconds."""

    received: int
    on_replied: Callable[[int], None] | None = None


# The timing of the request whose handler is running (None outside one).
CURRENT_REQUEST: ContextVar[RequestTiming | None] = ContextVar("rpc_request", default=None)


@attrs.frozen(kw_only=True)
class Limits:
    """What one local client may hold of the server (see the module docstring)."""

    max_connections: int = 512
    idle_timeout: float = 30.0
    read_timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        if self.max_connections < 1 or self.idle_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError(f"invalid limits: {self}")


# accept(2) errors that mean "not now": out of descriptors or memory. Anything else is fatal.
_ACCEPT_TRANSIENT = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)
_ACCEPT_BACKOFF_MAX = 1.0


@attrs.define(eq=False)
class _Client:
    """One accepted connection, as the admission policy sees it."""

    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    busy: bool = False  # a request is being answered, or part of one received
    since: float = 0.0  # when it last became idle


def choose_eviction(clients: list[_Client], limit: int) -> _Client | bool:
    """Admission at the connection limit: True to admit, the longest-idle client to close to
    make room, or False to refuse (every client busy)."""
    if len(clients) < limit:
        return True
    idle = [c for c in clients if not c.busy]
    return min(idle, key=lambda c: c.since) if idle else False


@attrs.frozen(kw_only=True)
class Access:
    """Who may call what: methods in ``mutating`` need an admin uid or gid."""

    mutating: frozenset[str]
    admin_uids: frozenset[int] = frozenset({0})
    admin_gids: frozenset[int] = frozenset()

    def allows(self, method: str, peer: Peer) -> bool:
        """Return whether ``peer`` may call ``method``."""
        return (
            method not in self.mutating
            or peer.uid in self.admin_uids
            or peer.gid in self.admin_gids
        )


async def serve(
    path: str,
    handler: Handler,
    *,
    mutating: frozenset[str],
    deadline: float = 30.0,
    admin_uids: frozenset[int] = frozenset({0}),
    admin_gids: frozenset[int] = frozenset(),
    socket_mode: int = 0o660,
    socket_gid: int | None = None,
    stats: ServerStats | None = None,
    limits: Limits = Limits(),
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve requests on the Unix socket ``path`` until cancelled; never returns otherwise.

    A socket file nobody listens on (left by a dead agent) is replaced. ``task_status.started()``
    is called once the socket accepts connections; the file is removed when serving ends.
    Raises AddressInUse if something listens on ``path``, NotASocket if ``path`` is another kind
    of file, OSError if the socket cannot be created.
    """
    access = Access(mutating=mutating, admin_uids=admin_uids, admin_gids=admin_gids)
    stats = stats if stats is not None else ServerStats()
    _claim(path)
    listener = _listen(path, socket_mode)
    st = os.stat(path)
    ours = (st.st_dev, st.st_ino)
    clients: list[_Client] = []
    try:
        if socket_gid is not None:
            os.chown(path, -1, socket_gid)
        async with anyio.create_task_group() as tg:
            task_status.started()
            backoff = 0.0
            while True:
                try:
                    sock, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    await anyio.wait_readable(listener)
                    continue
                except OSError as e:
                    if e.errno not in _ACCEPT_TRANSIENT:
                        raise
                    stats.accept_errors += 1
                    if backoff == 0.0:
                        logger.error("cannot accept connections: %s; backing off", e.strerror)
                    backoff = min(_ACCEPT_BACKOFF_MAX, max(0.01, backoff * 2))
                    await anyio.sleep(backoff)
                    continue
                if backoff:
                    logger.info("accepting connections again")
                    backoff = 0.0
                verdict = choose_eviction(clients, limits.max_connections)
                if verdict is False:
                    stats.connections_refused += 1
                    _refuse(sock, len(clients))
                    continue
                if isinstance(verdict, _Client):
                    stats.connections_evicted += 1
                    verdict.scope.cancel()
                    clients.remove(verdict)
                client = _Client(since=anyio.current_time())
                clients.append(client)
                tg.start_soon(
                    partial(
                        _serve_connection,
                        sock,
                        client,
                        clients,
                        handler=handler,
                        access=access,
                        deadline=deadline,
                        stats=stats,
                        limits=limits,
                    )
                )
                # The connection's task runs first: its request is usually there already, and
                # the next accept (and a flood of connections) waits a loop turn.
                await anyio.lowlevel.checkpoint()
    finally:
        listener.close()
        _release(path, ours)


def _listen(path: str, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


def _refuse(sock: socket.socket, busy: int) -> None:
    """Tell a client it cannot be served now (the plugin answers the runtime code 11)."""
    line = encode_error(
        None, CODE_TRY_AGAIN, "too many connections", f"all {busy} connections are busy"
    )
    try:
        sock.setblocking(False)
        sock.send(line)
    except OSError:
        pass
    finally:
        sock.close()


async def dispatch(
    message: dict[str, Any],
    handler: Handler,
    peer: Peer,
    send: Send,
    *,
    access: Access,
    deadline: float,
) -> None:
    """Answer one decoded request, writing the reply line(s) with ``send``. Returns nothing.

    Every failure of the request or the handler becomes an error reply; raises only what
    ``send`` raises, and cancellation.
    """
    try:
        request = structure(message, Request)
    except DecodeError as e:
        raw_id = message.get("id")
        id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
        await send(encode_error(id, e.code, e.msg, e.details))
        return
    id, method = request.id, request.method
    if not access.allows(method, peer):
        details = f"{method} needs an admin uid or gid (peer uid {peer.uid}, gid {peer.gid})"
        await send(encode_error(id, CODE_PERMISSION_DENIED, "permission denied", details))
        return
    answer = await _call(handler, request, peer, deadline)
    if isinstance(answer, bytes):
        await send(answer)
    else:
        await _stream(id, method, answer, send)


async def _call(
    handler: Handler, request: Request, peer: Peer, deadline: float
) -> bytes | AsyncIterator[Any]:
    # Returns the reply line, or the items of a streaming method.
    id, method = request.id, request.method
    try:
        # move_on_after rather than fail_after: a TimeoutError raised inside the handler is
        # the handler's own failure, not the deadline.
        with anyio.move_on_after(deadline) as scope:
            result = await handler(method, request.params, peer)
        if scope.cancelled_caught:
            logger.warning("%s did not finish within %g s", method, deadline)
            details = f"{method} did not finish within {deadline:g} s"
            return encode_error(id, CODE_TRY_AGAIN, "deadline exceeded", details)
        if isinstance(result, AsyncIterator):
            return result
        return encode_result(id, unstructure(result))
    except Exception as e:
        return _error_reply(id, method, e)


async def _stream(id: int, method: str, items: AsyncIterator[Any], send: Send) -> None:
    try:
        while True:
            try:
                line = encode_event(id, unstructure(await anext(items)))
            except StopAsyncIteration:
                break
            except Exception as e:
                await send(_error_reply(id, method, e))
                return
            await send(line)
        await send(encode_result(id, None))
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


def _error_reply(id: int, method: str, exc: Exception) -> bytes:
    if isinstance(exc, RpcError):
        return encode_error(id, exc.code, exc.msg, exc.details)
    logger.error("%s failed", method, exc_info=exc)
    return encode_error(id, CODE_INTERNAL, "internal error", f"{type(exc).__name__}: {exc}")


async def _serve_connection(
    sock: socket.socket,
    client: _Client,
    clients: list[_Client],
    *,
    handler: Handler,
    access: Access,
    deadline: float,
    stats: ServerStats,
    limits: Limits,
) -> None:
    stats.connections_total += 1
    stats.connections_active += 1
    try:
        with client.scope, sock:
            sock.setblocking(False)
            await _converse(_Conn(sock), client, handler, access, deadline, stats, limits)
    except (anyio.BrokenResourceError, ConnectionError, BrokenPipeError):
        pass  # the client went away mid-request; there is nobody to answer
    except Exception:
        logger.exception("connection failed")
    finally:
        stats.connections_active -= 1
        if client in clients:
            clients.remove(client)


class _Conn:
    """A non-blocking accepted socket: each call tries the socket first and waits only when
    it would block (the plugin's request is usually there by the time the connection is
    served, and its reply fits in the socket buffer), sparing a loop iteration and the
    registrations of a stream layer per call."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def receive(self) -> bytes:
        """The next bytes; b"" at end of stream."""
        while True:
            try:
                return self.sock.recv(65536)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                await anyio.wait_writable(self.sock)


async def _converse(
    conn: _Conn,
    client: _Client,
    handler: Handler,
    access: Access,
    deadline: float,
    stats: ServerStats,
    limits: Limits,
) -> None:
    async def send(data: bytes) -> None:
        # A reply usually fits the socket buffer: sent at once, with no deadline to set up.
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            # A client that does not take its reply is as slow as one that does not send.
            with anyio.fail_after(limits.read_timeout):
                await conn.send(data[sent:])

    peer = _peer_of(conn.sock)
    decoder = LineDecoder()
    started: float | None = None  # when the first byte of an incomplete line arrived
    try:
        while True:
            try:
                message = decoder.next_message()
            except FrameTooLarge as e:
                await send(encode_error(None, e.code, e.msg, e.details))
                return
            except FrameDecodeError as e:
                await send(encode_error(None, e.code, e.msg, e.details))
                continue
            if message is NEED_DATA:
                now = anyio.current_time()
                if decoder.buffered:
                    started = now if started is None else started
                    client.busy = True
                    wait = started + limits.read_timeout - now
                else:
                    started = None
                    if client.busy:
                        client.busy, client.since = False, now
                    wait = client.since + limits.idle_timeout - now
                with anyio.move_on_after(wait):
                    data = await conn.receive()
                    if not data:
                        return
                    decoder.feed(data)
                    continue
                stats.connections_timed_out += 1
                if decoder.buffered:
                    details = f"a request line must arrive within {limits.read_timeout:g} s"
                    await send(encode_error(None, CODE_DECODE, "request too slow", details))
                return
            started = None
            client.busy = True
            stats.requests_total += 1
            timing = RequestTiming(received=time.monotonic_ns())
            token = CURRENT_REQUEST.set(timing)
            try:
                await dispatch(message, handler, peer, send, access=access, deadline=deadline)
            finally:
                CURRENT_REQUEST.reset(token)
                if timing.on_replied is not None:
                    timing.on_replied(time.monotonic_ns())
    except TimeoutError:
        stats.connections_timed_out += 1  # the client did not take its reply


def _peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid)


def _claim(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise NotASocket(path)
    if _listening(path):
        raise AddressInUse(path)
    os.unlink(path)


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return False
        except BlockingIOError:
            return True  # listening, with a full backlog
        return True


def _release(path: str, ours: tuple[int, int]) -> None:
    # Only our own socket: a newer agent may already have replaced it, and unlinking that one
    # would cut it off from every client.
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == ours:
        os.unlink(path)
