"""Kernel-facing layer: pod wiring, ENI links, rules, routes, the event watcher, nftables."""

from netlink.errors import NetlinkError, NetnsNotFound, NotANetns

__all__ = ["NetlinkError", "NetnsNotFound", "NotANetns"]
