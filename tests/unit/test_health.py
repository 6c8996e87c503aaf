"""Liveness, readiness, the HTTP answers and the conflist gated on readiness."""

from __future__ import annotations

import json
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

import anyio
import pytest
import trio
import trio.testing

from agent import install
from agent.health import (
    DEFAULT_CONDITIONS,
    LIVENESS_PATH,
    METRICS_PATH,
    POOL_CAN_SERVE,
    PROVIDER_REACHABLE,
    READINESS_PATH,
    STATE_RESTORED,
    BadRequest,
    Health,
    ServiceAlreadyTracked,
    install_when_ready,
    parse_request_head,
    pool_readiness,
    respond,
    serve_http,
)
from agent.pool.ipam import IpPool


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def all_ready(h: Health) -> None:
    for name in DEFAULT_CONDITIONS:
        h.set_ready(name, True, "fine")


# -- the registry -----------------------------------------------------------------------------


def test_conditions_start_failing_and_ready_needs_all() -> None:
    h = Health(clock=Clock())
    r = h.readiness()
    assert not r.ready and set(r.failing) == {STATE_RESTORED, PROVIDER_REACHABLE, POOL_CAN_SERVE}
    h.set_ready(STATE_RESTORED, True, "restored 3 allocations")
    h.set_ready(PROVIDER_REACHABLE, True, "static")
    assert h.readiness().failing == {POOL_CAN_SERVE: "not checked yet"}
    h.set_ready(POOL_CAN_SERVE, True, "16 free")
    assert h.ready()
    h.set_ready(PROVIDER_REACHABLE, False, "EC2 unreachable: timeout")
    assert h.readiness().failing == {PROVIDER_REACHABLE: "EC2 unreachable: timeout"}
    assert Health(conditions=(), clock=Clock()).ready()  # nothing declared: nothing to wait for


def test_checks_are_evaluated_at_each_query_and_a_broken_check_is_not_ready() -> None:
    h = Health(conditions=(), clock=Clock())
    state = {"ok": False}
    h.add_check("pool", lambda: (state["ok"], "the pool holds no addresses yet"))
    assert h.readiness().failing == {"pool": "the pool holds no addresses yet"}
    state["ok"] = True
    assert h.ready()

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    h.add_check("other", broken)
    assert h.readiness().failing == {"other": "check failed: RuntimeError: boom"}


def test_pool_readiness() -> None:
    pool = IpPool(cooldown=30)
    ok, reason = pool_readiness(pool, 0.0)
    assert not ok and "no addresses" in reason
    pool.add_block("10.0.1.0/30", [IPv4Address("10.0.1.1"), IPv4Address("10.0.1.2")])
    assert pool_readiness(pool, 0.0) == (True, "2 total, 0 assigned, 0 cooling, 2 free")


@pytest.mark.anyio
async def test_track_marks_exit_crash_and_cancel_dead() -> None:
    h = Health(clock=Clock())
    async with h.track("exits"):
        assert h.liveness().alive and h.liveness().services == ("exits",)
    with pytest.raises(ValueError):
        async with h.track("crashes"):
            raise ValueError("bad")
    with anyio.CancelScope() as scope:
        async with h.track("cancelled"):
            scope.cancel()
            await anyio.sleep(1)
    live = h.liveness()
    assert not live.alive
    assert live.dead == {
        "exits": "exited",
        "crashes": "crashed: ValueError: bad",
        "cancelled": "cancelled",
    }
    async with h.track("exits"):  # a dead service may be tracked again (restarted)
        assert "exits" not in h.liveness().dead


@pytest.mark.anyio
async def test_a_name_is_tracked_once() -> None:
    h = Health(clock=Clock())
    async with h.track("rpc"):
        with pytest.raises(ServiceAlreadyTracked):
            async with h.track("rpc"):
                pass


@pytest.mark.anyio
async def test_run_passes_the_started_value_and_tracks() -> None:
    h = Health(clock=Clock())

    async def service(x: int, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        task_status.started(x * 2)
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        assert await tg.start(h.run, "svc", service, 21) == 42
        assert h.liveness().services == ("svc",) and h.alive()
        tg.cancel_scope.cancel()
    assert h.liveness().dead == {"svc": "cancelled"}


def test_heartbeats_go_stale() -> None:
    clock = Clock()
    h = Health(clock=clock)

    async def main() -> None:
        async with h.track("refiller", stale_after=10):
            clock.now = 10.0
            assert h.alive()
            clock.now = 10.5
            assert h.liveness().dead == {"refiller": "no heartbeat for 10.5s (limit 10s)"}
            h.beat("refiller")
            assert h.alive()

    anyio.run(main)


@pytest.mark.trio
async def test_wait_ready_wakes_on_set_and_polls_checks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Health(conditions=(STATE_RESTORED,))
    t0 = trio.current_time()
    async with trio.open_nursery() as n:

        async def restore() -> None:
            await trio.sleep(5)
            h.set_ready(STATE_RESTORED, True, "restored")

        n.start_soon(restore)
        await h.wait_ready()
        assert trio.current_time() - t0 == 5
    # A check changes without telling: seen at the next poll (1 s), not before.
    flag = {"ok": False}
    h.add_check("pool", lambda: (flag["ok"], "empty"))
    t1 = trio.current_time()
    async with trio.open_nursery() as n:

        async def fill() -> None:
            await trio.sleep(2.5)
            flag["ok"] = True

        n.start_soon(fill)
        await h.wait_ready()
        assert trio.current_time() - t1 == 3


# -- HTTP, pure -------------------------------------------------------------------------------


def test_parse_request_head() -> None:
    assert parse_request_head(b"GET /readyz?verbose HTTP/1.1\r\nHost: x\r\n\r\n") == (
        "GET",
        "/readyz",
    )
    for bad in (
        b"GET /healthz\r\n\r\n",
        b"GET healthz HTTP/1.1\r\n\r\n",
        b"\xff / HTTP/1.1\r\n\r\n",
        b"G-T / HTTP/1.1\r\n\r\n",
        b"GET / SPDY/3\r\n\r\n",
    ):
        with pytest.raises(BadRequest) as e:
            parse_request_head(bad)
        assert e.value.status == 400


def test_respond() -> None:
    h = Health(clock=Clock())
    r = respond(h, "GET", READINESS_PATH)
    assert r.status == 503 and r.content_type == "application/json"
    body = json.loads(r.body)
    assert body["ready"] is False and set(body["failing"]) == set(DEFAULT_CONDITIONS)
    all_ready(h)
    r = respond(h, "GET", READINESS_PATH)
    assert r.status == 200 and json.loads(r.body)["conditions"][STATE_RESTORED] == {
        "ok": True,
        "reason": "fine",
    }
    assert respond(h, "GET", LIVENESS_PATH).status == 200
    assert respond(h, "GET", LIVENESS_PATH).body == b"ok\n"
    assert respond(h, "GET", METRICS_PATH).status == 404  # no metrics given
    m = respond(h, "GET", METRICS_PATH, metrics_text=lambda: b"podwire_x 1\n")
    assert m.status == 200 and m.body == b"podwire_x 1\n" and "text/plain" in m.content_type
    assert respond(h, "GET", "/").status == 404
    r = respond(h, "POST", LIVENESS_PATH)
    assert r.status == 405 and ("Allow", "GET") in r.headers

    def broken() -> bytes:
        raise RuntimeError("collector")

    assert respond(h, "GET", METRICS_PATH, metrics_text=broken).status == 500
    encoded = respond(h, "GET", LIVENESS_PATH).encode()
    assert encoded.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 3\r\n" in encoded and b"Connection: close\r\n" in encoded
    assert encoded.endswith(b"\r\n\r\nok\n")


# -- HTTP over TCP ----------------------------------------------------------------------------


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        await s.send(request)
        data = b""
        while True:
            try:
                data += await s.receive()
            except anyio.EndOfStream:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


@pytest.mark.anyio
async def test_serve_http_answers_probes_and_metrics() -> None:
    h = Health()
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(serve_http, h, "127.0.0.1", 0, metrics_text=lambda: b"m 1\n"))
        assert port > 0
        status, headers, body = await http(port, get("/readyz"))
        assert status == 503 and headers["content-type"] == "application/json"
        assert set(json.loads(body)["failing"]) == set(DEFAULT_CONDITIONS)
        all_ready(h)
        status, _, _ = await http(port, get("/readyz"))
        assert status == 200
        status, headers, body = await http(port, get("/healthz"))
        assert (status, body, headers["connection"]) == (200, b"ok\n", "close")
        assert headers["content-length"] == "3"
        status, _, body = await http(port, get("/metrics"))
        assert (status, body) == (200, b"m 1\n")
        assert (await http(port, get("/nope")))[0] == 404
        post = b"POST /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        status, headers, _ = await http(port, post)
        assert status == 405 and headers["allow"] == "GET"
        assert (await http(port, b"garbage\r\n\r\n"))[0] == 400
        assert (await http(port, b"GET /" + b"x" * 9000))[0] == 431
        for _ in range(3):  # clients that leave without a request do not end the server
            async with await anyio.connect_tcp("127.0.0.1", port) as s:
                await s.send(b"GET /hea")
        assert (await http(port, get("/healthz")))[0] == 200

        async def service(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            task_status.started()

        await tg.start(h.run, "netlink", service)  # returns at once: dead
        status, _, body = await http(port, get("/healthz"))
        assert (status, body) == (503, b"dead: netlink (exited)\n")
        tg.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_slow_client_gets_408(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as n:
        port = await n.start(serve_http, Health(), "127.0.0.1", 0)
        t0 = trio.current_time()
        status, _, body = await http(port, b"GET /healthz HTTP/1.1\r\n")  # never finished
        assert (status, body) == (408, b"request head not received in time\n")
        assert trio.current_time() - t0 == pytest.approx(5.0)
        n.cancel_scope.cancel()


@pytest.mark.anyio
async def test_serve_http_rejects_a_taken_port() -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_http, Health(), "127.0.0.1", 0)
        with pytest.raises(OSError):
            await serve_http(Health(), "127.0.0.1", port)
        tg.cancel_scope.cancel()


# -- the conflist, written once ready ---------------------------------------------------------


@pytest.mark.anyio
async def test_conflist_is_written_only_once_ready_and_kept_on_shutdown(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    write = partial(
        install.install,
        bin_dir=bin_dir,
        conf_dir=conf_dir,
        socket="/run/podwire/agent.sock",
        spool_dir="/run/podwire/spool",
        interpreter="/usr/bin/python3",
    )
    calls = 0

    def install_fn() -> list[Path]:
        nonlocal calls
        calls += 1
        return write()

    h = Health()
    conflist = conf_dir / install.CONFLIST_NAME
    async with anyio.create_task_group() as tg:
        await tg.start(install_when_ready, h, install_fn)
        h.set_ready(STATE_RESTORED, True, "restored")
        h.set_ready(PROVIDER_REACHABLE, True, "static")
        await anyio.sleep(0.05)
        assert calls == 0 and not conflist.exists()
        h.set_ready(POOL_CAN_SERVE, True, "14 free")
        with anyio.fail_after(5):
            while not conflist.exists():
                await anyio.sleep(0.01)
        # still running services around it are cancelled: nothing is removed
        tg.cancel_scope.cancel()
    assert calls == 1
    assert json.loads(conflist.read_text())["plugins"][0]["type"] == "podwire"
    assert (bin_dir / install.PLUGIN_NAME).read_bytes().startswith(b"#!/usr/bin/python3 -IS\n")


@pytest.mark.trio
async def test_install_when_ready_returns_after_installing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Health(conditions=(STATE_RESTORED,))
    t0 = trio.current_time()
    installed: list[float] = []

    def install_fn() -> list[Path]:
        installed.append(trio.from_thread.run_sync(trio.current_time) - t0)
        return []

    async with trio.open_nursery() as n:
        await n.start(install_when_ready, h, install_fn)
        await trio.sleep(7)
        h.set_ready(STATE_RESTORED, True, "restored")
    # the nursery closed: install_when_ready returned on its own after installing
    assert installed == [7.0] and trio.current_time() - t0 == 7


@pytest.mark.anyio
async def test_install_failure_propagates(tmp_path: Path) -> None:
    h = Health(conditions=())

    def install_fn() -> list[Path]:
        raise PermissionError(13, "Permission denied", str(tmp_path))

    with pytest.raises(ExceptionGroup) as e:
        async with anyio.create_task_group() as tg:
            await tg.start(install_when_ready, h, install_fn)
    assert e.group_contains(PermissionError)
