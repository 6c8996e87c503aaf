"""The emulator's network namespaces: unique names, ``ip`` commands inside, crash cleanup.

Names follow the project's convention ``pw-<tag>-<pid>-<hex>`` (as ``tests/netns.py``), so
``python -m cloud.emulator cleanup`` and ``python -m tests.cleanup`` both remove what a crashed
run left. Every kernel change goes through ``ip -n <ours> ...``: ``ip`` enters the namespace
itself and fails if it is missing, so nothing can land in the machine's own namespace (a
pyroute2 socket opened from a setns'd thread is not guaranteed to be, in 0.9.7).
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from cloud.emulator.errors import FabricError, NotOurNamespace
from netlink.ns import entered_path

PREFIX = "pw-"
NETNS_DIR = "/run/netns"

T = TypeVar("T")


def unique_name(tag: str) -> str:
    """Return a namespace name no other run can be using: ``pw-<tag>-<pid>-<hex>``."""
    return f"{PREFIX}{tag}-{os.getpid()}-{secrets.token_hex(3)}"


class Namespace:
    """A named network namespace this process made; ``delete()`` removes it."""

    def __init__(self, name: str) -> None:
        if not name.startswith(PREFIX):
            raise NotOurNamespace(name)
        self.name = name
        self.path = f"{NETNS_DIR}/{name}"

    @classmethod
    def create(cls, tag: str) -> Namespace:
        """Make a fresh namespace with ``lo`` up and return it."""
        ns = cls(unique_name(tag))
        subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
        try:
            ns.ip_batch(["link set lo up"])
        except BaseException:
            ns.delete()
            raise
        return ns

    def ip_batch(self, commands: Sequence[str]) -> None:
        """Run ``ip`` commands inside this namespace in one process; raise FabricError."""
        if not commands:
            return
        script = "\n".join(commands) + "\n"
        done = subprocess.run(
            ["ip", "-n", self.name, "-batch", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise FabricError(self.name, script, done.stderr)

    def ip_text(self, *args: str) -> str:
        """Return the output of one ``ip`` query inside this namespace."""
        return subprocess.run(
            ["ip", "-n", self.name, *args], check=True, capture_output=True, text=True, timeout=30
        ).stdout

    def sysctls(self, values: dict[str, str]) -> None:
        """Set sysctls inside this namespace only (never in the machine's own)."""
        args = [f"{k}={v}" for k, v in values.items()]
        self.run("sysctl", "-q", "-w", *args)

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace and return the finished process (text mode)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace and return the running process."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a helper thread inside this namespace and return its result.

        Sockets ``fn`` creates stay in this namespace after the thread leaves it.
        """
        return call_in_netns(self.path, fn)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"


def call_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a short-lived thread that entered the namespace at ``path``."""
    out: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)

    def worker() -> None:
        try:
            with entered_path(path):
                out.put((True, fn()))
        except BaseException as e:
            out.put((False, e))

    thread = threading.Thread(target=worker, name="pw-netns-call", daemon=True)
    thread.start()
    thread.join()
    ok, value = out.get()
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def owner_pid(name: str) -> int | None:
    """The pid encoded in a ``pw-<tag>-<pid>-<hex>`` name, or None."""
    try:
        return int(name.split("-")[-2])
    except (IndexError, ValueError):
        return None


def _owner_alive(name: str) -> bool:
    pid = owner_pid(name)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(everything: bool = False, pid: int | None = None) -> list[str]:
    """Remove ``pw-`` namespaces whose owning process is gone (all of them with
    ``everything``; only those of run ``pid`` if given), first ending the processes still running
    inside them; return the names removed."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        if not name.startswith(PREFIX) or (not everything and _owner_alive(name)):
            continue
        if pid is not None and owner_pid(name) != pid:
            continue
        inside = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
        ).stdout.split()
        for victim in inside:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(victim), 9)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        removed.append(name)
    return removed
