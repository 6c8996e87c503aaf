"""netlink.packing against pyroute2's encoding of the same requests, byte for byte."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.rtnl import RTM_NEWLINK
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netlink import packing
from netlink.rtnl import CREATE, Request, encode_batch

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=15)
ips = st.integers(0, 2**32 - 1).map(IPv4Address)
macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
u31 = st.integers(0, 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)


def same(pyroute2_msg: Any, packed: bytes) -> None:
    ours = encode_batch([Request("x", RTM_NEWLINK, CREATE, packed)], 7)
    theirs = encode_batch([Request("x", RTM_NEWLINK, CREATE, pyroute2_msg)], 7)
    assert ours == theirs


def link(*attrs: tuple[str, object], index: int = 0, up: bool = False) -> Any:
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["flags"] = msg["change"] = 1 if up else 0
    msg["attrs"] = list(attrs)
    return msg


@given(names, names, st.integers(68, 65535), macs, u32)
def test_new_veth(ifname: str, host: str, mtu: int, mac: str, fd: int) -> None:
    peer = {
        "attrs": [
            ("IFLA_IFNAME", host),
            ("IFLA_MTU", mtu),
            ("IFLA_ADDRESS", mac),
            ("IFLA_NET_NS_FD", fd),
        ]
    }
    info = {
        "attrs": [
            ("IFLA_INFO_KIND", "veth"),
            ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]}),
        ]
    }
    msg = link(("IFLA_IFNAME", ifname), ("IFLA_MTU", mtu), ("IFLA_LINKINFO", info), up=True)
    same(msg, packing.new_veth(ifname, mtu, host, mac, fd))


@given(names, u32, u31)
def test_links_by_name_group_and_index(name: str, group: int, index: int) -> None:
    same(link(("IFLA_IFNAME", name)), packing.link_by_name(name))
    same(link(("IFLA_IFNAME", name), ("IFLA_GROUP", group)), packing.link_group(name, group))
    same(link(("IFLA_GROUP", group)), packing.whole_group(group))
    same(link(index=index, up=True), packing.link_up(index))


@given(u32, ips)
def test_address(index: int, ip: IPv4Address) -> None:
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET
    msg["prefixlen"] = 32
    msg["index"] = index
    msg["attrs"] = [("IFA_LOCAL", str(ip)), ("IFA_ADDRESS", str(ip))]
    same(msg, packing.address32(index, ip))


@given(
    st.integers(1, 255),
    u32,
    st.none() | ips,
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.none() | ips,
)
def test_route(
    table: int,
    oif: int,
    dst: IPv4Address | None,
    scope: int,
    proto: int,
    rtype: int,
    gateway: IPv4Address | None,
) -> None:
    msg = rtmsg()
    msg["family"] = socket.AF_INET
    msg["dst_len"] = 32 if dst is not None else 0
    msg["table"] = table
    msg["proto"], msg["scope"], msg["type"] = proto, scope, rtype
    attrs: list[tuple[str, object]] = [("RTA_TABLE", table), ("RTA_OIF", oif)]
    if dst is not None:
        attrs.append(("RTA_DST", str(dst)))
    if gateway is not None:
        attrs.append(("RTA_GATEWAY", str(gateway)))
    msg["attrs"] = attrs
    packed = packing.route(
        table=table, oif=oif, dst=dst, scope=scope, proto=proto, rtype=rtype, gateway=gateway
    )
    same(msg, packed)


@given(u31, ips, macs)
def test_neighbour(index: int, ip: IPv4Address, mac: str) -> None:
    msg = ndmsg()
    msg["family"] = socket.AF_INET
    msg["ifindex"] = index
    msg["state"] = 0x80
    msg["attrs"] = [("NDA_DST", str(ip)), ("NDA_LLADDR", mac)]
    same(msg, packing.permanent_neighbour(index, ip, mac))


@given(ips, st.booleans(), u32, u32)
def test_rule(ip: IPv4Address, src: bool, table: int, priority: int) -> None:
    msg = fibmsg()
    msg["family"] = socket.AF_INET
    msg["src_len"], msg["dst_len"] = (32, 0) if src else (0, 32)
    msg["table"] = table if table < 256 else 0
    msg["action"] = 1
    msg["attrs"] = [
        ("FRA_SRC" if src else "FRA_DST", str(ip)),
        ("FRA_PRIORITY", priority),
        ("FRA_TABLE", table),
    ]
    same(msg, packing.rule(ip, src=src, table=table, priority=priority))


def test_the_wiring_path_sends_only_packed_requests() -> None:
    # pyroute2's marshalling of these is most of wire()'s CPU (the nested veth create above all)
    from netlink import veth

    pod = veth.PodNet(
        netns="/run/netns/x",
        ifname="eth0",
        host_veth="pwv0123",
        ip=IPv4Address("10.1.2.3"),
        mtu=9001,
    )
    mac = "02:00:00:00:00:01"
    requests = [veth._newveth(pod, mac, 5), *veth._pod_side(pod, 7, mac)]
    assert all(isinstance(r.msg, bytes) for r in requests)
    assert encode_batch(requests[:1], 1) == encode_batch(
        [Request("x", RTM_NEWLINK, CREATE, packing.new_veth("eth0", 9001, "pwv0123", mac, 5))], 1
    )
