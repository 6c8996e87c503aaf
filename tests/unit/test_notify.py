"""sd_notify against a fake systemd: a bound Unix datagram socket, by path or abstract name."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import anyio
import pytest
import trio
import trio.testing

from agent import notify
from agent.health import Health
from agent.notify import (
    NotifyFailed,
    NotifySettingInvalid,
    serve_watchdog,
    socket_address,
    watchdog_interval,
)


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A fake systemd notify socket and the $NOTIFY_SOCKET value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        value = str(tmp_path / "notify.sock")
        sock.bind(value)
    else:
        value = f"@podwire-test-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + value[1:])
    sock.setblocking(False)
    try:
        yield sock, value
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_socket_address() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@/org/freedesktop/systemd1/notify/1") == (
        "\0/org/freedesktop/systemd1/notify/1"
    )
    for bad in ("relative/notify", "@", "vsock:2:1234"):
        with pytest.raises(NotifySettingInvalid) as e:
            socket_address(bad)
        assert e.value.variable == "NOTIFY_SOCKET"


def test_without_systemd_nothing_is_sent() -> None:
    assert notify.notify("READY=1", environ={}) is False
    assert notify.ready("up", environ={"NOTIFY_SOCKET": ""}) is False


def test_messages_reach_the_socket(systemd: tuple[socket.socket, str]) -> None:
    sock, value = systemd
    env = {"NOTIFY_SOCKET": value}
    assert notify.ready("serving 3 pods", environ=env)
    assert notify.status("restoring", environ=env)
    assert notify.stopping(environ=env)
    assert notify.notify("WATCHDOG=1", environ=env)
    assert notify.ready(environ=env)
    assert received(sock) == [
        "READY=1\nSTATUS=serving 3 pods",
        "STATUS=restoring",
        "STOPPING=1",
        "WATCHDOG=1",
        "READY=1",
    ]


def test_environment_is_read_when_not_given(
    systemd: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, value = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify.notify("STATUS=from os.environ")
    assert received(sock) == ["STATUS=from os.environ"]


def test_a_gone_systemd_is_an_error_naming_the_socket(tmp_path: Path) -> None:
    value = str(tmp_path / "nobody.sock")
    with pytest.raises(NotifyFailed) as e:
        notify.notify("READY=1", environ={"NOTIFY_SOCKET": value})
    assert e.value.address == value and e.value.errno is not None


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, None, None),
        ({"WATCHDOG_USEC": "0"}, None, None),
        ({"WATCHDOG_USEC": "30000000"}, None, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1234"}, 1234, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1234"}, 4321, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, None, 0.5),
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int | None, expected: float | None) -> None:
    assert watchdog_interval(env, pid=pid) == expected


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"WATCHDOG_USEC": "30s"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "1", "WATCHDOG_PID": "me"}, "WATCHDOG_PID"),
    ],
)
def test_watchdog_interval_rejects_garbage(env: dict[str, str], variable: str) -> None:
    with pytest.raises(NotifySettingInvalid) as e:
        watchdog_interval(env)
    assert e.value.variable == variable


@pytest.mark.anyio
async def test_no_watchdog_returns_at_once() -> None:
    async with anyio.create_task_group() as tg:
        assert await tg.start(partial(serve_watchdog, Health(), environ={})) is None
    # the group closed: serve_watchdog returned by itself


@pytest.mark.anyio
async def test_watchdog_pings_the_real_socket(systemd: tuple[socket.socket, str]) -> None:
    sock, value = systemd
    env = {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    async with anyio.create_task_group() as tg:
        interval = await tg.start(partial(serve_watchdog, Health(), environ=env))
        assert interval == 0.1
        with anyio.fail_after(5):
            while len(got := received(sock)) < 1:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert set(got) == {"WATCHDOG=1"}


@pytest.mark.trio
async def test_watchdog_pacing_follows_liveness(
    autojump_clock: trio.testing.MockClock, systemd: tuple[socket.socket, str]
) -> None:
    sock, value = systemd
    env = {"NOTIFY_SOCKET": value}
    health = Health()
    t0 = trio.current_time()
    pings: list[float] = []

    def send() -> bool:
        pings.append(trio.current_time() - t0)
        return notify.notify("WATCHDOG=1", environ=env)

    async def service(lifetime: float) -> None:
        async with health.track("refiller"):
            await trio.sleep(lifetime)

    async with trio.open_nursery() as n:
        n.start_soon(service, 12)  # exits at 12: dead, pings stop
        assert await n.start(partial(serve_watchdog, health, interval=10, send=send)) == 10
        await trio.sleep(21)
        n.start_soon(service, 100)  # tracked again at 21: alive, pings resume at the next tick
        await trio.sleep(11)
        n.cancel_scope.cancel()
    assert pings == [0, 5, 10, 25, 30]
    assert received(sock) == ["WATCHDOG=1"] * 5


@pytest.mark.trio
async def test_watchdog_survives_a_failed_ping(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "2000000"}
    caplog.set_level(logging.WARNING, logger="podwire.notify")
    with trio.move_on_after(5):
        await serve_watchdog(Health(), environ=env)
    assert [r.getMessage() for r in caplog.records] == ["watchdog ping failed"] * 5  # 0,1,2,3,4
