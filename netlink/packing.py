"""Hand-packed bodies of the rtnetlink requests on the pod-wiring path, and the attribute
reader the struct decoders share (link replies, the watcher, tc dumps).

pyroute2's message classes spend ~0.1-0.3 ms encoding each message, most of ``wire()``'s CPU;
these functions pack the same bytes with ``struct`` in a few microseconds. They return a body
(the family header and attributes, without the netlink header, which ``rtnl.encode_batch``
adds with the sequence number). Their output is checked byte for byte against pyroute2's
encoding of the same request (tests/unit/test_packing.py), which stays the reference; requests
off the hot path keep using pyroute2's classes.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address

# <linux/if_link.h>, <linux/if_addr.h>, <linux/rtnetlink.h>, <linux/neighbour.h>,
# <linux/fib_rules.h>, <linux/veth.h>
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_GROUP, IFLA_NET_NS_FD = 1, 3, 4, 18, 27, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR = 1, 2
FRA_DST, FRA_SRC, FRA_PRIORITY, FRA_TABLE = 1, 2, 6, 15

_NLA = struct.Struct("=HH")
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_FIBMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, res1, res2, action
_U32 = struct.Struct("=I")


def nla(kind: int, payload: bytes) -> bytes:
    """One attribute: length, type, payload, padded to 4 bytes."""
    size = 4 + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _u32(kind: int, value: int) -> bytes:
    return nla(kind, _U32.pack(value))


def nla_str(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute."""
    return nla(kind, value.encode() + b"\0")


def attributes(raw: bytes, start: int, end: int | None = None) -> dict[int, bytes]:
    """The attributes in ``raw[start:end]`` (to the end by default) by type, the first of each,
    payloads only."""
    out: dict[int, bytes] = {}
    end = len(raw) if end is None else end
    while start + 4 <= end:
        size, kind = _NLA.unpack_from(raw, start)
        if size < 4:
            break
        out.setdefault(kind & 0x3FFF, raw[start + 4 : start + size])
        start += (size + 3) & ~3
    return out


def text(value: bytes | None) -> str:
    """A string attribute's payload as text (up to its NUL); "" for none."""
    return value.split(b"\0", 1)[0].decode("utf-8", "replace") if value else ""


def _mac(value: str) -> bytes:
    return bytes.fromhex(value.replace(":", ""))


def ifinfomsg(*attrs: bytes, index: int = 0, up: bool = False) -> bytes:
    flags = 1 if up else 0  # IFF_UP
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, flags) + b"".join(attrs)


def new_veth(ifname: str, mtu: int, host_veth: str, host_mac: str, host_fd: int) -> bytes:
    """RTM_NEWLINK: veth ``ifname`` (up) here, its peer ``host_veth`` in the namespace of
    ``host_fd``."""
    peer = ifinfomsg(
        nla_str(IFLA_IFNAME, host_veth),
        _u32(IFLA_MTU, mtu),
        nla(IFLA_ADDRESS, _mac(host_mac)),
        _u32(IFLA_NET_NS_FD, host_fd),
    )
    info = nla(IFLA_INFO_KIND, b"veth\0") + nla(IFLA_INFO_DATA, nla(VETH_INFO_PEER, peer))
    return ifinfomsg(
        nla_str(IFLA_IFNAME, ifname), _u32(IFLA_MTU, mtu), nla(IFLA_LINKINFO, info), up=True
    )


def link_by_name(name: str) -> bytes:
    """RTM_GETLINK / RTM_DELLINK of the link called ``name``."""
    return ifinfomsg(nla_str(IFLA_IFNAME, name))


def link_group(name: str, group: int) -> bytes:
    """RTM_SETLINK moving link ``name`` into link group ``group``."""
    return ifinfomsg(nla_str(IFLA_IFNAME, name), _u32(IFLA_GROUP, group))


def whole_group(group: int) -> bytes:
    """RTM_DELLINK of every link in link group ``group`` (no index, no name)."""
    return ifinfomsg(_u32(IFLA_GROUP, group))


def link_up(index: int) -> bytes:
    """RTM_SETLINK bringing link ``index`` up."""
    return ifinfomsg(index=index, up=True)


def address32(index: int, ip: IPv4Address) -> bytes:
    """RTM_NEWADDR ``ip/32`` on link ``index``."""
    raw = ip.packed
    return (
        _IFADDR.pack(socket.AF_INET, 32, 0, 0, index) + nla(IFA_LOCAL, raw) + nla(IFA_ADDRESS, raw)
    )


def route(
    *,
    table: int,
    oif: int,
    dst: IPv4Address | None,
    scope: int,
    proto: int,
    rtype: int,
    gateway: IPv4Address | None = None,
) -> bytes:
    """RTM_NEWROUTE / RTM_DELROUTE in ``table`` through ``oif``: ``dst``/32, or the default
    route when ``dst`` is None. A table past 255 (a branch's, 100 + VLAN id) is RTA_TABLE's
    alone, with RT_TABLE_COMPAT (252) in the header, as iproute2 sends it."""
    head = _RTMSG.pack(
        socket.AF_INET,
        0 if dst is None else 32,
        0,
        0,
        table if table < 256 else 252,
        proto,
        scope,
        rtype,
        0,
    )
    attrs = _u32(RTA_TABLE, table) + _u32(RTA_OIF, oif)
    if dst is not None:
        attrs += nla(RTA_DST, dst.packed)
    if gateway is not None:
        attrs += nla(RTA_GATEWAY, gateway.packed)
    return head + attrs


def permanent_neighbour(index: int, ip: IPv4Address, mac: str) -> bytes:
    """RTM_NEWNEIGH: ``ip`` is at ``mac`` on link ``index``, for good (NUD_PERMANENT)."""
    return (
        _NDMSG.pack(socket.AF_INET, index, 0x80, 0, 0)
        + nla(NDA_DST, ip.packed)
        + nla(NDA_LLADDR, _mac(mac))
    )


def rule(ip: IPv4Address, *, src: bool, table: int, priority: int) -> bytes:
    """RTM_NEWRULE / RTM_DELRULE ``from ip`` (``src``) or ``to ip`` ``lookup table``."""
    head = _FIBMSG.pack(
        socket.AF_INET,
        0 if src else 32,
        32 if src else 0,
        0,
        table if table < 256 else 0,
        0,
        0,
        1,
        0,
    )
    return (
        head
        + nla(FRA_SRC if src else FRA_DST, ip.packed)
        + _u32(FRA_PRIORITY, priority)
        + _u32(FRA_TABLE, table)
    )
