"""802.1Q links made with eBPF under tc (netlink/dot1q) on the real kernel: real tags on the
cable, demultiplexed into the right link, verified by the programs' tags, put back when
someone removes a program, and the parent's demultiplexer following the live links.

A ``node`` namespace has ``eth1`` cabled (veth) to ``rt`` in a ``vpc`` namespace; both ends
make their VLAN links with the same construction. Nothing outside these namespaces is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import attrs
import orjson
import pytest

from cloud.emulator.netns import call_in_netns
from netlink.dot1q import links
from netlink.dot1q.links import Dot1qLink
from netlink.errors import RequestFailed
from netlink.requests import getlink, only_link
from netlink.rtnl import opened_in
from tests.frames import udp_probe, vlan_of_next_frame
from tests.netns import Netns

pytestmark = pytest.mark.root

MakeNetns = Callable[[str], Netns]


class Bed:
    def __init__(self, make: MakeNetns) -> None:
        self.node, self.vpc = make("node"), make("vpc")
        for ns in (self.node, self.vpc):
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        self.vpc.run(
            "ip", "link", "add", "rt", "mtu", "9001", "type", "veth",
            "peer", "name", "eth1", "mtu", "9001", "netns", self.node.name,
        )  # fmt: skip
        self.vpc.run("ip", "link", "set", "rt", "up")
        self.node.run("ip", "link", "set", "eth1", "up")

    def index(self, ns: Netns, name: str) -> int:
        return int(ns.run("cat", f"/sys/class/net/{name}/ifindex").stdout)

    def link(self, ns: Netns, vid: int, parent: str, address: str) -> Dot1qLink:
        name = f"vlan.eth.{vid}" if ns is self.node else f"{parent}.{vid}"
        link = Dot1qLink(
            name=name, vlan_id=vid, mac=f"02:00:00:00:{vid:02x}:{ns is self.node:02x}",
            parent=self.index(ns, parent),
        )  # fmt: skip
        with opened_in(ns.path) as rtnl:
            links.create(rtnl, link)
        ns.run("ip", "addr", "add", address, "dev", name)
        return link

    def problems(self, link: Dot1qLink) -> list[str]:
        with opened_in(self.node.path) as rtnl:
            return links.problems(rtnl, link, self.index(self.node, link.name))


@pytest.fixture
def bed(make_netns: MakeNetns) -> Iterator[Bed]:
    yield Bed(make_netns)


def ping(ns: Netns, ip: str) -> bool:
    return ns.run("ping", "-c1", "-W3", "-q", ip, check=False).returncode == 0


def filters(ns: Netns, dev: str, direction: str) -> str:
    return ns.run("tc", "filter", "show", "dev", dev, direction).stdout


def test_frames_cross_the_cable_tagged_and_reach_the_right_link(bed: Bed) -> None:
    a = bed.link(bed.node, 5, "eth1", "10.5.0.2/24")
    bed.link(bed.vpc, 5, "rt", "10.5.0.1/24")
    bed.link(bed.node, 6, "eth1", "10.6.0.2/24")  # the vpc has nothing on VLAN 6
    shown = orjson.loads(bed.node.run("ip", "-j", "-d", "link", "show", "vlan.eth.5").stdout)[0]
    assert shown["address"] == a.mac and shown["mtu"] == 9001  # the parent's MTU
    assert shown["ifalias"] == a.alias and "UP" in shown["flags"]
    assert bed.problems(a) == []
    assert ping(bed.node, "10.5.0.1")
    assert not ping(bed.node, "10.6.0.1")  # tagged 6: the vpc's demultiplexer has no link
    seen = call_in_netns(
        bed.vpc.path, lambda: vlan_of_next_frame("rt", udp_probe("10.5.0.1", "10.5.0.2"))
    )
    assert seen == 5  # and the node's replies, captured as they arrive there:
    assert (
        call_in_netns(
            bed.node.path, lambda: vlan_of_next_frame("eth1", udp_probe("10.5.0.2", "10.5.0.1"))
        )
        == 5
    )
    assert "pw_dot1q_demux vlans 5-6" in filters(bed.node, "eth1", "ingress")
    assert "pw_dot1q_tag vlan 5" in filters(bed.node, "vlan.eth.5", "egress")


def test_a_removed_program_is_named_and_put_back(bed: Bed) -> None:
    a = bed.link(bed.node, 5, "eth1", "10.5.0.2/24")
    bed.link(bed.vpc, 5, "rt", "10.5.0.1/24")
    bed.node.run("tc", "qdisc", "del", "dev", "vlan.eth.5", "clsact")
    assert bed.problems(a) == ["802.1Q tagger on vlan.eth.5"]
    assert not ping(bed.node, "10.5.0.1")  # untagged into the idle peer: lost
    bed.node.run("tc", "filter", "del", "dev", "eth1", "ingress")
    assert bed.problems(a) == [
        "802.1Q tagger on vlan.eth.5",
        f"802.1Q demultiplexer on ifindex {a.parent}",
    ]
    with opened_in(bed.node.path) as rtnl:
        links.repair(rtnl, a, bed.index(bed.node, a.name))
    assert bed.problems(a) == []
    bed.node.run("ip", "neigh", "flush", "dev", "vlan.eth.5")  # the failed ARP of the break
    assert ping(bed.node, "10.5.0.1")


def test_the_demultiplexer_follows_the_live_links(bed: Bed) -> None:
    five = bed.link(bed.node, 5, "eth1", "10.5.0.2/24")
    bed.link(bed.node, 6, "eth1", "10.6.0.2/24")
    bed.link(bed.node, 7, "eth1", "10.7.0.2/24")
    bed.node.run("ip", "link", "del", "vlan.eth.6")  # by hand: the demultiplexer is stale
    with opened_in(bed.node.path) as rtnl:
        (was,) = links.stale(rtnl)
        assert was.vlans == (5, 7) and was.attached is not None
        assert was.attached.name == "pw_dot1q_demux vlans 5-7"
        assert [s.parent for s in links.sync_all(rtnl)] == [five.parent]
        assert links.stale(rtnl) == [] and links.sync_all(rtnl) == []
        assert "pw_dot1q_demux vlans 5,7" in filters(bed.node, "eth1", "ingress")
        # a link set down leaves it (a DEL does that before the link is deleted)
        bed.node.run("ip", "link", "set", "vlan.eth.7", "down")
        links.sync(rtnl, five.parent)
        assert "pw_dot1q_demux vlans 5 " in filters(bed.node, "eth1", "ingress") + " "
        links.delete(rtnl, five)
        links.delete(rtnl, five)  # gone already: fine
        bed.node.run("ip", "link", "del", "vlan.eth.7")
        # no link left: nothing of ours stays on the parent, found by the parent's index
        assert links.stale(rtnl, [five.parent]) == []
    assert "bpf" not in filters(bed.node, "eth1", "ingress")
    assert "vlan.eth" not in bed.node.run("ip", "-o", "link").stdout


def test_a_failed_creation_leaves_nothing(bed: Bed) -> None:
    bad = Dot1qLink(name="vlan.eth.5", vlan_id=5, mac="02:00:00:00:05:05", parent=9999)
    with opened_in(bed.node.path) as rtnl:
        with pytest.raises(RequestFailed, match="parent ifindex 9999"):
            links.create(rtnl, bad)
        good = attrs.evolve(bad, parent=bed.index(bed.node, "eth1"))
        # the peer's name taken
        bed.node.run("ip", "link", "add", "vlan.eth.5p", "type", "veth", "peer", "name", "other")
        with pytest.raises(RequestFailed, match=r"create vlan\.eth\.5"):
            links.create(rtnl, good)
        assert only_link(rtnl.one(getlink("x", "vlan.eth.5"))) is None
    assert "bpf" not in filters(bed.node, "eth1", "ingress")


def _links_and_filters(bed: Bed) -> tuple[list[tuple[str, str]], str]:
    """The node's links (index, name) and eth1's tc filters: what a probe could leave behind.
    Not their state: the cable's far end comes up on its own time."""
    shown = orjson.loads(bed.node.run("ip", "-j", "link").stdout)
    return [(str(d["ifindex"]), d["ifname"]) for d in shown], filters(bed.node, "eth1", "ingress")


def test_support_is_probed_without_making_anything(bed: Bed) -> None:
    before = _links_and_filters(bed)
    with opened_in(bed.node.path) as rtnl:
        found = links.support(rtnl)
    assert _links_and_filters(bed) == before
    made = bed.node.run(
        "ip", "link", "add", "link", "eth1", "name", "probe.5", "type", "vlan", "id", "5",
        check=False,
    )  # fmt: skip
    assert found.vlan_devices == (made.returncode == 0)
    assert found.ebpf == ""  # this machine loads tc programs
    assert found.kind == ("vlan" if found.vlan_devices else "ebpf")


def test_a_link_made_for_another_trunk_is_named(bed: Bed) -> None:
    """A trunk attached again has a new ifindex: links naming the old one are not its."""
    a = bed.link(bed.node, 5, "eth1", "10.5.0.2/24")
    other = attrs.evolve(a, parent=a.parent + 1000)
    with opened_in(bed.node.path) as rtnl:
        found = links.problems(rtnl, other, bed.index(bed.node, a.name))
    assert found[0] == f"link vlan.eth.5 not 802.1Q id 5 on ifindex {a.parent + 1000}"
    assert "802.1Q tagger on vlan.eth.5" in found
