"""The branch ENI datapath (security groups for pods) against the real kernel, both modes.

A test bed of namespaces stands in for a node on a VPC: the node has ``eth0`` (its primary ENI)
and ``eth1`` (the trunk ENI), both veths cabled to a ``vpc`` namespace that routes like the
VPC: every pod address is routed to the trunk's cable with a permanent neighbour entry for the
pod's branch MAC, the subnet gateway answers by proxy ARP, and a ``db`` namespace is another
host of the subnet. The trunk's cable carries 802.1Q frames: the node's branch links are
``ebpf`` (this kernel has no VLAN devices: a veth tagged by eBPF, ``netlink.dot1q``), and the
``vpc`` side takes each branch's VLAN off the cable with the same construction (``rt.<vid>``).
Names, MACs, tables, routes and rules are what ``vlan`` links get. Nothing outside the
namespaces the test made is touched.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address

import attrs
import pytest

from cloud.emulator.netns import call_in_netns
from netlink import Datapath, PodNet
from netlink.dot1q import links
from netlink.dot1q.links import Dot1qLink
from netlink.names import host_veth_name
from netlink.rtnl import opened_in
from netlink.vlan import BranchLink, IifRule
from tests.frames import udp_from, vlan_of_next_frame
from tests.netns import Netns

pytestmark = pytest.mark.root

MakeNetns = Callable[[str], Netns]
GW = "10.9.0.1"
NODE_IP = "10.9.0.10"
DB_IP = "10.9.0.200"
TRUNK_MAC = "02:00:00:00:00:e1"
VPC_MAC = "02:00:00:00:00:aa"  # the VPC's side of every branch


def kernel_has_vlan(ns: Netns) -> bool:
    ns.run("ip", "link", "add", "name", "probe0", "type", "veth", "peer", "name", "probe1")
    made = ns.run(
        "ip",
        "link",
        "add",
        "link",
        "probe0",
        "name",
        "probe0.5",
        "type",
        "vlan",
        "id",
        "5",
        check=False,
    )
    ns.run("ip", "link", "del", "probe0")
    return made.returncode == 0


class Bed:
    """node + vpc + db namespaces, the trunk on the node's eth1."""

    def __init__(self, make: MakeNetns) -> None:
        self.make = make
        self.vpc = make("vpc")
        self.node = make("node")
        self.db = make("db")
        v, n, d = self.vpc, self.node, self.db
        v.run(
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.proxy_arp=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            "net.ipv4.conf.default.send_redirects=0",
        )
        v.run("ip", "addr", "add", f"{GW}/32", "dev", "lo")
        for router_if, other, other_if, mac in (
            ("r0", n, "eth0", "02:00:00:00:00:e0"),
            ("rt", n, "eth1", TRUNK_MAC),
            ("rd", d, "eth0", "02:00:00:00:00:db"),
        ):
            v.run(
                "ip",
                "link",
                "add",
                router_if,
                "type",
                "veth",
                "peer",
                "name",
                other_if,
                "address",
                mac,
                "netns",
                other.name,
            )
            v.run("ip", "link", "set", router_if, "up")
            other.run("ip", "link", "set", other_if, "up")
            v.run(
                "ip", "ntable", "change", "name", "arp_cache", "dev", router_if, "proxy_delay", "0"
            )
        v.run("ip", "route", "add", f"{NODE_IP}/32", "dev", "r0")
        v.run("ip", "route", "add", f"{DB_IP}/32", "dev", "rd")
        n.sysctl("net.ipv4.ip_forward", "1")
        n.run("ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        n.run("ip", "route", "add", "default", "via", GW, "dev", "eth0")
        d.run("ip", "addr", "add", f"{DB_IP}/24", "dev", "eth0")
        d.run("ip", "route", "add", "default", "via", GW, "dev", "eth0")
        self.trunk_index = int(n.run("cat", "/sys/class/net/eth1/ifindex").stdout)
        self.rt_index = int(v.run("cat", "/sys/class/net/rt/ifindex").stdout)
        self.dp = Datapath(n.path)
        self.servers: list[subprocess.Popen[bytes]] = []

    def branch_for(self, vlan: int, ip: str, *, strict: bool) -> tuple[BranchLink, str]:
        """A branch ENI the VPC routes: its MAC, its VLAN taken off the trunk's cable into
        ``rt.<vid>``, and the VPC's route to its address through that."""
        mac = f"02:00:00:00:{vlan:02x}:{vlan:02x}"
        side = f"rt.{vlan}"
        with opened_in(self.vpc.path) as rtnl:
            links.create(
                rtnl, Dot1qLink(name=side, vlan_id=vlan, mac=VPC_MAC, parent=self.rt_index)
            )
        v = self.vpc
        v.run("ip", "ntable", "change", "name", "arp_cache", "dev", side, "proxy_delay", "0")
        v.run("ip", "neigh", "replace", ip, "lladdr", mac, "dev", side, "nud", "permanent")
        v.run("ip", "route", "replace", f"{ip}/32", "dev", side)
        return (
            BranchLink(
                vlan=vlan,
                trunk_index=self.trunk_index,
                mac=mac,
                gateway=IPv4Address(GW),
                strict=strict,
                kind="ebpf",
            ),
            mac,
        )

    def pod(self, vlan: int, ip: str, *, strict: bool) -> tuple[Netns, PodNet]:
        ns = self.make(f"p{vlan}")
        branch, _ = self.branch_for(vlan, ip, strict=strict)
        pod = PodNet(
            netns=ns.path,
            ifname="eth0",
            host_veth=host_veth_name("sg", ns.name, "eth0", strict=strict),
            ip=IPv4Address(ip),
            mtu=1500,
            table=None if strict else branch.table,
            branch=branch,
        )
        return ns, pod

    def serve(self, ns: Netns, port: int = 7000) -> None:
        proc = ns.popen(
            [sys.executable, "-m", "tests.echo", "serve", str(port)],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        self.servers.append(proc)

    def close(self) -> None:
        for p in self.servers:
            p.kill()
            p.wait()
        self.dp.close()


@pytest.fixture
def bed(make_netns: MakeNetns) -> Iterator[Bed]:
    b = Bed(make_netns)
    try:
        yield b
    finally:
        b.close()


def tcp(ns: Netns, ip: str, port: int = 7000, timeout: float = 5.0) -> str | None:
    """One TCP exchange from ``ns``: the address the server saw, or None on failure."""
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(('{ip}',{port}),timeout={timeout})\n"
        "s.sendall(b'hi\\n'); print(s.makefile().readline().strip())\n"
    )
    done = ns.run(sys.executable, "-c", code, check=False, timeout=timeout + 10)
    return done.stdout.strip() if done.returncode == 0 else None


def ping(ns: Netns, ip: str) -> bool:
    return ns.run("ping", "-c1", "-W2", "-q", ip, check=False).returncode == 0


def rules(ns: Netns) -> list[str]:
    return [" ".join(line.split()) for line in ns.run("ip", "rule").stdout.splitlines()]


def routes(ns: Netns, table: str) -> list[str]:
    out = ns.run("ip", "route", "show", "table", table).stdout
    return [" ".join(line.split()) for line in out.splitlines()]


def forwarded(ns: Netns) -> int:
    """IPv4 datagrams the namespace has forwarded (Ip: ForwDatagrams): what crossed the VPC."""
    lines = [line.split() for line in ns.run("cat", "/proc/net/snmp").stdout.splitlines()]
    head, values = (line for line in lines if line[0] == "Ip:")
    return int(values[head.index("ForwDatagrams")])


def test_strict_mode_builds_exactly_vpc_cnis_datapath(bed: Bed) -> None:
    ns, pod = bed.pod(5, "10.9.0.50", strict=True)
    assert bed.dp.move_local_rule() is True
    assert bed.dp.move_local_rule() is False  # once per node
    bed.dp.wire(pod)
    v = pod.host_veth
    assert v.startswith("pws")
    assert rules(bed.node) == [
        "10: from all iif vlan.eth.5 lookup 105",
        f"10: from all iif {v} lookup 105",
        "20: from all lookup local",
        "32766: from all lookup main",
        "32767: from all lookup default",
    ]
    assert routes(bed.node, "105") == [
        f"default via {GW} dev vlan.eth.5",
        f"{GW} dev vlan.eth.5 scope link",
        f"10.9.0.50 dev {v} scope link",
    ]
    assert "10.9.0.50" not in bed.node.run("ip", "route").stdout  # nothing in main
    link = bed.node.run("ip", "-d", "link", "show", "vlan.eth.5").stdout
    assert "vlan.eth.5@vlan.eth.5p" in link and "02:00:00:00:05:05" in link and "veth" in link
    assert f"alias podwire 802.1Q id 5 on ifindex {bed.trunk_index}" in link
    assert "UP" in link and "inet " not in bed.node.run("ip", "addr", "show", "vlan.eth.5").stdout
    assert bed.dp.check(pod) == []
    # pod -> another host of the VPC: out of the VLAN link, tagged, across the VPC
    before = forwarded(bed.vpc)
    bed.serve(bed.db)
    assert tcp(ns, DB_IP) == "10.9.0.50"
    assert forwarded(bed.vpc) > before
    assert (
        call_in_netns(bed.node.path, lambda: vlan_of_next_frame("eth1", udp_from(ns, DB_IP))) == 5
    )


def test_standard_mode_builds_exactly_vpc_cnis_datapath(bed: Bed) -> None:
    ns, pod = bed.pod(6, "10.9.0.60", strict=False)
    bed.dp.wire(pod)
    v = pod.host_veth
    assert v.startswith("pwv")
    assert rules(bed.node) == [
        "0: from all lookup local",
        "512: from all to 10.9.0.60 lookup main",
        "1536: from 10.9.0.60 lookup 106",
        "32766: from all lookup main",
        "32767: from all lookup default",
    ]
    assert routes(bed.node, "106") == [
        f"default via {GW} dev vlan.eth.6",
        f"{GW} dev vlan.eth.6 scope link",
    ]
    assert f"10.9.0.60 dev {v} scope link" in routes(bed.node, "main")
    assert bed.dp.check(pod) == []
    assert bed.dp.strict_chains() == {}
    bed.serve(bed.db)
    before = forwarded(bed.vpc)
    assert tcp(ns, DB_IP) == "10.9.0.60"  # through the branch, its own address
    assert forwarded(bed.vpc) > before
    bed.serve(ns)
    before = forwarded(bed.vpc)
    assert tcp(bed.node, "10.9.0.60") == NODE_IP  # node -> pod stays on the node
    assert forwarded(bed.vpc) == before


def test_strict_pods_on_one_node_reach_each_other_only_through_the_vpc(bed: Bed) -> None:
    bed.dp.move_local_rule()
    a_ns, a = bed.pod(5, "10.9.0.50", strict=True)
    b_ns, b = bed.pod(7, "10.9.0.70", strict=True)
    bed.dp.wire(a)
    bed.dp.wire(b)
    bed.serve(b_ns)
    before = forwarded(bed.vpc)
    assert tcp(a_ns, "10.9.0.70") == "10.9.0.50"
    assert forwarded(bed.vpc) >= before + 4  # both directions crossed the VPC
    # and a standard pod's traffic to its neighbour stays on the node
    c_ns, c = bed.pod(8, "10.9.0.80", strict=False)
    d_ns, d = bed.pod(9, "10.9.0.90", strict=False)
    bed.dp.wire(c)
    bed.dp.wire(d)
    bed.serve(d_ns)
    before = forwarded(bed.vpc)
    assert tcp(c_ns, "10.9.0.90") == "10.9.0.80"
    assert forwarded(bed.vpc) == before


def test_node_reaches_a_strict_pod_with_early_demux_on(bed: Bed) -> None:
    """kubelet's probes: TCP from the node's own address to a strict pod, hairpinned through
    the VPC, with net.ipv4.tcp_early_demux left at 1."""
    bed.dp.move_local_rule()
    ns, pod = bed.pod(5, "10.9.0.50", strict=True)
    bed.dp.wire(pod)
    assert bed.node.run("sysctl", "-n", "net.ipv4.tcp_early_demux").stdout.strip() == "1"
    bed.serve(ns)
    before = forwarded(bed.vpc)
    assert tcp(bed.node, "10.9.0.50") == NODE_IP
    assert forwarded(bed.vpc) > before  # the pod's replies crossed the VPC too
    # and the pod reaches a service on the node (pod-initiated, through the VPC)
    bed.serve(bed.node, 7001)
    assert tcp(ns, NODE_IP, 7001) == "10.9.0.50"
    # Without the ingress forward the node's own connection dies, as on EKS without
    # DISABLE_TCP_EARLY_DEMUX: early demux gives the reply a socket, then it is forwarded.
    bed.dp.delete_strict_chains([pod.host_veth])
    assert tcp(bed.node, "10.9.0.50", timeout=2.0) is None
    assert f"strict local forward on {pod.host_veth}" in bed.dp.check(pod)
    assert bed.dp.repair_host(pod) == [f"strict local forward on {pod.host_veth}"]
    assert tcp(bed.node, "10.9.0.50") == NODE_IP


def test_unwire_leaves_nothing_of_either_mode(bed: Bed) -> None:
    bed.dp.move_local_rule()
    for strict, vid, ip in ((True, 5, "10.9.0.50"), (False, 6, "10.9.0.60")):
        _, pod = bed.pod(vid, ip, strict=strict)
        bed.dp.wire(pod)
        bed.dp.unwire_host(pod)
        bed.dp.unwire_host(pod)  # idempotent
        link = bed.node.run("ip", "link", "show", f"vlan.eth.{vid}").stdout
        assert "state DOWN" in link or ",UP" not in link
        bed.dp.delete_links([pod.host_veth, f"vlan.eth.{vid}"])
        assert routes(bed.node, str(100 + vid)) == []
        assert ip not in bed.node.run("ip", "route").stdout
    assert rules(bed.node) == [
        "20: from all lookup local",
        "32766: from all lookup main",
        "32767: from all lookup default",
    ]
    assert bed.dp.strict_chains() == {}
    assert bed.dp.branch_links() == {}
    assert "bpf" not in bed.node.run("tc", "filter", "show", "dev", "eth1", "ingress").stdout
    assert bed.dp.sync_dot1q([bed.trunk_index]) == []
    assert bed.dp.restore_local_rule() is True
    assert rules(bed.node)[0] == "0: from all lookup local"


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "standard"])
def test_check_names_and_repair_puts_back_what_someone_removed(bed: Bed, strict: bool) -> None:
    bed.dp.move_local_rule() if strict else None
    ns, pod = bed.pod(5, "10.9.0.50", strict=strict)
    bed.dp.wire(pod)
    n = bed.node
    n.run("ip", "route", "del", "default", "table", "105")
    if strict:
        n.run("ip", "rule", "del", "iif", "vlan.eth.5", "pref", "10")
    else:
        n.run("ip", "rule", "del", "pref", "1536")
    missing = bed.dp.check(pod)
    assert f"default via {GW} dev vlan.eth.5 table 105" in missing
    assert (
        "rule iif vlan.eth.5 lookup 105 (10)" if strict else "rule from 10.9.0.50 lookup 105 (1536)"
    ) in missing
    assert bed.dp.repair_host(pod) == missing
    assert bed.dp.check(pod) == []
    # the whole VLAN link gone: made again, with its table
    n.run("ip", "link", "del", "vlan.eth.5")
    assert "link vlan.eth.5" in bed.dp.check(pod)
    bed.dp.repair_host(pod)
    assert bed.dp.check(pod) == []
    bed.serve(bed.db)
    assert tcp(ns, DB_IP) == "10.9.0.50"


def test_check_names_and_repair_puts_back_a_removed_802_1q_program(bed: Bed) -> None:
    bed.dp.move_local_rule()
    ns, pod = bed.pod(5, "10.9.0.50", strict=True)
    bed.dp.wire(pod)
    bed.serve(bed.db)
    bed.node.run("tc", "qdisc", "del", "dev", "vlan.eth.5", "clsact")
    bed.node.run("tc", "filter", "del", "dev", "eth1", "ingress")
    missing = bed.dp.check(pod)
    assert missing == [
        "802.1Q tagger on vlan.eth.5",
        f"802.1Q demultiplexer on ifindex {bed.trunk_index}",
    ]
    assert bed.dp.repair_host(pod) == missing
    assert bed.dp.check(pod) == []
    assert tcp(ns, DB_IP) == "10.9.0.50"


def test_gc_brings_the_demultiplexer_back_to_the_live_links(bed: Bed) -> None:
    _, pod = bed.pod(5, "10.9.0.50", strict=False)
    bed.dp.wire(pod)
    # what a crashed ADD leaves: a link of VLAN 9 no pod owns, in the demultiplexer
    with opened_in(bed.node.path) as rtnl:
        links.create(
            rtnl,
            Dot1qLink(
                name="vlan.eth.9", vlan_id=9, mac="02:00:00:00:09:09", parent=bed.trunk_index
            ),
        )
    assert set(bed.dp.branch_links()) == {"vlan.eth.5", "vlan.eth.9"}
    assert bed.dp.sync_dot1q([bed.trunk_index]) == []  # both links live: nothing to change
    bed.dp.delete_links(["vlan.eth.9"])  # as GC deletes a leaked link
    want = [
        f"802.1Q demultiplexer on ifindex {bed.trunk_index} for VLANs 5 "
        "(found: pw_dot1q_demux vlans 5,9)"
    ]
    assert bed.dp.sync_dot1q([bed.trunk_index], dry_run=True) == want
    assert bed.dp.sync_dot1q([bed.trunk_index]) == want
    assert bed.dp.sync_dot1q([bed.trunk_index], dry_run=True) == []
    assert bed.dp.check(pod) == []


def test_a_stale_link_with_the_same_name_is_replaced(bed: Bed) -> None:
    bed.node.run(
        "ip",
        "link",
        "add",
        "link",
        "eth1",
        "name",
        "vlan.eth.5",
        "address",
        "02:11:11:11:11:11",
        "type",
        "macvlan",
    )
    _, pod = bed.pod(5, "10.9.0.50", strict=False)
    bed.dp.wire(pod)
    assert bed.dp.branch_links()["vlan.eth.5"].mac == "02:00:00:00:05:05"
    assert bed.dp.check(pod) == []


def test_what_gc_sees(bed: Bed) -> None:
    bed.dp.move_local_rule()
    _, pod = bed.pod(5, "10.9.0.50", strict=True)
    bed.dp.wire(pod)
    assert set(bed.dp.branch_links()) == {"vlan.eth.5"}
    assert {(r.iifname, r.table) for r in bed.dp.iif_rules()} == {
        ("vlan.eth.5", 105),
        (pod.host_veth, 105),
    }
    assert bed.dp.strict_chains() == {pod.host_veth: f"fwd ip to {GW} device vlan.eth.5"}
    bed.dp.delete_iif_rules(bed.dp.iif_rules())
    bed.dp.delete_iif_rules([vlan_rule := IifRule(iifname="vlan.eth.5", table=105)])
    bed.dp.delete_iif_rules([vlan_rule])  # already gone: fine
    assert bed.dp.iif_rules() == []


def test_vlan_kind_on_kernels_with_8021q(bed: Bed) -> None:
    if not kernel_has_vlan(bed.node):
        pytest.skip("this kernel has no 802.1Q VLAN support (CONFIG_VLAN_8021Q)")
    _, pod = bed.pod(5, "10.9.0.50", strict=True)
    assert pod.branch is not None
    vlan_pod = attrs.evolve(pod, branch=attrs.evolve(pod.branch, kind="vlan"))
    bed.dp.move_local_rule()
    bed.dp.wire(vlan_pod)
    link = bed.node.run("ip", "-d", "link", "show", "vlan.eth.5").stdout
    assert "vlan protocol 802.1Q id 5" in link
    assert bed.dp.check(vlan_pod) == []
