"""Errors of the netlink package: one base, subclasses named by cause, carrying fields."""

from __future__ import annotations

import os


class NetlinkError(Exception):
    """Base of everything the kernel-facing layer raises."""


class NetnsNotFound(NetlinkError):
    """The namespace path does not exist (the pod's sandbox is gone)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"network namespace {path!r} does not exist")
        self.path = path


class NotANetns(NetlinkError):
    """The path exists but is not a network namespace."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path!r} is not a network namespace")
        self.path = path


class DatapathClosed(NetlinkError):
    """The Datapath was used after ``close()`` (your code closed it)."""

    def __init__(self) -> None:
        super().__init__("the datapath is closed")


class RequestFailed(NetlinkError):
    """The kernel refused a netlink request (or the netlink socket itself failed)."""

    def __init__(self, op: str, errno: int, detail: str = "") -> None:
        reason = os.strerror(errno) + (f": {detail}" if detail else "")
        super().__init__(f"{op}: {reason}")
        self.op = op
        self.errno = errno
        self.detail = detail


class LinkExists(NetlinkError):
    """The pod's interface name is already taken inside the pod's namespace."""

    def __init__(self, name: str) -> None:
        super().__init__(f"link {name!r} already exists in the pod namespace")
        self.name = name


class HostVethExists(NetlinkError):
    """The host-side veth name is taken by a link that is not this pod's."""

    def __init__(self, name: str) -> None:
        super().__init__(f"host link {name!r} already exists")
        self.name = name


class WireFailed(NetlinkError):
    """Wiring a pod failed at ``step``; everything it had made was removed again."""

    def __init__(self, step: str, cause: NetlinkError) -> None:
        super().__init__(f"wiring failed at {step}: {cause}")
        self.step = step
        self.cause = cause


class ProgramRefused(NetlinkError):
    """The kernel would not load an eBPF program (``netlink.dot1q``): the errno, and the
    verifier's log when it said why."""

    def __init__(self, name: str, errno: int, log: str = "") -> None:
        reason = os.strerror(errno) + (f": {log.strip()}" if log.strip() else "")
        super().__init__(f"load eBPF program {name}: {reason}")
        self.name = name
        self.errno = errno
        self.log = log
