"""Liveness and readiness of the agent, and the small HTTP server that answers them.

Theory of operation:

- *Alive* means: the event loop answers (the HTTP server runs in the daemon's task group, so a
  wedged loop answers nothing and the probe times out), every tracked service is still running,
  and every service that promised heartbeats (``stale_after``) beat recently. Services are
  tracked by ``Health.track`` (a context manager) or ``Health.run`` (a wrapper for
  ``tg.start``): alive on entry, dead on any exit — a long-lived service that returns, crashes
  or is cancelled is no longer doing its job. A dead service stays dead; kubelet (liveness
  probe) or systemd (watchdog, agent/notify.py) restarts the agent.
- *Ready* means: every readiness condition holds. Conditions are declared up front as failing
  ("not checked yet"), so the agent is never ready before the daemon said so; the daemon sets
  them (``set_ready``: state restored, provider reachable) or registers a check evaluated at
  each query (``add_check``: the pool can serve an ADD).
- The CNI conflist is written only once the agent is ready (``install_when_ready``): kubelet
  treats the conflist as "network ready" and would otherwise schedule pods that get no address.

The HTTP side keeps the protocol pure: ``parse_request_head`` turns bytes into a request line,
``respond`` turns a request into a ``Response``; ``serve_http`` is the thin anyio shell (one
request per connection, ``Connection: close``). ``Health.report`` is the same answer as a value,
for ``agentctl health`` over the RPC socket.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from agent.pool.ipam import IpPool

log = logging.getLogger("podwire.health")

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
METRICS_PATH = "/metrics"

# Readiness conditions the daemon sets (see the module docstring).
STATE_RESTORED = "state"
PROVIDER_REACHABLE = "provider"
POOL_CAN_SERVE = "pool"
DEFAULT_CONDITIONS = (STATE_RESTORED, PROVIDER_REACHABLE, POOL_CAN_SERVE)

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT = 5.0


class HealthError(Exception):
    """Base of this module's errors."""


class ServiceAlreadyTracked(HealthError):
    """Two running services share a name: the daemon's bug."""

    def __init__(self, name: str) -> None:
        super().__init__(f"service {name!r} is already tracked and alive")
        self.name = name


class BadRequest(HealthError):
    """The client sent something that is not an HTTP/1.x request head."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -- state ------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class _Service:
    alive: bool
    reason: str
    since: float
    last_beat: float
    stale_after: float | None


@attrs.frozen(kw_only=True)
class Condition:
    name: str
    ok: bool
    reason: str


@attrs.frozen(kw_only=True)
class Liveness:
    """``dead`` maps each dead service to why."""

    alive: bool
    dead: dict[str, str]
    services: tuple[str, ...]


@attrs.frozen(kw_only=True)
class Readiness:
    ready: bool
    conditions: tuple[Condition, ...]

    @property
    def failing(self) -> dict[str, str]:
        return {c.name: c.reason for c in self.conditions if not c.ok}


Check = Callable[[], tuple[bool, str]]


class Health:
    """The registry of tracked services and readiness conditions (see the module docstring).

    Queries read ``clock`` (anyio's by default), so call them from the event loop's thread.
    """

    def __init__(
        self,
        conditions: Sequence[str] = DEFAULT_CONDITIONS,
        *,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.clock = clock
        self._services: dict[str, _Service] = {}
        self._conditions: dict[str, Condition] = {
            n: Condition(name=n, ok=False, reason="not checked yet") for n in conditions
        }
        self._checks: dict[str, Check] = {}
        self._changed: anyio.Event | None = None  # created by the first waiter (needs a loop)

    def __repr__(self) -> str:
        live, ready = self.liveness(), self.readiness()
        return (
            f"<Health services={len(live.services)} dead={len(live.dead)} "
            f"ready={ready.ready} failing={sorted(ready.failing)}>"
        )

    def _notify(self) -> None:
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    # -- liveness ---------------------------------------------------------------------------

    @asynccontextmanager
    async def track(self, name: str, *, stale_after: float | None = None) -> AsyncIterator[None]:
        """Mark ``name`` alive for the body's duration, dead when it ends in any way.

        With ``stale_after`` the service must also call ``beat(name)`` at least that often.
        Raises ServiceAlreadyTracked when a live service has the same name; re-raises whatever
        the body raises.
        """
        current = self._services.get(name)
        if current is not None and current.alive:
            raise ServiceAlreadyTracked(name)
        now = self.clock()
        self._services[name] = _Service(
            alive=True, reason="", since=now, last_beat=now, stale_after=stale_after
        )
        try:
            yield
        except anyio.get_cancelled_exc_class():
            self._mark_dead(name, "cancelled")
            raise
        except BaseException as e:
            self._mark_dead(name, f"crashed: {type(e).__name__}: {e}")
            log.error("service crashed", extra={"service": name, "error": repr(e)})
            raise
        else:
            self._mark_dead(name, "exited")
            log.error("service exited", extra={"service": name})

    async def run(
        self,
        name: str,
        service: Callable[..., Awaitable[Any]],
        *args: Any,
        stale_after: float | None = None,
        task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``service(*args, task_status=task_status)`` tracked as ``name``.

        For ``await tg.start(health.run, "rpc", partial(serve, ...))``: the value the service
        passes to ``task_status.started`` reaches the caller unchanged.
        """
        async with self.track(name, stale_after=stale_after):
            await service(*args, task_status=task_status)

    def _mark_dead(self, name: str, reason: str) -> None:
        s = self._services[name]
        s.alive, s.reason, s.since = False, reason, self.clock()

    def beat(self, name: str) -> None:
        """Record a heartbeat of the tracked service ``name`` (ignored when not tracked)."""
        s = self._services.get(name)
        if s is not None:
            s.last_beat = self.clock()

    def liveness(self) -> Liveness:
        now = self.clock()
        dead = {}
        for name, s in self._services.items():
            if not s.alive:
                dead[name] = s.reason
            elif s.stale_after is not None and now - s.last_beat > s.stale_after:
                dead[name] = f"no heartbeat for {now - s.last_beat:.1f}s (limit {s.stale_after:g}s)"
        return Liveness(alive=not dead, dead=dead, services=tuple(self._services))

    def alive(self) -> bool:
        return self.liveness().alive

    # -- readiness --------------------------------------------------------------------------

    def set_ready(self, name: str, ok: bool, reason: str = "") -> None:
        """Set the readiness condition ``name`` (declared or new); ``reason`` says why."""
        old = self._conditions.get(name)
        new = Condition(name=name, ok=ok, reason=reason)
        self._conditions[name] = new
        if old is None or old.ok != ok:
            log.info("readiness", extra={"condition": name, "ok": ok, "reason": reason})
        self._notify()

    def add_check(self, name: str, check: Check) -> None:
        """Make ``name`` a condition computed by ``check()`` -> (ok, reason) at each query."""
        self._conditions.pop(name, None)
        self._checks[name] = check
        self._notify()

    def readiness(self) -> Readiness:
        conditions = list(self._conditions.values())
        for name, check in self._checks.items():
            try:
                ok, reason = check()
            except Exception as e:  # a broken check means not ready, never a 500
                ok, reason = False, f"check failed: {type(e).__name__}: {e}"
            conditions.append(Condition(name=name, ok=ok, reason=reason))
        return Readiness(ready=all(c.ok for c in conditions), conditions=tuple(conditions))

    def ready(self) -> bool:
        return self.readiness().ready

    async def wait_ready(self, *, poll: float = 1.0) -> None:
        """Return once ready. Re-evaluates on every ``set_ready`` and every ``poll`` seconds
        (the ``add_check`` conditions change without telling)."""
        while not self.ready():
            if self._changed is None:
                self._changed = anyio.Event()
            with anyio.move_on_after(poll):
                await self._changed.wait()

    # -- the answers as values --------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Liveness and readiness as one JSON-able value (for ``agentctl health``)."""
        live, ready = self.liveness(), self.readiness()
        return {
            "alive": live.alive,
            "services": {
                n: {"alive": n not in live.dead, "reason": live.dead.get(n, "")}
                for n in live.services
            },
            "ready": ready.ready,
            "conditions": {c.name: {"ok": c.ok, "reason": c.reason} for c in ready.conditions},
        }


def pool_readiness(pool: IpPool, now: float) -> tuple[bool, str]:
    """The POOL_CAN_SERVE check: the pool holds addresses (a full node stays ready: kubelet
    stops scheduling at max pods, and an exhausted pool answers ADD with code 11)."""
    counts = (
        f"{pool.total} total, {pool.assigned} assigned, {pool.cooling} cooling, "
        f"{pool.available(now)} free"
    )
    if pool.total == 0:
        return False, "the pool holds no addresses yet"
    return True, counts


# -- HTTP, pure -------------------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
# What prometheus_client.generate_latest produces.
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


@attrs.frozen(kw_only=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        """The whole HTTP/1.1 response, headers and body."""
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, '')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def parse_request_head(head: bytes) -> tuple[str, str]:
    """Return (method, path without the query) from a request head; raises BadRequest."""
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(400, "malformed request line")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "request line is not ASCII") from None
    if not method.isalpha() or not target.startswith("/"):
        raise BadRequest(400, "malformed request line")
    return method, target.split("?", 1)[0]


def respond(
    health: Health, method: str, path: str, *, metrics_text: Callable[[], bytes] | None = None
) -> Response:
    """Answer one request: /healthz (text), /readyz (JSON), /metrics, else 404; non-GET 405."""
    if path not in (LIVENESS_PATH, READINESS_PATH, METRICS_PATH) or (
        path == METRICS_PATH and metrics_text is None
    ):
        return Response(status=404, body=b"not found\n")
    if method != "GET":
        return Response(status=405, body=b"only GET\n", headers=(("Allow", "GET"),))
    if path == LIVENESS_PATH:
        live = health.liveness()
        if live.alive:
            return Response(status=200, body=b"ok\n")
        dead = ", ".join(f"{n} ({why})" for n, why in sorted(live.dead.items()))
        return Response(status=503, body=f"dead: {dead}\n".encode())
    if path == READINESS_PATH:
        ready = health.readiness()
        body = {
            "ready": ready.ready,
            "failing": ready.failing,
            "conditions": {c.name: {"ok": c.ok, "reason": c.reason} for c in ready.conditions},
        }
        return Response(
            status=200 if ready.ready else 503, body=orjson.dumps(body) + b"\n", content_type=JSON
        )
    assert metrics_text is not None
    try:
        text = metrics_text()
    except Exception as e:
        log.error("metrics collection failed", exc_info=True, extra={"error": repr(e)})
        return Response(status=500, body=b"metrics collection failed\n")
    return Response(status=200, body=text, content_type=METRICS_CONTENT_TYPE)


# -- HTTP, the shell --------------------------------------------------------------------------


async def _read_head(stream: anyio.abc.ByteStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_REQUEST_HEAD:
            raise BadRequest(431, "request head too large")
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            raise BadRequest(400, "connection closed mid-request") from None
    return data


async def _handle(
    stream: anyio.abc.ByteStream, health: Health, metrics_text: Callable[[], bytes] | None
) -> None:
    async with stream:
        try:
            with anyio.fail_after(READ_TIMEOUT):
                head = await _read_head(stream)
            method, path = parse_request_head(head)
            response = respond(health, method, path, metrics_text=metrics_text)
        except BadRequest as e:
            response = Response(status=e.status, body=f"{e.reason}\n".encode())
        except TimeoutError:
            response = Response(status=408, body=b"request head not received in time\n")
        except (anyio.BrokenResourceError, OSError):
            return  # the client went away
        try:
            await stream.send(response.encode())
            await stream.send_eof()
            # Read what the client still sends (a body we ignore) before closing, so the
            # kernel does not answer it with a reset that would discard our response.
            with anyio.move_on_after(1.0):
                while len(await stream.receive()) > 0:
                    pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass


async def serve_http(
    health: Health,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    metrics_text: Callable[[], bytes] | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer /healthz, /readyz and /metrics on ``host``:``port`` until cancelled.

    Port 0 picks a free port; ``task_status.started(port)`` passes the bound port once the
    listener accepts connections. ``metrics_text`` returns the Prometheus text (None: /metrics
    answers 404); it runs in the event loop's thread, as collectors read loop-owned state.
    Raises OSError when the address cannot be bound.
    """
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        log.info("health server listening", extra={"address": host, "port": bound})
        task_status.started(bound)

        async def handler(stream: anyio.abc.SocketStream) -> None:
            try:
                await _handle(stream, health, metrics_text)
            except Exception:  # one connection's failure must never end the server
                log.exception("health request failed")

        await listener.serve(handler)


async def install_when_ready(
    health: Health,
    install_fn: Callable[[], Sequence[Path]],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Wait until ``health`` is ready, run ``install_fn`` in a worker thread, then return.

    Started at once (it must not hold up the services readiness depends on). Nothing is
    removed on shutdown: pods keep working, and the conflist stays while the agent restarts
    (the plugin spools DELs and answers ADD "try again later" meanwhile). Raises what
    ``install_fn`` raises. Not a tracked service: it returns once done.
    """
    task_status.started()
    started = anyio.current_time()
    await health.wait_ready()
    changed = await anyio.to_thread.run_sync(install_fn)
    log.info(
        "cni config installed" if changed else "cni config already in place",
        extra={
            "changed": [str(p) for p in changed],
            "waited_ms": round((anyio.current_time() - started) * 1000, 1),
        },
    )
