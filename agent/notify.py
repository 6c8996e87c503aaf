"""systemd's notification protocol (sd_notify) without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: a Unix datagram socket given as a path
or, with a leading ``@``, an abstract name. Each datagram is newline-separated ``KEY=value``
assignments: ``READY=1`` once started, ``STATUS=...`` free text for ``systemctl status``,
``STOPPING=1`` when shutting down, ``WATCHDOG=1`` as a keep-alive. With ``WatchdogSec=`` set,
systemd passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process expected to ping) and
restarts the service when no ping arrives within that time.

``serve_watchdog`` pings at half the interval, and only while ``Health`` says the agent is
alive: a wedged event loop stops pinging by itself, and a dead service stops it on purpose,
so either way systemd restarts the agent. Outside systemd (no ``$NOTIFY_SOCKET``) everything
here is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from functools import partial

import anyio
import anyio.abc

from agent.health import Health

log = logging.getLogger("podwire.notify")


class NotifyError(Exception):
    """Base of this module's errors."""


class NotifySettingInvalid(NotifyError):
    """``$NOTIFY_SOCKET`` or ``$WATCHDOG_USEC`` holds something we cannot use."""

    def __init__(self, variable: str, value: str, reason: str) -> None:
        super().__init__(f"${variable}={value!r}: {reason}")
        self.variable = variable
        self.value = value
        self.reason = reason


class NotifyFailed(NotifyError):
    """The datagram could not be sent (systemd gone, socket full...)."""

    def __init__(self, address: str, error: OSError) -> None:
        super().__init__(f"sd_notify to {address}: {error}")
        self.address = address
        self.errno = error.errno


def socket_address(value: str) -> str:
    """The AF_UNIX address for a ``$NOTIFY_SOCKET`` value; raises NotifySettingInvalid."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifySettingInvalid("NOTIFY_SOCKET", value, "expected an absolute path or @name")


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``assignments`` ("READY=1", "STATUS=...") as one datagram to ``$NOTIFY_SOCKET``.

    Returns False when there is no ``$NOTIFY_SOCKET`` (not run by systemd), True once sent.
    Never blocks: raises NotifyFailed when the datagram cannot be sent right now, and
    NotifySettingInvalid for an unusable ``$NOTIFY_SOCKET``.
    """
    env = os.environ if environ is None else environ
    value = env.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = socket_address(value)
    payload = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.setblocking(False)
            s.sendto(payload, address)
        except OSError as e:
            raise NotifyFailed(value, e) from None
    return True


def ready(status: str = "", environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd start-up is complete (``READY=1``, with an optional ``STATUS=``)."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []), environ=environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    return notify(f"STATUS={text}", environ=environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    return notify("STOPPING=1", environ=environ)


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """The watchdog timeout in seconds, or None when systemd expects no pings from us.

    None when ``$WATCHDOG_USEC`` is unset or 0, or when ``$WATCHDOG_PID`` names another
    process. Raises NotifySettingInvalid for a value that is not a number.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    if not usec.isdigit():
        raise NotifySettingInvalid("WATCHDOG_USEC", usec, "expected microseconds")
    expected = env.get("WATCHDOG_PID", "")
    if expected:
        if not expected.isdigit():
            raise NotifySettingInvalid("WATCHDOG_PID", expected, "expected a process id")
        if int(expected) != (os.getpid() if pid is None else pid):
            return None
    return int(usec) / 1e6 or None


async def serve_watchdog(
    health: Health,
    *,
    interval: float | None = None,
    send: Callable[[], bool] | None = None,
    environ: Mapping[str, str] | None = None,
    task_status: anyio.abc.TaskStatus[float | None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Ping ``WATCHDOG=1`` every ``interval / 2`` seconds while ``health`` says alive.

    ``interval`` defaults to ``watchdog_interval(environ)``; ``send`` to a WATCHDOG=1 datagram.
    ``task_status.started(interval)``; returns at once when there is no watchdog (interval
    None), else runs until cancelled. A failed send is logged and retried at the next tick.
    Do not track it with ``Health.run``: it is how liveness reaches systemd.
    """
    if interval is None:
        interval = watchdog_interval(environ)
    task_status.started(interval)
    if interval is None:
        return
    ping = send if send is not None else partial(notify, "WATCHDOG=1", environ=environ)
    period = interval / 2
    withheld = False
    tick = anyio.current_time()
    while True:
        live = health.liveness()
        if live.alive:
            if withheld:
                log.warning("watchdog pings resumed")
            withheld = False
            try:
                ping()
            except NotifyError as e:
                log.warning("watchdog ping failed", extra={"error": str(e)})
        elif not withheld:
            withheld = True
            log.error("agent not alive: withholding watchdog pings", extra={"dead": live.dead})
        tick += period  # absolute ticks: a slow send does not push the next ping later
        await anyio.sleep_until(tick)
