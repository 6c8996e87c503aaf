"""The rtnetlink codec without a kernel: pyroute2's encoding of every request the datapath sends,
and the matching of replies (acks, extended-ack errors, dumps) back to a batch.

The expected requests are the bytes of the hand-packed encoder this replaced, checked against the
kernel by the integration tests; a pyroute2 upgrade that changes what goes on the wire fails here.
The replies are datagrams captured from a 6.18 kernel.
"""

from __future__ import annotations

import errno
from ipaddress import IPv4Address
from typing import Any

import pytest
from pyroute2.netlink.rtnl import (
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNEIGH,
    RTM_GETRULE,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTM_SETLINK,
)
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from netlink import requests as rq
from netlink import veth
from netlink.rtnl import (
    ACKED,
    CREATE,
    DUMP,
    MAX_BATCH,
    Collector,
    Request,
    encode_batch,
)

POD = veth.PodNet(
    netns="/run/netns/x",
    ifname="eth0",
    host_veth="pwv0123456789ab",
    ip=IPv4Address("10.0.1.5"),
    mtu=9001,
    table=2,
)
MAC = "02:aa:bb:cc:dd:ee"

# Sequence number 1 each.
EXPECTED = {
    "newveth": (
        "8c000000100005060100000000000000000000000000000001000000010000000900030065746830"
        "00000000080004002923000058001200090001007665746800000000480002004400010000000000"
        "00000000000000000000000014000300707776303132333435363738396162000800040029230000"
        "0a00010002aabbccddee000008001c0007000000"
    ),
    "getlink": (
        "2c00000012000500010000000000000000000000000000000000000000000000090003006574683000000000"
    ),
    "dellink": (
        "2c00000011000500010000000000000000000000000000000000000000000000090003006574683000000000"
    ),
    "route_del": (
        "3400000019000500010000000000000002200000fe00ff000000000008000f00fe00000008000400"
        "05000000080001000a000105"
    ),
    "route_dump": "240000001a000103010000000000000002000000fe000000000000000800040005000000",
    "hostroute": (
        "3400000018000506010000000000000002200000fe03fd010000000008000f00fe00000008000400"
        "05000000080001000a000105"
    ),
    "setlink_up": "2000000013000500010000000000000000000000090000000100000001000000",
    "rule0": (
        "34000000200005060100000000000000020020000200000100000000080002000a00010508000600"
        "0006000008000f0002000000"
    ),
    "rule1": (
        "3400000020000506010000000000000002200000fe00000100000000080001000a00010508000600"
        "0002000008000f00fe000000"
    ),
    "delrule0": (
        "34000000210005000100000000000000020020000200000100000000080002000a00010508000600"
        "0006000008000f0002000000"
    ),
    "delrule1": (
        "3400000021000500010000000000000002200000fe00000100000000080001000a00010508000600"
        "0002000008000f00fe000000"
    ),
    "pod0": "280000001400050601000000000000000220000005000000080002000a000105080001000a000105",
    "pod1": (
        "3400000018000506010000000000000002200000fe03fd010000000008000f00fe00000008000400"
        "0500000008000100a9fe0101"
    ),
    "pod2": (
        "300000001c000505010000000000000002000000050000008000000008000100a9fe01010a000200"
        "02aabbccddee0000"
    ),
    "pod3": (
        "3400000018000506010000000000000002000000fe0300010000000008000f00fe00000008000400"
        "0500000008000500a9fe0101"
    ),
    "rules_dump": "1c000000220001030100000000000000020000000000000000000000",
    "addr_dump": "180000001600010301000000000000000200000005000000",
    "neigh_dump": "240000001e00010301000000000000000200000000000000000000000800080005000000",
    "links_dump": (
        "30000000120001030100000000000000000000000000000000000000000000001000120009000100"
        "7665746800000000"
    ),
    "move_to_group": (
        "3c000000130005000100000000000000000000000000000000000000000000001400030070777630"
        "31323334353637383961620008001b0001007770"
    ),
    "delete_group": (
        "280000001100050001000000000000000000000000000000000000000000000008001b0001007770"
    ),
}


def _query(cls: Any, **fields: object) -> Any:
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    return msg


def requests() -> dict[str, Request]:
    ip, gw = POD.ip, veth.GATEWAY
    made = {
        "newveth": veth._newveth(POD, MAC, 7),
        "getlink": rq.getlink("x", "eth0"),
        "dellink": rq.dellink("x", "eth0"),
        "route_del": rq.route_req("x", RTM_DELROUTE, ACKED, dst=ip, oif=5, scope=rq.RT_SCOPE_LINK),
        "route_dump": rq.route_dump(5),
        "hostroute": rq.route_req("x", RTM_NEWROUTE, CREATE, dst=ip, oif=5, scope=rq.RT_SCOPE_LINK),
        "setlink_up": Request("x", RTM_SETLINK, ACKED, rq.link_msg(index=9, up=True)),
        "rules_dump": Request("r", RTM_GETRULE, DUMP, _query(fibmsg, family=2), match=ip.packed),
        "addr_dump": Request("a", RTM_GETADDR, DUMP, _query(ifaddrmsg, family=2, index=5)),
        "neigh_dump": Request(
            "n",
            RTM_GETNEIGH,
            DUMP,
            _query(ndmsg, family=2, attrs=[("NDA_IFINDEX", 5)]),
        ),
        "links_dump": Request(
            "l",
            RTM_GETLINK,
            DUMP,
            rq.link_msg(("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "veth")]})),
        ),
        "move_to_group": rq.set_group("x", POD.host_veth, veth.DELETE_GROUP),
        "delete_group": rq.delete_group("x", veth.DELETE_GROUP),
    }
    for i, req in enumerate(veth._rule_reqs(POD, RTM_NEWRULE, CREATE)):
        made[f"rule{i}"] = req
    for i, req in enumerate(veth._rule_reqs(POD, RTM_DELRULE, ACKED)):
        made[f"delrule{i}"] = req
    for i, req in enumerate(veth._pod_side(POD, 5, MAC)):
        made[f"pod{i}"] = req
    assert gw == IPv4Address("169.254.1.1")
    return made


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_requests_encode_to_the_expected_bytes(name: str) -> None:
    assert encode_batch([requests()[name]], 1).hex() == EXPECTED[name]


def test_a_batch_is_numbered_in_order_and_wraps() -> None:
    batch = [rq.getlink("a", "eth0"), rq.getlink("b", "eth1"), rq.getlink("c", "eth2")]
    data = encode_batch(batch, 0xFFFFFFFF)
    seqs = [int.from_bytes(data[i * 44 + 8 : i * 44 + 12], "little") for i in range(3)]
    assert seqs == [0xFFFFFFFF, 0, 1]


# Captured replies, sequence numbers 7-10 (pid 0x60bf).
ACK_7 = "240000000200000107000000bf6000000000000020000000130005000700000000000000"
EXTACK_8 = (
    "3c0000000200000308000000d2600000a1ffffff4400000010000506080000000000000018000100"
    "556e6b6e6f776e20646576696365207479706500"
)
ADDR_DUMP_9 = (
    "4c0000001400020009000000bf600000020880fe01000000080001007f000001080002007f000001"
    "070003006c6f0000080008008000000014000600ffffffffffffffffad1d0200ad1d0200"
)
DONE_9 = "140000000300020009000000bf60000000000000"
ENODEV_10 = "24000000020000010a000000bf600000edffffff2c000000120005000a00000000000000"


def _batch(n: int) -> list[Request]:
    return [rq.getlink(f"op{i}", "eth0") for i in range(n)]


def test_collector_matches_acks_errors_and_dumps_to_their_requests() -> None:
    collector = Collector(_batch(4), 7)
    collector.feed(bytes.fromhex(ACK_7 + EXTACK_8))
    assert not collector.done
    assert collector.last_op == "op1"
    collector.feed(bytes.fromhex(ADDR_DUMP_9))
    collector.feed(bytes.fromhex(DONE_9 + ENODEV_10))
    assert collector.done
    ack, extack, dump, enodev = collector.replies()
    assert (ack.error, ack.detail, ack.messages) == (0, "", [])
    assert (extack.error, extack.detail) == (errno.EOPNOTSUPP, "Unknown device type")
    assert (
        str(extack.failure("create x0"))
        == "create x0: Operation not supported: Unknown device type"
    )
    assert dump.error == 0
    [addr] = dump.messages
    assert addr["prefixlen"] == 8 and addr["index"] == 1
    assert addr.get_attr("IFA_LOCAL") == "127.0.0.1" and addr.get_attr("IFA_LABEL") == "lo"
    assert (enodev.error, enodev.detail) == (errno.ENODEV, "")


def test_collector_skips_other_sequence_numbers_and_unmatched_dump_messages() -> None:
    [dump] = _batch(1)
    collector = Collector([Request("d", dump.type, DUMP, dump.msg, match=b"nope")], 9)
    collector.feed(bytes.fromhex(ACK_7 + ADDR_DUMP_9))
    assert not collector.done
    collector.feed(bytes.fromhex(DONE_9))
    assert collector.done
    assert collector.replies()[0].messages == []

    kept = Collector([Request("d", dump.type, DUMP, dump.msg, match=bytes([127, 0, 0, 1]))], 9)
    kept.feed(bytes.fromhex(ADDR_DUMP_9 + DONE_9))
    assert len(kept.replies()[0].messages) == 1


def test_batches_stay_small_enough_for_the_receive_buffer() -> None:
    assert 1 <= MAX_BATCH <= 128
