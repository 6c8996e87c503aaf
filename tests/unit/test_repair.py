from __future__ import annotations

from ipaddress import IPv4Address

import attrs

from agent.cni.spec import PodKey
from agent.repair import suspects
from netlink.watcher import Batch, LinkEvent, Resync, RouteEvent, RuleEvent, TcEvent

K = PodKey(network="podwire", container_id="c1", ifname="eth0")
IP = IPv4Address("10.0.0.5")
BY_IP = {IP: K}
BY_VETH = {"pwv0123456789ab": K}


def batch(*events: object) -> Batch:
    return Batch(events=tuple(events))  # type: ignore[arg-type]


def test_what_marks_a_pod_suspect() -> None:
    route_gone = RouteEvent(kind="del", dst=IP, prefixlen=32, oif=7, table=254)
    assert suspects(batch(route_gone), BY_IP, BY_VETH) == {K: "route"}
    rule_gone = RuleEvent(kind="del", priority=1536, table=2, src=IP, src_len=32)
    assert suspects(batch(rule_gone), BY_IP, BY_VETH) == {K: "rule"}
    down = LinkEvent(kind="new", index=7, name="pwv0123456789ab", mac="02:00:00:00:00:01", up=False)
    up = attrs.evolve(down, up=True)
    seen: set[str] = set()
    assert suspects(batch(down), BY_IP, BY_VETH, seen) == {}  # being created: not damage
    assert suspects(batch(up), BY_IP, BY_VETH, seen) == {}
    assert suspects(batch(down), BY_IP, BY_VETH, seen) == {K: "link down"}
    everything = Resync(reason="overrun", links=(), addrs=(), routes=(), rules=())
    assert suspects(everything, BY_IP, BY_VETH) == {K: "resync"}


def test_what_does_not() -> None:
    other_ip = RouteEvent(kind="del", dst=IPv4Address("10.0.0.9"), prefixlen=32, oif=7, table=254)
    other_table = RouteEvent(kind="del", dst=IP, prefixlen=32, oif=7, table=2)
    added = RouteEvent(kind="new", dst=IP, prefixlen=32, oif=7, table=254)
    foreign_rule = RuleEvent(kind="del", priority=100, table=2, src=IP, src_len=32)
    up = LinkEvent(kind="new", index=7, name="pwv0123456789ab", mac="02:00:00:00:00:01", up=True)
    foreign_link = LinkEvent(kind="new", index=8, name="eth0", mac="02:00:00:00:00:02", up=False)
    assert (
        suspects(
            batch(other_ip, other_table, added, foreign_rule, up, foreign_link), BY_IP, BY_VETH
        )
        == {}
    )


def test_a_removed_tc_program_marks_every_branch_pod() -> None:
    """Branch links' 802.1Q programs live under tc (netlink.dot1q); ordinary pods have none."""
    branch = PodKey(network="podwire", container_id="c2", ifname="eth0")
    by_link = {"vlan.eth.5": branch, "pws0123456789ab": branch}
    removed = TcEvent(kind="del", index=3, parent=0xFFFFFFF2)
    assert suspects(batch(removed), BY_IP, BY_VETH, by_link=by_link) == {branch: "802.1Q program"}
    assert suspects(batch(removed), BY_IP, BY_VETH) == {}
