from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from rpc.client import Client
from rpc.errors import (
    CODE_TRY_AGAIN,
    CODE_UNKNOWN_METHOD,
    AgentTimeout,
    AgentUnreachable,
    ProtocolError,
    RpcError,
)
from rpc.messages import Peer
from rpc.server import ServerStats, serve


async def api(method: str, params: dict[str, Any], peer: Peer) -> Any:
    match method:
        case "echo":
            return params
        case "count":
            return count(params["n"])
        case "fail":
            raise RpcError(CODE_UNKNOWN_METHOD, "unknown method", "fail")
        case _:
            raise RpcError(CODE_UNKNOWN_METHOD, "unknown method", method)


async def count(n: int) -> AsyncIterator[dict[str, int]]:
    for i in range(n):
        yield {"i": i}


@pytest.fixture(params=["asyncio", "trio"])
def agent(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, ServerStats]]:
    """A real server on an event loop in a background thread; yields its socket and stats."""
    path = str(tmp_path / "agent.sock")
    stats = ServerStats()
    with start_blocking_portal(request.param) as portal:
        future, _ = portal.start_task(partial(serve, path, api, mutating=frozenset(), stats=stats))
        try:
            yield path, stats
        finally:
            future.cancel()


def test_call_returns_the_result(agent: tuple[str, ServerStats]) -> None:
    path, stats = agent
    with Client(path) as client:
        assert client.call("echo", {"a": [1, "x"]}) == {"a": [1, "x"]}
        assert client.call("echo") == {}
    assert stats.connections_total == 1


def test_error_reply_raises_rpc_error_and_connection_stays(agent: tuple[str, ServerStats]) -> None:
    path, stats = agent
    with Client(path) as client:
        with pytest.raises(RpcError) as info:
            client.call("agent.nope")
        assert type(info.value) is RpcError
        assert (info.value.code, info.value.msg, info.value.details) == (
            CODE_UNKNOWN_METHOD,
            "unknown method",
            "agent.nope",
        )
        assert client.call("echo", {"after": True}) == {"after": True}
    assert stats.connections_total == 1


def test_stream_yields_events_until_the_result(agent: tuple[str, ServerStats]) -> None:
    path, _ = agent
    with Client(path) as client:
        assert list(client.stream("count", {"n": 3})) == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert list(client.stream("count", {"n": 0})) == []
        assert client.call("echo") == {}


def test_leaving_a_stream_early_reconnects(agent: tuple[str, ServerStats]) -> None:
    path, stats = agent
    with Client(path) as client:
        events = client.stream("count", {"n": 5})
        assert next(events) == {"i": 0}
        events.close()
        # The rest of the stream is still on the old connection: the next call needs a new one.
        assert client.call("echo", {"x": 1}) == {"x": 1}
    assert stats.connections_total == 2


def test_stream_of_unknown_method_raises(agent: tuple[str, ServerStats]) -> None:
    path, _ = agent
    with Client(path) as client, pytest.raises(RpcError) as info:
        list(client.stream("nope"))
    assert info.value.code == CODE_UNKNOWN_METHOD


def test_missing_socket_is_agent_unreachable(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    with Client(path) as client, pytest.raises(AgentUnreachable) as info:
        client.call("echo")
    assert info.value.path == path
    assert info.value.code == CODE_TRY_AGAIN
    assert path in str(info.value)
    assert "no socket" in str(info.value)


def test_nobody_listening_is_agent_unreachable(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)
    with Client(path) as client, pytest.raises(AgentUnreachable) as info:
        client.call("echo")
    assert "connection refused" in str(info.value)
    assert path in str(info.value)


def test_client_does_not_import_the_server_side() -> None:
    code = (
        "import sys, rpc.client; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('anyio', 'cattrs', 'attrs', 'trio') or m == 'rpc.server'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# A scripted agent for replies the real one never sends.


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[Callable[[bytes | None], str]]:
    """``scripted(reply)``: a one-connection server that reads a request line and writes
    ``reply`` (or nothing) and closes. Returns the socket path."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(reply: bytes | None) -> str:
        path = str(tmp_path / f"s{len(listeners)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        listeners.append(listener)

        def run() -> None:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as f:
                f.readline()
                if reply is not None:
                    conn.sendall(reply)
                    conn.recv(1)  # hold the connection until the client closes it

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(timeout=5)


@pytest.mark.parametrize(
    "reply",
    [
        b"not json\n",
        b"[1]\n",
        b'{"id":2,"result":1}\n',
        b'{"id":1}\n',
        b'{"id":1,"error":"boom"}\n',
        b'{"id":1,"error":{"code":"6","msg":"x"}}\n',
    ],
)
def test_malformed_reply_is_protocol_error(
    scripted: Callable[[bytes | None], str], reply: bytes
) -> None:
    with Client(scripted(reply)) as client, pytest.raises(ProtocolError):
        client.call("echo")


def test_error_for_an_unreadable_request_carries_a_null_id(
    scripted: Callable[[bytes | None], str],
) -> None:
    reply = b'{"id":null,"error":{"code":6,"msg":"request too large","details":"1 MiB"}}\n'
    with Client(scripted(reply)) as client:
        with pytest.raises(RpcError) as info:
            client.call("echo")
        # The agent may have hung up after such an error: the client starts afresh.
        assert repr(client) == f"<Client {client.path} not connected>"
    assert (info.value.code, info.value.msg) == (6, "request too large")


def test_connection_closed_without_reply_is_agent_unreachable(
    scripted: Callable[[bytes | None], str],
) -> None:
    path = scripted(None)
    with Client(path) as client, pytest.raises(AgentUnreachable) as info:
        client.call("echo")
    assert "closed the connection" in str(info.value)


def test_no_reply_within_timeout_is_agent_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(path)
        mute.listen()  # accepts into the backlog, never answers
        with Client(path, timeout=0.01) as client, pytest.raises(AgentTimeout) as info:
            client.call("echo")
    assert info.value.code == CODE_TRY_AGAIN
    assert info.value.path == path
