"""rtnetlink request builders and reply readers shared by the datapath modules (no I/O).

Each builder returns an ``rtnl.Request`` (a pyroute2 message filled in, its type, its flags
and the name errors carry); ``rtnl.Rtnl.transact`` sends them in batches. Readers turn the
decoded reply messages back into small values.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import attrs
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWLINK,
    RTM_SETLINK,
)
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netlink import packing
from netlink.rtnl import ACKED, DUMP, Message, Reply, Request, Rtnl

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RT_TABLE_COMPAT = 252  # the rtmsg/fibmsg table byte when the real table is > 255

# From <linux/if.h>, neighbour.h, rtnetlink.h and fib_rules.h.
IFF_UP = 0x1
NUD_PERMANENT = 0x80
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTN_UNICAST = 1
FR_ACT_TO_TBL = 1

GONE_LINK = frozenset({errno.ENODEV})
GONE_ROUTE = frozenset({errno.ESRCH, errno.ENOENT, errno.ENODEV})
GONE_RULE = frozenset({errno.ENOENT})


def table_byte(table: int) -> int:
    """The 8-bit table field of a route or rule message; the real table goes in an attribute."""
    return table if table < 256 else RT_TABLE_COMPAT


def link_msg(
    *attrs: tuple[str, object], index: int = 0, up: bool = False, down: bool = False
) -> Message:
    """An ifinfmsg; ``up``/``down`` set the admin state, neither leaves it alone."""
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["flags"] = IFF_UP if up else 0
    msg["change"] = IFF_UP if up or down else 0
    msg["attrs"] = list(attrs)
    return msg


# What parse_link reads of a link reply: IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK (and
# IFLA_LINKINFO where the kind matters). A veth's RTM_NEWLINK is ~1.5 KiB, mostly statistics.
LINK_KEEP = frozenset({1, 3, 4, 5})
LINK_KEEP_KIND = LINK_KEEP | {18}


def getlink(op: str, name: str, keep: frozenset[int] = LINK_KEEP) -> Request:
    # raw: read with only_link, which decodes the reply with struct (link_from_bytes)
    return Request(op, RTM_GETLINK, ACKED, packing.link_by_name(name), keep=keep, raw=True)


def dellink(op: str, name: str) -> Request:
    return Request(op, RTM_DELLINK, ACKED, packing.link_by_name(name))


def set_group(op: str, name: str, group: int) -> Request:
    return Request(op, RTM_SETLINK, ACKED, packing.link_group(name, group))


def delete_group(op: str, group: int) -> Request:
    # No index and no name: the kernel deletes every link of the group (rtnl_group_dellink),
    # ENODEV when there is none.
    return Request(op, RTM_DELLINK, ACKED, packing.whole_group(group))


def link_up(op: str, index: int) -> Request:
    return Request(op, RTM_SETLINK, ACKED, packing.link_up(index))


def route_req(
    op: str,
    mtype: int,
    flags: int,
    *,
    dst: ipaddress.IPv4Address | None,
    oif: int,
    scope: int,
    gateway: ipaddress.IPv4Address | None = None,
    table: int = RT_TABLE_MAIN,
) -> Request:
    """A /32 (``dst``) or default (``dst`` None) route through ``oif`` in ``table``."""
    if mtype == RTM_DELROUTE:
        # Match whoever's protocol, scope and type; dst and oif pick the route.
        proto, scope, rtype = 0, RT_SCOPE_NOWHERE, 0
    else:
        proto, rtype = RTPROT_BOOT, RTN_UNICAST
    body = packing.route(
        table=table, oif=oif, dst=dst, scope=scope, proto=proto, rtype=rtype, gateway=gateway
    )
    return Request(op, mtype, flags, body)


def route_dump(oif: int | None, table: int = RT_TABLE_MAIN) -> Request:
    """Dump the IPv4 routes of ``table`` (through ``oif`` when given). Strict checking lets the
    kernel filter by table and device, so a node with a thousand pods answers with one route,
    not a thousand."""
    msg = rtmsg()
    msg["family"] = socket.AF_INET
    msg["table"] = table_byte(table)
    attrs: list[tuple[str, object]] = [("RTA_TABLE", table)] if table > 255 else []
    if oif is not None:
        attrs.append(("RTA_OIF", oif))
    msg["attrs"] = attrs
    return Request("routes", RTM_GETROUTE, DUMP, msg)


def rule_req(
    op: str,
    mtype: int,
    flags: int,
    ip: ipaddress.IPv4Address,
    *,
    src: bool,
    table: int,
    priority: int,
) -> Request:
    """``from ip`` (``src``) or ``to ip`` lookup ``table`` at ``priority``."""
    return Request(op, mtype, flags, packing.rule(ip, src=src, table=table, priority=priority))


@attrs.frozen
class Link:
    index: int
    flags: int
    name: str
    mac: str
    mtu: int
    peer_index: int | None  # IFLA_LINK: a veth's peer, a vlan's or macvlan's parent
    kind: str = ""  # IFLA_INFO_KIND
    vlan_id: int | None = None  # IFLA_VLAN_ID of a vlan link

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


def parse_link(msg: Message) -> Link:
    kind, vlan_id = "", None
    info = msg.get_attr("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND") or ""
        data = info.get_attr("IFLA_INFO_DATA")
        if kind == "vlan" and data is not None and hasattr(data, "get_attr"):
            vlan_id = data.get_attr("IFLA_VLAN_ID")
    return Link(
        index=msg["index"],
        flags=msg["flags"],
        name=msg.get_attr("IFLA_IFNAME") or "",
        mac=msg.get_attr("IFLA_ADDRESS") or "",
        mtu=msg.get_attr("IFLA_MTU") or 0,
        peer_index=msg.get_attr("IFLA_LINK"),
        kind=kind,
        vlan_id=vlan_id,
    )


_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")
# <linux/if_link.h>
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO = 1, 3, 4, 5, 18
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_VLAN_ID = 1, 2, 1


def link_from_bytes(raw: bytes) -> Link:
    """``parse_link`` of one RTM_NEWLINK message (header included), decoded with struct."""
    _, _, index, flags, _ = _IFINFO.unpack_from(raw, 16)
    a = packing.attributes(raw, 32)
    kind, vlan_id = "", None
    info = a.get(IFLA_LINKINFO)
    if info is not None:
        nested = packing.attributes(info, 0)
        kind = packing.text(nested.get(IFLA_INFO_KIND))
        data = nested.get(IFLA_INFO_DATA)
        if kind == "vlan" and data is not None:
            vid = packing.attributes(data, 0).get(IFLA_VLAN_ID)
            vlan_id = _U16.unpack_from(vid)[0] if vid is not None and len(vid) >= 2 else None
    mtu, peer = a.get(IFLA_MTU), a.get(IFLA_LINK)
    return Link(
        index=index,
        flags=flags,
        name=packing.text(a.get(IFLA_IFNAME)),
        mac=a.get(IFLA_ADDRESS, b"").hex(":"),
        mtu=_U32.unpack_from(mtu)[0] if mtu is not None and len(mtu) >= 4 else 0,
        peer_index=_U32.unpack_from(peer)[0] if peer is not None and len(peer) >= 4 else None,
        kind=kind,
        vlan_id=vlan_id,
    )


def dump_links(rtnl: Rtnl, op: str, query: Message, keep: frozenset[int]) -> list[Link]:
    """Dump the links ``query`` selects, decoded with struct (a node's hundreds of links cost
    ~10x the CPU through pyroute2). Raises RequestFailed."""
    request = Request(op, RTM_GETLINK, DUMP, query, keep=keep, raw=True)
    reply = rtnl.one(request)
    if reply.error:
        raise reply.failure(op)
    return [link_from_bytes(raw) for raw in reply.links]


def only_link(reply: Reply) -> Link | None:
    if reply.links:
        return link_from_bytes(reply.links[0])
    for msg in reply.messages:
        if msg["header"]["type"] == RTM_NEWLINK:
            return parse_link(msg)
    return None


def route_table(msg: Message) -> int:
    table = msg.get_attr("RTA_TABLE")
    return int(table if table is not None else msg["table"])


def is_route(
    msg: Message,
    dst: ipaddress.IPv4Address | None,
    gateway: ipaddress.IPv4Address | None,
    scope: int,
) -> bool:
    if msg["type"] != RTN_UNICAST or msg["scope"] != scope:
        return False
    if dst is None:
        if msg["dst_len"] != 0:
            return False
    elif msg["dst_len"] != 32 or msg.get_attr("RTA_DST") != str(dst):
        return False
    return gateway is None or msg.get_attr("RTA_GATEWAY") == str(gateway)


def rule_table(msg: Message) -> int:
    table = msg.get_attr("FRA_TABLE")
    return int(table if table is not None else msg["table"])
