from __future__ import annotations

import json
import logging
import os
import select
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import orjson
import pytest
import trio
import trio.testing

from rpc.errors import (
    CODE_DECODE,
    CODE_INTERNAL,
    CODE_PERMISSION_DENIED,
    CODE_TRY_AGAIN,
    CODE_UNKNOWN_METHOD,
    AddressInUse,
    NotASocket,
    RpcError,
)
from rpc.framing import NEED_DATA, LineDecoder, encode, encode_error, encode_result
from rpc.messages import Peer
from rpc.server import CURRENT_REQUEST, Access, Limits, ServerStats, dispatch, serve

MUTATING = frozenset({"agent.gc"})


@attrs.frozen(kw_only=True)
class Pod:
    name: str
    ip: str


class Api:
    """A handler with one method per behaviour under test."""

    def __init__(self) -> None:
        self.released = anyio.Event()
        self.finished: list[str] = []
        self.replied: list[str] = []  # methods whose on_replied was called

    async def __call__(self, method: str, params: dict[str, Any], peer: Peer) -> Any:
        match method:
            case "echo":
                return params
            case "whoami":
                return peer
            case "pod":
                return Pod(name="web-0", ip="10.0.0.7")
            case "agent.gc":
                return "collected"
            case "boom":
                raise ValueError("kaboom")
            case "opaque":
                return object()
            case "wait":
                timing = CURRENT_REQUEST.get()
                assert timing is not None
                timing.on_replied = lambda _: self.replied.append("wait")
                await self.released.wait()
                self.finished.append("wait")
                return "released"
            case "release":
                self.released.set()
                return None
            case "count":
                return self.count(params["n"], params.get("fail_at"))
            case _:
                raise RpcError(CODE_UNKNOWN_METHOD, "unknown method", method)

    async def release_all(self) -> None:
        self.released.set()

    async def count(self, n: int, fail_at: int | None) -> AsyncIterator[Pod]:
        for i in range(n):
            if i == fail_at:
                raise RpcError(CODE_INTERNAL, "stream broke", f"at {i}")
            yield Pod(name=f"p{i}", ip=f"10.0.0.{i}")


class Conn:
    """A raw client: writes bytes, reads reply objects."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.decoder = LineDecoder(max_size=1 << 22)

    async def send(self, *requests: dict[str, Any] | bytes) -> None:
        await self.stream.send(b"".join(r if isinstance(r, bytes) else encode(r) for r in requests))

    async def reply(self) -> dict[str, Any] | None:
        """The next reply, or None if the server closed the connection."""
        while (message := self.decoder.next_message()) is NEED_DATA:
            try:
                self.decoder.feed(await self.stream.receive())
            except anyio.EndOfStream:
                return None
        return message

    async def call(self, id: int, method: str, **params: Any) -> dict[str, Any] | None:
        await self.send({"id": id, "method": method, "params": params})
        return await self.reply()


@asynccontextmanager
async def running(path: Path, handler: Any, **options: Any) -> AsyncIterator[ServerStats]:
    stats = ServerStats()
    options.setdefault("mutating", MUTATING)
    async with anyio.create_task_group() as tg:
        await tg.start(partial(serve, str(path), handler, stats=stats, **options))
        yield stats
        # Let connections see their client's EOF before cancelling: on asyncio, anyio 4.16's
        # UNIX stream calls set_result on a receive future that a cancellation in the same
        # loop iteration has already cancelled (InvalidStateError in a loop callback).
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()


@asynccontextmanager
async def connect(path: Path) -> AsyncIterator[Conn]:
    async with await anyio.connect_unix(str(path)) as stream:
        yield Conn(stream)


@pytest.mark.anyio
async def test_request_reply(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()), connect(sock) as conn:
        assert await conn.call(1, "echo", a=[1, "x"]) == {"id": 1, "result": {"a": [1, "x"]}}
        assert await conn.call(2, "pod") == {"id": 2, "result": {"name": "web-0", "ip": "10.0.0.7"}}
        assert await conn.call(3, "whoami") == {
            "id": 3,
            "result": {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()},
        }


@pytest.mark.anyio
async def test_reply_bytes_are_canonical(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()), connect(sock) as conn:
        await conn.send({"id": 1, "method": "echo", "params": {"b": 1, "a": 2}})
        assert await conn.stream.receive() == encode_result(1, {"b": 1, "a": 2})


@pytest.mark.anyio
async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()) as stats, connect(sock) as conn:
        await conn.send(*({"id": i, "method": "echo", "params": {"i": i}} for i in range(1, 6)))
        replies = [await conn.reply() for _ in range(5)]
        assert replies == [{"id": i, "result": {"i": i}} for i in range(1, 6)]
        assert stats.requests_total == 5
        assert stats.connections_total == 1


@pytest.mark.anyio
async def test_connections_are_served_concurrently(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    api = Api()
    # If connections were served one after the other, "wait" would never be released.
    with anyio.fail_after(10):
        async with running(sock, api) as stats, connect(sock) as first, connect(sock) as second:
            await first.send({"id": 1, "method": "wait"})
            assert await second.call(1, "release") == {"id": 1, "result": None}
            assert await first.reply() == {"id": 1, "result": "released"}
            assert stats.connections_active == 2


@pytest.mark.anyio
async def test_handler_rpc_error_becomes_error_reply(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()), connect(sock) as conn:
        assert await conn.call(4, "agent.nope") == {
            "id": 4,
            "error": {
                "code": CODE_UNKNOWN_METHOD,
                "msg": "unknown method",
                "details": "agent.nope",
            },
        }


@pytest.mark.anyio
async def test_handler_exception_is_internal_error_and_server_survives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()):
        async with connect(sock) as conn:
            assert await conn.call(1, "boom") == {
                "id": 1,
                "error": {
                    "code": CODE_INTERNAL,
                    "msg": "internal error",
                    "details": "ValueError: kaboom",
                },
            }
            assert await conn.call(2, "echo") == {"id": 2, "result": {}}
        async with connect(sock) as conn:
            assert await conn.call(1, "echo") == {"id": 1, "result": {}}
    [record] = [r for r in caplog.records if r.name == "podwire.rpc"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)


@pytest.mark.anyio
async def test_unserialisable_result_is_internal_error(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()), connect(sock) as conn:
        reply = await conn.call(1, "opaque")
        assert reply is not None
        assert reply["id"] == 1
        assert reply["error"]["code"] == CODE_INTERNAL
        assert reply["error"]["details"].startswith("TypeError: ")
        assert await conn.call(2, "echo") == {"id": 2, "result": {}}


@pytest.mark.anyio
async def test_oversized_request_gets_error_then_close(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()), connect(sock) as conn:
        # One byte over the 1 MiB limit and no newline: the server must not wait for one.
        await conn.send(b"x" * ((1 << 20) + 1))
        reply = await conn.reply()
        assert reply is not None
        assert reply["id"] is None
        assert reply["error"]["code"] == CODE_DECODE
        assert reply["error"]["msg"] == "request too large"
        assert str(1 << 20) in reply["error"]["details"]
        assert await conn.reply() is None


@pytest.mark.anyio
async def test_garbage_line_then_good_request_on_same_connection(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()), connect(sock) as conn:
        await conn.send(b"this is not json\n", b"[1]\n", {"id": 3, "method": "echo"})
        for _ in range(2):
            reply = await conn.reply()
            assert reply is not None
            assert reply["id"] is None
            assert reply["error"]["code"] == CODE_DECODE
        assert await conn.reply() == {"id": 3, "result": {}}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("request_", "id", "path"),
    [
        ({"id": 5, "method": 3}, 5, "$.method"),
        ({"id": 5, "method": "echo", "params": [1]}, 5, "$.params"),
        ({"id": "5", "method": "echo"}, None, "$.id"),
        ({"id": True, "method": "echo"}, None, "$.id"),
        ({"method": "echo"}, None, "$.id"),
    ],
)
async def test_bad_envelope_gets_decode_error_with_path(
    tmp_path: Path, request_: dict[str, Any], id: int | None, path: str
) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()), connect(sock) as conn:
        await conn.send(request_)
        reply = await conn.reply()
        assert reply is not None
        assert reply["id"] == id
        assert reply["error"]["code"] == CODE_DECODE
        assert reply["error"]["msg"] == "invalid request"
        assert f"@ {path}" in reply["error"]["details"]
        assert await conn.call(6, "echo") == {"id": 6, "result": {}}


@pytest.mark.anyio
async def test_streaming_method(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()), connect(sock) as conn:
        await conn.send({"id": 9, "method": "count", "params": {"n": 3}})
        replies = [await conn.reply() for _ in range(4)]
        assert replies == [
            {"id": 9, "event": {"name": "p0", "ip": "10.0.0.0"}},
            {"id": 9, "event": {"name": "p1", "ip": "10.0.0.1"}},
            {"id": 9, "event": {"name": "p2", "ip": "10.0.0.2"}},
            {"id": 9, "result": None},
        ]
        assert await conn.call(10, "echo") == {"id": 10, "result": {}}


@pytest.mark.anyio
async def test_stream_that_fails_ends_with_error_reply(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()), connect(sock) as conn:
        await conn.send({"id": 9, "method": "count", "params": {"n": 3, "fail_at": 1}})
        assert await conn.reply() == {"id": 9, "event": {"name": "p0", "ip": "10.0.0.0"}}
        assert await conn.reply() == {
            "id": 9,
            "error": {"code": CODE_INTERNAL, "msg": "stream broke", "details": "at 1"},
        }


@pytest.mark.anyio
async def test_client_gone_mid_request_does_not_hurt_the_server(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    api = Api()
    async with running(sock, api) as stats:
        async with connect(sock) as gone:
            await gone.send({"id": 1, "method": "wait"})
            # Reading the next request would come after the handler: make sure it is in it.
            await anyio.wait_all_tasks_blocked()
        async with connect(sock) as conn:
            assert await conn.call(1, "release") == {"id": 1, "result": None}
            # The reply to "wait" goes to a closed socket; the connection task ends quietly.
            await anyio.wait_all_tasks_blocked()
            assert api.finished == ["wait"]
            assert api.replied == ["wait"]  # told, though nobody took the reply
            assert stats.connections_active == 1
            assert await conn.call(2, "echo") == {"id": 2, "result": {}}


@pytest.mark.anyio
async def test_socket_file_lifecycle(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "podwire" / "agent.sock"
    gid = 65534 if os.geteuid() == 0 else os.getgid()  # only root may give a file away
    async with running(sock, Api(), socket_gid=gid):
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid
    assert not sock.exists()
    assert sock.parent.is_dir()


@pytest.mark.anyio
async def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(sock))  # bound, never listening, closed: what a killed agent leaves
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    async with running(sock, Api()), connect(sock) as conn:
        assert await conn.call(1, "echo") == {"id": 1, "result": {}}


@pytest.mark.anyio
async def test_live_socket_raises_address_in_use(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api()):
        with pytest.raises(AddressInUse) as info:
            await serve(str(sock), Api(), mutating=MUTATING)
        assert info.value.path == str(sock)
        async with connect(sock) as conn:
            assert await conn.call(1, "echo") == {"id": 1, "result": {}}
    assert not sock.exists()


@pytest.mark.anyio
async def test_path_taken_by_a_regular_file_is_left_alone(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    sock.write_text("not a socket")
    with pytest.raises(NotASocket):
        await serve(str(sock), Api(), mutating=MUTATING)
    assert sock.read_text() == "not a socket"


CHILD = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b'{"id":1,"method":"agent.gc"}\\n{"id":2,"method":"echo","params":{"x":1}}\\n')
f = s.makefile("rb")
print(json.dumps([json.loads(f.readline()), json.loads(f.readline())]))
"""


# The venv's interpreter may live where nobody cannot read (/root); the child needs only the
# standard library.
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.anyio
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs /usr/bin/python3")
async def test_mutating_methods_need_an_admin_peer() -> None:
    with tempfile.TemporaryDirectory(prefix="pw-rpc-") as tmp:
        os.chmod(tmp, 0o711)  # the unprivileged client must reach the socket inside
        sock = Path(tmp) / "a.sock"
        async with running(sock, Api(), socket_mode=0o666), connect(sock) as conn:
            run = partial(
                subprocess.run,
                [SYSTEM_PYTHON, "-c", CHILD, str(sock)],
                user=65534,
                group=65534,
                extra_groups=[],
                capture_output=True,
                check=True,
            )
            child = await anyio.to_thread.run_sync(run)
            assert await conn.call(1, "agent.gc") == {"id": 1, "result": "collected"}
    denied, allowed = json.loads(child.stdout)
    assert denied["id"] == 1
    assert denied["error"]["code"] == CODE_PERMISSION_DENIED
    assert denied["error"]["msg"] == "permission denied"
    assert "uid 65534" in denied["error"]["details"]
    assert allowed == {"id": 2, "result": {"x": 1}}


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        (Peer(pid=1, uid=0, gid=0), True),
        (Peer(pid=1, uid=1000, gid=1000), False),
        (Peer(pid=1, uid=1000, gid=150), True),
        (Peer(pid=1, uid=200, gid=1000), True),
    ],
)
def test_access_for_mutating_methods(peer: Peer, allowed: bool) -> None:
    access = Access(mutating=MUTATING, admin_uids=frozenset({0, 200}), admin_gids=frozenset({150}))
    assert access.allows("agent.gc", peer) is allowed
    assert access.allows("agent.status", peer) is True


# Deadlines on trio's virtual clock, through dispatch (no sockets): the reply must come at
# exactly the deadline, not a tick earlier or later.

ROOT = Peer(pid=1, uid=0, gid=0)


async def sleeper(method: str, params: dict[str, Any], peer: Peer) -> Any:
    await trio.sleep(params["seconds"])
    if params.get("raise"):
        raise TimeoutError("the handler's own timeout")
    return "slept"


async def dispatch_timed(message: dict[str, Any], deadline: float) -> tuple[list[bytes], float]:
    sent: list[bytes] = []

    async def send(line: bytes) -> None:
        sent.append(line)

    start = trio.current_time()
    await dispatch(
        message, sleeper, ROOT, send, access=Access(mutating=MUTATING), deadline=deadline
    )
    return sent, trio.current_time() - start


@pytest.mark.trio
async def test_deadline_exceeded_at_exactly_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent, elapsed = await dispatch_timed(
        {"id": 7, "method": "cni.add", "params": {"seconds": 3600}}, deadline=30.0
    )
    assert elapsed == 30.0
    assert sent == [
        encode_error(7, CODE_TRY_AGAIN, "deadline exceeded", "cni.add did not finish within 30 s")
    ]


@pytest.mark.trio
async def test_handler_within_deadline_answers(autojump_clock: trio.testing.MockClock) -> None:
    sent, elapsed = await dispatch_timed(
        {"id": 8, "method": "cni.add", "params": {"seconds": 29.5}}, deadline=30.0
    )
    assert elapsed == 29.5
    assert sent == [encode_result(8, "slept")]


@pytest.mark.trio
async def test_handlers_own_timeout_is_not_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent, elapsed = await dispatch_timed(
        {"id": 9, "method": "cni.add", "params": {"seconds": 1, "raise": True}}, deadline=30.0
    )
    assert elapsed == 1.0
    assert [orjson.loads(line)["error"]["code"] for line in sent] == [CODE_INTERNAL]


@pytest.mark.trio
async def test_deadline_through_the_socket(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    sock = tmp_path / "a.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, str(sock), sleeper, mutating=MUTATING, deadline=5.0))
        async with connect(sock) as conn:
            start = trio.current_time()
            reply = await conn.call(1, "slow", seconds=3600)
            assert trio.current_time() - start == 5.0
            assert reply is not None
            assert reply["error"]["code"] == CODE_TRY_AGAIN
        nursery.cancel_scope.cancel()


# -- no local client can bring the server down --------------------------------------------


async def closed(conn: Conn) -> bool:
    """Whether the server closed the connection (a reset, when it left our bytes unread)."""
    try:
        return await conn.reply() is None
    except anyio.BrokenResourceError:
        return True


@pytest.mark.trio
async def test_an_idle_connection_is_closed_at_the_idle_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    sock = tmp_path / "a.sock"
    limits = Limits(idle_timeout=30.0, read_timeout=10.0)
    async with running(sock, Api(), limits=limits) as stats:
        async with connect(sock) as conn:
            assert (await conn.call(1, "echo", a=1)) is not None  # idle from here
            start = trio.current_time()
            assert await conn.reply() is None  # closed, with nothing said
            assert trio.current_time() - start == 30.0
        assert stats.connections_timed_out == 1


@pytest.mark.trio
async def test_a_client_sending_a_byte_a_second_is_cut_off_at_the_read_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    sock = tmp_path / "a.sock"
    async with running(sock, Api(), limits=Limits(read_timeout=10.0)) as stats:
        async with connect(sock) as conn:
            start = trio.current_time()
            line = encode({"id": 1, "method": "echo", "params": {}})
            for byte in line:
                if trio.current_time() - start > 10.0:
                    break
                try:
                    await conn.send(bytes([byte]))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    break  # closed while we were still sending: the answer is there to read
                await trio.sleep(1.0)
            reply = await conn.reply()
            assert reply is not None and reply["error"]["msg"] == "request too slow"
            assert await closed(conn)
        assert stats.connections_timed_out == 1 and stats.requests_total == 0


@pytest.mark.anyio
async def test_at_the_limit_the_longest_idle_connection_makes_room(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    api = Api()
    async with running(sock, api, limits=Limits(max_connections=3)) as stats:
        async with connect(sock) as first, connect(sock) as second, connect(sock) as third:
            for conn in (first, second, third):
                assert await conn.call(1, "echo") is not None
            async with connect(sock) as fourth:  # admitted: the longest idle goes
                assert await fourth.call(1, "echo", x=4) == {"id": 1, "result": {"x": 4}}
                assert await first.reply() is None
                assert await second.call(2, "echo") is not None
                # all three busy now: the next is refused, clearly, and nothing breaks
                for conn in (second, third, fourth):
                    await conn.send({"id": 9, "method": "wait", "params": {}})
                await anyio.wait_all_tasks_blocked()
                async with connect(sock) as fifth:
                    refused = await fifth.reply()
                    assert refused is not None and refused["error"]["code"] == CODE_TRY_AGAIN
                    assert refused["error"]["msg"] == "too many connections"
                await api.release_all()
                for conn in (second, third, fourth):
                    assert await conn.reply() == {"id": 9, "result": "released"}
        assert stats.connections_evicted == 1 and stats.connections_refused == 1


SERVER = """
import resource, sys, anyio
from functools import partial
from rpc.server import serve, Limits

async def echo(method, params, peer):
    return params

async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    limits = Limits(max_connections=1000)
    async with anyio.create_task_group() as tg:
        await tg.start(partial(serve, sys.argv[1], echo, mutating=frozenset(), limits=limits))
        print("ready", flush=True)

anyio.run(main)
"""


def test_the_server_survives_descriptor_exhaustion_and_serves_again(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(sock)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        for _ in range(100):  # twice what the server may hold
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(sock))
            clients.append(c)
        probe = clients[-1]  # queued in the backlog while the server has no descriptor
        probe.settimeout(30)
        probe.sendall(b'{"id":1,"method":"echo","params":{"n":1}}\n')
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        assert ready and b"cannot accept connections" in proc.stderr.readline()
        for c in clients[:-1]:
            c.close()
        assert probe.recv(4096) == b'{"id":1,"result":{"n":1}}\n'
        assert proc.poll() is None
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.communicate(timeout=30)
