"""The 802.1Q links' pure parts: tc messages, aliases, labels, the demultiplexer of a set of
links (netlink/dot1q/tc.py, links.py)."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netlink.dot1q import tc
from netlink.dot1q.links import (
    DEMUX,
    Dot1qLink,
    LiveLink,
    demux_for,
    demux_label,
    parse_alias,
    ranges,
)
from netlink.dot1q.programs import Branch, demux
from netlink.packing import nla


def nested(kind: int, payload: bytes) -> bytes:
    return nla(kind | tc.NLA_F_NESTED, payload)


def filter_message(kind: str = "bpf", *, name: str = "x", tag: bytes = b"\x01" * 8) -> bytes:
    """An RTM_NEWTFILTER as the kernel dumps it (header included)."""
    options = (
        nla(tc.TCA_BPF_NAME, name.encode() + b"\0")
        + nla(tc.TCA_BPF_FLAGS, struct.pack("=I", 1))
        + nla(tc.TCA_BPF_TAG, tag)
        + nla(tc.TCA_BPF_ID, struct.pack("=I", 77))
    )
    body = struct.pack("=BxxxiIII", 0, 9, 1, 0xFFFFFFF2, (1 << 16) | socket.htons(3))
    body += nla(tc.TCA_KIND, kind.encode() + b"\0") + nested(tc.TCA_OPTIONS, options)
    return struct.pack("=IHHII", 16 + len(body), 44, 2, 1, 0) + body


def test_a_dumped_bpf_filter_is_read_back() -> None:
    f = tc.parse_filter(filter_message(name="pw_dot1q_demux vlans 1-3", tag=bytes(range(8))))
    assert f is not None
    assert (f.ifindex, f.parent, f.priority, f.handle) == (9, 0xFFFFFFF2, 1, 1)
    assert f.name == "pw_dot1q_demux vlans 1-3"
    assert f.tag == "0001020304050607" and f.prog_id == 77 and f.direct_action and f.ours
    assert tc.parse_filter(filter_message("u32")) is None


def test_the_filter_request_names_the_fd_and_direct_action() -> None:
    req = tc.set_filter(9, "egress", 42, "pw_dot1q_tag vlan 5")
    body = req.msg
    assert isinstance(body, bytes)
    _, ifindex, handle, parent, info = struct.unpack_from("=BxxxiIII", body)
    assert (ifindex, handle, parent, info >> 16) == (9, 1, tc.PARENTS["egress"], 1)
    assert b"bpf\0" in body and b"pw_dot1q_tag vlan 5\0" in body
    assert struct.pack("=HHI", 8, tc.TCA_BPF_FD, 42) in body
    assert struct.pack("=HHI", 8, tc.TCA_BPF_FLAGS, 1) in body


@pytest.mark.parametrize(
    ("alias", "parsed"),
    [
        ("podwire 802.1Q id 5 on ifindex 3", (5, 3)),
        ("podwire 802.1Q id 4094 on ifindex 1234", (4094, 1234)),
        ("podwire 802.1Q id 5 on eth1", None),
        ("something else", None),
        ("", None),
    ],
)
def test_aliases(alias: str, parsed: tuple[int, int] | None) -> None:
    assert parse_alias(alias) == parsed


def test_a_links_alias_and_peer() -> None:
    link = Dot1qLink(name="vlan.eth.4094", vlan_id=4094, mac="02:00:00:00:00:01", parent=3)
    assert parse_alias(link.alias) == (4094, 3)
    assert link.peer == "vlan.eth.4094p" and len(link.peer) <= 15


def test_ranges_and_labels() -> None:
    assert ranges([7, 1, 2, 3, 9, 10]) == "1-3,7,9-10"
    assert ranges([]) == "none"
    assert demux_label([1, 2]) == f"{DEMUX} vlans 1-2"
    long = demux_label(range(1, 4095, 2))
    assert len(long) == tc.NAME_MAX and long.endswith("...")


def live(vid: int, index: int, *, parent: int = 3, up: bool = True) -> LiveLink:
    return LiveLink(name=f"vlan.eth.{vid}", index=index, vlan_id=vid, parent=parent, up=up)


def test_the_demultiplexer_of_a_set_of_links() -> None:
    program, vlans = demux_for([live(7, 20), live(5, 21)])
    assert vlans == (5, 7)
    assert program == demux([Branch(vlan_id=5, ifindex=21), Branch(vlan_id=7, ifindex=20)])
    # two links claiming one VLAN: the older one keeps it
    program, vlans = demux_for([live(5, 30), live(5, 21)])
    assert vlans == (5,) and program == demux([Branch(vlan_id=5, ifindex=21)])


@given(st.dictionaries(st.integers(1, 4094), st.integers(1, 10_000), max_size=30))
def test_the_demultiplexer_does_not_depend_on_the_order_links_are_seen(
    links: dict[int, int],
) -> None:
    found = [live(v, i) for v, i in links.items()]
    assert demux_for(found) == demux_for(list(reversed(found)))
    assert demux_for(found)[1] == tuple(sorted(links))
