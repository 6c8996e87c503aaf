"""Kernel-facing layer: pod wiring, ENI links, rules, routes, the event watcher, nftables.

``import netlink`` stays light: the datapath names (``Datapath``, ``PodNet``, ``WiredPod``) load
``netlink.veth`` and with it pyroute2's message classes (~0.2 s) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from netlink.errors import (
    DatapathClosed,
    HostVethExists,
    LinkExists,
    NetlinkError,
    NetnsNotFound,
    NotANetns,
    RequestFailed,
    WireFailed,
)
from netlink.names import HOST_VETH_PREFIX, host_veth_name

if TYPE_CHECKING:
    from netlink.veth import Datapath, PodNet, WiredPod

_FROM_VETH = frozenset({"Datapath", "PodNet", "WiredPod"})


def __getattr__(name: str) -> Any:
    if name in _FROM_VETH:
        from netlink import veth

        return getattr(veth, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HOST_VETH_PREFIX",
    "Datapath",
    "DatapathClosed",
    "HostVethExists",
    "LinkExists",
    "NetlinkError",
    "NetnsNotFound",
    "NotANetns",
    "PodNet",
    "RequestFailed",
    "WireFailed",
    "WiredPod",
    "host_veth_name",
]
