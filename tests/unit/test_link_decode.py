"""netlink.requests.link_from_bytes (struct) against parse_link over pyroute2's decoding of the
same link message, and a raw request's reply collected as bytes."""

from __future__ import annotations

import socket
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.rtnl import RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from netlink import requests as rq
from netlink.rtnl import ACKED, Collector, Request, encode_batch

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=15)
macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
u31 = st.integers(0, 2**31 - 1)


def message(index: int, flags: int, attrs: list[tuple[str, Any]]) -> bytes:
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["flags"] = flags
    msg["change"] = 0
    msg["attrs"] = attrs
    return encode_batch([Request("x", RTM_NEWLINK, 0, msg)], 3)


@given(
    u31,
    st.integers(0, 2**32 - 1),
    st.none() | names,
    st.none() | macs,
    st.none() | st.integers(0, 2**32 - 1),
    st.none() | st.integers(0, 2**32 - 1),
    st.sampled_from([None, "veth", "vlan"]),
    st.integers(0, 4094),
)
def test_link_from_bytes_reads_what_parse_link_reads(
    index: int,
    flags: int,
    name: str | None,
    mac: str | None,
    mtu: int | None,
    peer: int | None,
    kind: str | None,
    vid: int,
) -> None:
    attrs: list[tuple[str, Any]] = []
    if name is not None:
        attrs.append(("IFLA_IFNAME", name))
    if mac is not None:
        attrs.append(("IFLA_ADDRESS", mac))
    if mtu is not None:
        attrs.append(("IFLA_MTU", mtu))
    if peer is not None:
        attrs.append(("IFLA_LINK", peer))
    if kind is not None:
        info: list[tuple[str, Any]] = [("IFLA_INFO_KIND", kind)]
        if kind == "vlan":
            info.append(("IFLA_INFO_DATA", {"attrs": [("IFLA_VLAN_ID", vid)]}))
        attrs.append(("IFLA_LINKINFO", {"attrs": info}))
    raw = message(index, flags, attrs)
    decoded = ifinfmsg(raw)
    decoded.decode()
    assert rq.link_from_bytes(raw) == rq.parse_link(decoded)


def test_a_raw_request_collects_its_link_as_bytes_and_only_link_reads_them() -> None:
    raw = message(7, 1, [("IFLA_IFNAME", "eth0"), ("IFLA_ADDRESS", "02:00:00:00:00:09")])
    reply_to_seq_5 = raw[:8] + (5).to_bytes(4, "little") + raw[12:]
    ack = bytes.fromhex("24000000020000010500000000000000" + "00" * 20)  # errno 0, seq 5
    collector = Collector([rq.getlink("read back", "eth0")], 5)
    collector.feed(reply_to_seq_5 + ack)
    assert collector.done
    [reply] = collector.replies()
    assert reply.error == 0 and reply.messages == [] and len(reply.links) == 1
    link = rq.only_link(reply)
    assert link is not None and (link.index, link.name, link.mac) == (
        7,
        "eth0",
        "02:00:00:00:00:09",
    )
    # the same reply to a request that is not raw comes decoded by pyroute2, read the same way
    plain = Collector([Request("x", 18, ACKED, b"", keep=rq.LINK_KEEP)], 5)
    plain.feed(reply_to_seq_5 + ack)
    [decoded] = plain.replies()
    assert decoded.links == [] and rq.only_link(decoded) == link
