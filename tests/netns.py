"""Network namespaces for tests: unique names, commands inside, removal even on failure.

Every namespace a test or the demo makes is named ``pw-<tag>-<pid>-<hex>``, so concurrent runs
never collide and ``python -m tests.cleanup`` can remove what a crashed run left behind (the pid
tells whether its owner is still alive). Nothing here touches the machine's own namespace beyond
creating the ``/run/netns`` entries themselves.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence

PREFIX = "pw-"
NETNS_DIR = "/run/netns"


def unique_name(tag: str) -> str:
    """Return a namespace name no other run can be using: ``pw-<tag>-<pid>-<hex>``."""
    return f"{PREFIX}{tag}-{os.getpid()}-{secrets.token_hex(3)}"


class Netns:
    """A named network namespace made by ``ip netns add``; ``close()`` deletes it.

    With ``create=False`` it wraps a namespace someone else made (the emulator's nodes) and
    ``close()`` leaves it alone.
    """

    def __init__(self, name: str, *, create: bool = True) -> None:
        self.name = name
        self.path = f"{NETNS_DIR}/{name}"
        self.owned = create
        if create:
            subprocess.run(["ip", "netns", "add", name], check=True)
            self.run("ip", "link", "set", "lo", "up")

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

    def popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside the namespace and return the running process."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kwargs)  # type: ignore[call-overload,no-any-return]

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl inside this namespace only (never in the machine's own)."""
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def close(self) -> None:
        if self.owned:
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


@contextlib.contextmanager
def netns(tag: str) -> Iterator[Netns]:
    """Yield a fresh namespace and delete it afterwards, whatever happens."""
    ns = Netns(unique_name(tag))
    try:
        yield ns
    finally:
        ns.close()


def veth_between(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """Cable ``a`` and ``b`` with a veth pair created inside ``a`` (never in the machine's own
    namespace), both ends up."""
    a.run("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    a.run("ip", "link", "set", a_if, "up")
    b.run("ip", "link", "set", b_if, "up")
