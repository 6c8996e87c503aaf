"""Errors of the netlink package: one base, subclasses named by cause, carrying fields."""

from __future__ import annotations


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
