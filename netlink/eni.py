"""Secondary ENI links on the node: addresses, the ENI's route table and rules; waiting for a
link with a given MAC to appear.

What a secondary ENI needs (as Amazon VPC CNI's ``setupENINetwork`` does): MTU, up, its primary
IP with the subnet's prefix length (the connected subnet route the kernel adds to ``main`` is
removed again: the subnet is reached through the ENI's own table), route table T = device
number + 1 holding ``<gw> dev <link> scope link`` and ``default via <gw> dev <link>``, and the
rule ``from <eni primary ip> lookup T`` at priority 32765. ``unconfigure`` removes all of it.
Both are idempotent. The ``fwmark 0x80/0x80 lookup main`` rule at 1024 (replies of SNATed and
NodePort connections leave through eth0) is ensured once per node.

These run rarely, so each uses pyroute2's IPRoute, opened inside the node's namespace by a
worker thread that entered it with setns (``netns.entered_path``); never pyroute2's ``netns=``,
which forks. ``netns_path`` None means the calling thread's own namespace (the agent's).

``wait_link`` waits for a link with a MAC on netlink events, not by polling: it subscribes to
RTNLGRP_LINK on a socket created inside the namespace, asks for one dump (after subscribing,
so no event can fall between), then reads dump replies and events as they come.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import anyio
import attrs
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

from netlink.errors import RequestFailed
from netlink.ns import entered_path

ENI_RULE_PRIORITY = 32765
FWMARK_RULE_PRIORITY = 1024
FWMARK = 0x80
MAIN_TABLE = 254
_SCOPE_LINK = 253
_RT_PROTO_KERNEL = 2


@attrs.frozen(kw_only=True)
class EniLinkSpec:
    """What one secondary ENI's link must look like."""

    mac: str
    address: IPv4Interface  # the ENI's primary IP with the subnet's prefix length
    gateway: IPv4Address
    table: int
    mtu: int = 9001


@attrs.frozen(kw_only=True)
class LinkInfo:
    ifindex: int
    name: str
    mac: str


@contextlib.contextmanager
def _ipr(netns_path: str | None) -> Iterator[Any]:
    # A socket stays in the namespace it was created in: enter, open, leave at once.
    if netns_path is None:
        ipr = IPRoute()
    else:
        with entered_path(netns_path):
            ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _tolerate(op: str, fn: Any, *ok: int) -> Any:
    try:
        return fn()
    except PyNetlinkError as e:
        if e.code in ok:
            return None
        raise RequestFailed(op, e.code, str(e)) from None


def _find(ipr: Any, mac: str) -> LinkInfo | None:
    mac = mac.lower()
    for link in ipr.get_links():
        if (link.get_attr("IFLA_ADDRESS") or "").lower() == mac:
            return LinkInfo(ifindex=link["index"], name=link.get_attr("IFLA_IFNAME"), mac=mac)
    return None


def find_link(netns_path: str | None, mac: str) -> LinkInfo | None:
    """Return the link with ``mac`` in the namespace, or None (blocking; a worker thread)."""
    with _ipr(netns_path) as ipr:
        return _find(ipr, mac)


def _table_routes(ipr: Any, table: int) -> list[Any]:
    routes = ipr.get_routes(family=socket.AF_INET, table=table)
    return [r for r in routes if r.get_attr("RTA_TABLE") == table]


def configure_sync(netns_path: str | None, spec: EniLinkSpec) -> LinkInfo:
    """Configure the ENI's link, table and rule (blocking; idempotent). Raises RequestFailed
    (ENODEV when no link has the MAC)."""
    with _ipr(netns_path) as ipr:
        link = _find(ipr, spec.mac)
        if link is None:
            raise RequestFailed("find ENI link", errno.ENODEV, spec.mac)
        idx = link.ifindex
        ip, plen = str(spec.address.ip), spec.address.network.prefixlen
        gw = str(spec.gateway)
        _tolerate("set ENI link up", lambda: ipr.link("set", index=idx, mtu=spec.mtu, state="up"))
        _tolerate(
            "add ENI address",
            lambda: ipr.addr("add", index=idx, address=ip, prefixlen=plen),
            errno.EEXIST,
        )
        # The kernel's connected route in main would send subnet traffic out of this ENI.
        net = spec.address.network
        _tolerate(
            "remove connected route",
            lambda: ipr.route(
                "del",
                dst=str(net.network_address),
                dst_len=net.prefixlen,
                oif=idx,
                table=MAIN_TABLE,
                proto=_RT_PROTO_KERNEL,
                scope=_SCOPE_LINK,
            ),
            errno.ESRCH,
            errno.ENOENT,
        )
        _tolerate(
            "add ENI gateway route",
            lambda: ipr.route(
                "replace", dst=gw, dst_len=32, oif=idx, scope=_SCOPE_LINK, table=spec.table
            ),
        )
        _tolerate(
            "add ENI default route",
            lambda: ipr.route(
                "replace", dst="0.0.0.0", dst_len=0, gateway=gw, oif=idx, table=spec.table
            ),
        )
        _tolerate(
            "add ENI rule",
            lambda: ipr.rule(
                "add", src=ip, src_len=32, table=spec.table, priority=ENI_RULE_PRIORITY
            ),
            errno.EEXIST,
        )
        return link


def unconfigure_sync(
    netns_path: str | None, *, table: int, address: IPv4Interface, mac: str | None = None
) -> None:
    """Remove the ENI's rule and table routes, and its address if the link is still there
    (blocking; idempotent: what is already gone is fine)."""
    with _ipr(netns_path) as ipr:
        gone = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV)
        _tolerate(
            "remove ENI rule",
            lambda: ipr.rule(
                "del",
                src=str(address.ip),
                src_len=32,
                table=table,
                priority=ENI_RULE_PRIORITY,
            ),
            *gone,
        )
        for route in _table_routes(ipr, table):
            _tolerate(
                "remove ENI route",
                lambda r=route: ipr.route(
                    "del",
                    table=table,
                    dst=r.get_attr("RTA_DST") or "0.0.0.0",
                    dst_len=r["dst_len"],
                    oif=r.get_attr("RTA_OIF"),
                ),
                *gone,
            )
        link = _find(ipr, mac) if mac else None
        if link is not None:
            _tolerate(
                "remove ENI address",
                lambda: ipr.addr(
                    "del",
                    index=link.ifindex,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                ),
                *gone,
            )


def ensure_fwmark_rule_sync(netns_path: str | None) -> None:
    """Ensure ``fwmark 0x80/0x80 lookup main`` at priority 1024 (blocking; idempotent)."""
    with _ipr(netns_path) as ipr:
        for rule in ipr.get_rules(family=socket.AF_INET):
            if (
                rule.get_attr("FRA_PRIORITY") == FWMARK_RULE_PRIORITY
                and rule.get_attr("FRA_FWMARK") == FWMARK
            ):
                return
        _tolerate(
            "add fwmark rule",
            lambda: ipr.rule(
                "add",
                fwmark=FWMARK,
                fwmask=FWMARK,
                table=MAIN_TABLE,
                priority=FWMARK_RULE_PRIORITY,
            ),
            errno.EEXIST,
        )


def configure_trunk_sync(netns_path: str | None, mac: str, mtu: int) -> LinkInfo:
    """The trunk ENI's link (security groups for pods): MTU and up, no address, no table: its
    branches' VLAN links carry the traffic (blocking; idempotent). Raises RequestFailed
    (ENODEV when no link has the MAC)."""
    with _ipr(netns_path) as ipr:
        link = _find(ipr, mac)
        if link is None:
            raise RequestFailed("find trunk link", errno.ENODEV, mac)
        idx = link.ifindex
        _tolerate("set trunk link up", lambda: ipr.link("set", index=idx, mtu=mtu, state="up"))
        return link


async def configure_trunk(netns_path: str | None, mac: str, mtu: int) -> LinkInfo:
    """``configure_trunk_sync`` in a worker thread."""
    return await anyio.to_thread.run_sync(configure_trunk_sync, netns_path, mac, mtu)


async def configure(netns_path: str | None, spec: EniLinkSpec) -> LinkInfo:
    """``configure_sync`` in a worker thread."""
    return await anyio.to_thread.run_sync(configure_sync, netns_path, spec)


async def unconfigure(
    netns_path: str | None, *, table: int, address: IPv4Interface, mac: str | None = None
) -> None:
    """``unconfigure_sync`` in a worker thread."""
    await anyio.to_thread.run_sync(
        lambda: unconfigure_sync(netns_path, table=table, address=address, mac=mac)
    )


async def ensure_fwmark_rule(netns_path: str | None) -> None:
    """``ensure_fwmark_rule_sync`` in a worker thread."""
    await anyio.to_thread.run_sync(ensure_fwmark_rule_sync, netns_path)
