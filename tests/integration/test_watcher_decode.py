"""The watcher's struct decoding against pyroute2's, on real kernel messages of every kind."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address
from typing import Any

import pytest
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netlink import watcher
from netlink.ns import entered_path
from netlink.watcher import AddrEvent, Event, LinkEvent, RouteEvent, RuleEvent
from tests.netns import Netns

pytestmark = pytest.mark.root

_HDR = struct.Struct("=IHHII")


def reference(mtype: int, raw: bytes) -> Event | None:
    """What the watcher decoded with pyroute2's classes before (the reference)."""
    kind = "del" if mtype in (17, 21, 25, 33) else "new"

    def ip(v: Any) -> IPv4Address | None:
        return IPv4Address(v) if v else None

    if mtype in (16, 17):
        m: Any = ifinfmsg(raw)
        m.decode()
        info = m.get_attr("IFLA_LINKINFO")
        return LinkEvent(
            kind=kind,  # type: ignore[arg-type]
            index=int(m["index"]),
            name=m.get_attr("IFLA_IFNAME") or "",
            mac=(m.get_attr("IFLA_ADDRESS") or "").lower(),
            up=bool(m["flags"] & 1),
            kind_of_link=(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else "",
        )
    if mtype in (20, 21):
        m = ifaddrmsg(raw)
        m.decode()
        if m["family"] != socket.AF_INET:
            return None
        return AddrEvent(
            kind=kind,  # type: ignore[arg-type]
            index=int(m["index"]),
            address=IPv4Address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")),
            prefixlen=int(m["prefixlen"]),
            label=m.get_attr("IFA_LABEL") or "",
        )
    if mtype in (24, 25):
        m = rtmsg(raw)
        m.decode()
        if m["family"] != socket.AF_INET:
            return None
        return RouteEvent(
            kind=kind,  # type: ignore[arg-type]
            dst=ip(m.get_attr("RTA_DST")) or IPv4Address(0),
            prefixlen=int(m["dst_len"]),
            oif=m.get_attr("RTA_OIF"),
            table=int(m.get_attr("RTA_TABLE") or m["table"]),
            gateway=ip(m.get_attr("RTA_GATEWAY")),
            scope=int(m["scope"]),
            protocol=int(m["proto"]),
            type=int(m["type"]),
            priority=m.get_attr("RTA_PRIORITY"),
        )
    if mtype in (32, 33):
        m = fibmsg(raw)
        m.decode()
        if m["family"] != socket.AF_INET:
            return None
        return RuleEvent(
            kind=kind,  # type: ignore[arg-type]
            priority=int(m.get_attr("FRA_PRIORITY") or 0),
            table=int(m.get_attr("FRA_TABLE") or m["table"]),
            src=ip(m.get_attr("FRA_SRC")),
            src_len=int(m["src_len"]),
            dst=ip(m.get_attr("FRA_DST")),
            dst_len=int(m["dst_len"]),
            fwmark=m.get_attr("FRA_FWMARK"),
            fwmask=m.get_attr("FRA_FWMASK"),
            iifname=m.get_attr("FRA_IIFNAME") or "",
            action=int(m["action"]),
        )
    return None


def raw_dump(ns: Netns, mtype: int, family: int) -> list[tuple[int, bytes]]:
    """Every message of one dump in ``ns``, undecoded."""
    with entered_path(ns.path):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    try:
        sock.bind((0, 0))
        body = (
            struct.pack("=BxHiII", family, 0, 0, 0, 0)
            if mtype == 18
            else bytes([family]) + bytes(11)
        )
        sock.send(_HDR.pack(_HDR.size + len(body), mtype, 0x301, 1, 0) + body)
        out: list[tuple[int, bytes]] = []
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset < len(data):
                size, t, _, _, _ = _HDR.unpack_from(data, offset)
                if t == 3:  # NLMSG_DONE
                    return out
                out.append((t, data[offset : offset + size]))
                offset += (size + 3) & ~3
    finally:
        sock.close()


def test_every_kind_of_event_decodes_as_pyroute2_decodes_it(make_netns: Any) -> None:
    ns: Netns = make_netns("wdec")
    ns.run("ip", "link", "add", "pwvdec0", "type", "veth", "peer", "name", "dec1")
    ns.run("ip", "link", "set", "pwvdec0", "up")
    ns.run("ip", "link", "set", "dec1", "up")
    ns.run("ip", "addr", "add", "10.9.0.1/24", "dev", "pwvdec0", "label", "pwvdec0:a")
    ns.run("ip", "addr", "add", "10.9.1.1/32", "dev", "dec1")
    ns.run("ip", "route", "add", "10.8.0.0/16", "via", "10.9.0.2", "metric", "77")
    ns.run("ip", "route", "add", "10.7.0.5/32", "dev", "dec1", "scope", "link", "table", "1000")
    ns.run("ip", "route", "add", "default", "via", "10.9.0.3", "table", "7")
    ns.run("ip", "rule", "add", "from", "10.9.1.1", "lookup", "7", "prio", "1536")
    ns.run("ip", "rule", "add", "to", "10.9.1.0/24", "lookup", "main", "prio", "512")
    ns.run("ip", "rule", "add", "fwmark", "0x80/0x80", "lookup", "1000", "prio", "1024")
    ns.run("ip", "rule", "add", "iif", "dec1", "lookup", "7", "prio", "10")
    seen = 0
    for mtype, family in ((18, 0), (22, 2), (26, 2), (34, 2), (22, 10), (26, 10)):
        for t, raw in raw_dump(ns, mtype, family):
            assert watcher._decode_one(t, raw) == reference(t, raw), (t, raw.hex())
            seen += 1
    assert seen > 15
    events = [watcher._decode_one(t, raw) for t, raw in raw_dump(ns, 34, 2)]
    assert any(isinstance(e, RuleEvent) and e.fwmark == 0x80 and e.iifname == "" for e in events)
    assert any(isinstance(e, RuleEvent) and e.iifname == "dec1" for e in events)
