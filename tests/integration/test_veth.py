"""The routed-veth datapath against the real kernel.

The node is itself a test namespace (forwarding on, a dummy address to source pings from), so
nothing touches the machine's own namespace; pods are namespaces too. Deleting the namespaces at
teardown removes every veth, route and rule, whatever the test did.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from netlink import (
    Datapath,
    DatapathClosed,
    HostVethExists,
    LinkExists,
    NetnsNotFound,
    NotANetns,
    PodNet,
    RequestFailed,
    WireFailed,
    host_veth_name,
)
from netlink.ns import entered_path
from netlink.veth import DELETE_GROUP
from tests.netns import Netns

pytestmark = pytest.mark.root

MakeNetns = Callable[[str], Netns]
NODE_IP = "10.99.0.1"


@pytest.fixture
def node(make_netns: MakeNetns) -> Netns:
    ns = make_netns("node")
    ns.sysctl("net.ipv4.ip_forward", "1")
    # The node's own address, to source pings from (this kernel has no dummy links).
    ns.run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
    return ns


@pytest.fixture
def dp(node: Netns) -> Iterator[Datapath]:
    datapath = Datapath(node.path)
    try:
        yield datapath
    finally:
        datapath.close()


def pod_net(ns: Netns, ip: str, *, table: int | None = None, mtu: int = 1500) -> PodNet:
    return PodNet(
        netns=ns.path,
        ifname="eth0",
        host_veth=host_veth_name("podnet", ns.name, "eth0"),
        ip=IPv4Address(ip),
        mtu=mtu,
        table=table,
    )


def ip(ns: Netns, *args: str) -> str:
    return ns.run("ip", *args).stdout


def pings(ns: Netns, dst: str) -> bool:
    done = ns.run("ping", "-c1", "-W2", "-q", dst, check=False)
    if done.returncode:
        print(f"ping {dst} from {ns.name}: {done.stdout}{done.stderr}")
    return done.returncode == 0


def test_host_veth_name_is_stable_and_fits_ifnamsiz() -> None:
    name = host_veth_name("podnet", "a" * 64, "eth0")
    assert name == host_veth_name("podnet", "a" * 64, "eth0")
    assert name != host_veth_name("podnet", "a" * 64, "eth1")
    assert name.startswith("pwv")
    assert len(name.encode()) == 15


def test_wire_two_pods_makes_every_object_and_carries_traffic(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    a_ns, b_ns = make_netns("poda"), make_netns("podb")
    a, b = pod_net(a_ns, "10.0.1.5", mtu=1400), pod_net(b_ns, "10.0.1.6", mtu=1400)
    wired_a = dp.wire(a)
    dp.wire(b)

    link = ip(a_ns, "-o", "link", "show", "eth0")
    assert "mtu 1400" in link and ",UP" in link
    assert f"link/ether {wired_a.pod_mac}" in link
    assert link.startswith(f"{wired_a.pod_ifindex}: eth0@if{wired_a.host_ifindex}:")
    assert "inet 10.0.1.5/32 scope global eth0" in ip(a_ns, "-4", "addr", "show", "eth0")
    routes = ip(a_ns, "-4", "route")
    assert "default via 169.254.1.1 dev eth0" in routes
    assert "169.254.1.1 dev eth0 scope link" in routes
    neigh = ip(a_ns, "neigh", "show", "dev", "eth0")
    assert f"169.254.1.1 lladdr {wired_a.host_mac} PERMANENT" in neigh

    host_link = ip(node, "-o", "link", "show", a.host_veth)
    assert "mtu 1400" in host_link and ",UP" in host_link
    assert f"link/ether {wired_a.host_mac}" in host_link
    assert host_link.startswith(f"{wired_a.host_ifindex}: {a.host_veth}@if{wired_a.pod_ifindex}:")
    node_routes = ip(node, "-4", "route")
    assert f"10.0.1.5 dev {a.host_veth} scope link" in node_routes
    assert f"10.0.1.6 dev {b.host_veth} scope link" in node_routes
    assert "10.0.1" not in ip(node, "rule"), "no rules without a table"

    assert pings(a_ns, "10.0.1.6"), "pod a -> pod b through the node"
    assert pings(b_ns, "10.0.1.5"), "pod b -> pod a through the node"
    assert pings(node, "10.0.1.5") and pings(node, "10.0.1.6"), "node -> pods"
    assert pings(a_ns, NODE_IP), "pod -> node"

    assert dp.check(a) == [] and dp.check(b) == []
    veths = dp.host_veths()
    assert set(veths) == {a.host_veth, b.host_veth}
    assert veths[a.host_veth] == wired_a.host_ifindex
    assert dp.link_exists(a.host_veth) and not dp.link_exists("pwvnothere")


FAULTS: dict[str, tuple[Callable[[Netns, Netns, PodNet], object], str]] = {
    "host route": (
        lambda node, pod, p: node.run("ip", "route", "del", f"{p.ip}/32"),
        "host route 10.0.1.5/32",
    ),
    "pod address": (
        lambda node, pod, p: pod.run("ip", "addr", "del", f"{p.ip}/32", "dev", "eth0"),
        "address 10.0.1.5/32 on eth0",
    ),
    "default route": (
        lambda node, pod, p: pod.run("ip", "route", "del", "default"),
        "default route via 169.254.1.1",
    ),
    "gateway route": (
        lambda node, pod, p: pod.run("ip", "route", "del", "169.254.1.1", "dev", "eth0"),
        "route 169.254.1.1 scope link",
    ),
    "neighbour": (
        lambda node, pod, p: pod.run("ip", "neigh", "del", "169.254.1.1", "dev", "eth0"),
        "neighbour 169.254.1.1",
    ),
    "wrong neighbour": (
        lambda node, pod, p: pod.run(
            "ip",
            "neigh",
            "replace",
            "169.254.1.1",
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ),
        "neighbour 169.254.1.1",
    ),
    "pod link down": (
        lambda node, pod, p: pod.run("ip", "link", "set", "eth0", "down"),
        "link eth0 down",
    ),
    "host link down": (
        lambda node, pod, p: node.run("ip", "link", "set", p.host_veth, "down"),
        "link {host_veth} down",
    ),
    "rule from": (
        lambda node, pod, p: node.run("ip", "rule", "del", "from", f"{p.ip}", "lookup", "2"),
        "rule from 10.0.1.5 lookup 2 (1536)",
    ),
    "rule to": (
        lambda node, pod, p: node.run("ip", "rule", "del", "to", f"{p.ip}", "lookup", "main"),
        "rule to 10.0.1.5 lookup main (512)",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_check_detects_drift(node: Netns, dp: Datapath, make_netns: MakeNetns, fault: str) -> None:
    pod_ns = make_netns("pod")
    pod = pod_net(pod_ns, "10.0.1.5", table=2)
    dp.wire(pod)
    assert dp.check(pod) == []
    breaks, expected = FAULTS[fault]
    breaks(node, pod_ns, pod)
    problems = dp.check(pod)
    expected = expected.format(host_veth=pod.host_veth)
    if fault in ("pod address", "pod link down", "host link down"):
        # The kernel flushes routes (and neighbours) through a link that goes down or loses
        # its last address, so those show up too.
        assert expected in problems
    else:
        assert problems == [expected]


def test_check_reports_everything_once_the_link_is_gone(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    pod_ns = make_netns("pod")
    pod = pod_net(pod_ns, "10.0.1.5")
    dp.wire(pod)
    dp.delete_link(pod.host_veth)
    assert dp.check(pod) == [
        "pod link eth0",
        f"host veth {pod.host_veth}",
        "host route 10.0.1.5/32",
    ]
    pod_ns.close()
    with pytest.raises(NetnsNotFound):
        dp.check(pod)


def test_table_rules_are_made_and_unwire_and_delete_remove_everything(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    pod_ns = make_netns("pod")
    pod = pod_net(pod_ns, "10.0.1.5", table=2)
    dp.wire(pod)
    rules = ip(node, "rule")
    assert "512:\tfrom all to 10.0.1.5 lookup main" in rules
    assert "1536:\tfrom 10.0.1.5 lookup 2" in rules
    assert dp.check(pod) == []

    dp.unwire_host(pod)
    assert "10.0.1.5" not in ip(node, "rule") and "10.0.1.5" not in ip(node, "-4", "route")
    assert dp.check(pod) == [
        "host route 10.0.1.5/32",
        "rule from 10.0.1.5 lookup 2 (1536)",
        "rule to 10.0.1.5 lookup main (512)",
    ]
    dp.unwire_host(pod)

    dp.delete_link(pod.host_veth)
    assert pod.host_veth not in ip(node, "link")
    assert "eth0" not in ip(pod_ns, "link")
    assert dp.host_veths() == {}
    dp.delete_link(pod.host_veth)
    dp.unwire_host(pod)


def test_wire_into_a_bad_netns_path(dp: Datapath, node: Netns, tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("")
    cases: list[tuple[str, type[NetnsNotFound | NotANetns]]] = [
        ("/run/netns/pw-missing-0-000000", NetnsNotFound),
        (str(tmp_path), NotANetns),
        (str(regular), NotANetns),
        ("/proc/self/ns/mnt", NotANetns),
    ]
    for path, error in cases:
        pod = PodNet(
            netns=path,
            ifname="eth0",
            host_veth="pwvbadpath00000",
            ip=IPv4Address("10.0.1.5"),
            mtu=1500,
        )
        with pytest.raises(error) as caught:
            dp.wire(pod)
        assert isinstance(caught.value, NetnsNotFound | NotANetns)
        assert caught.value.path == path
    assert dp.host_veths() == {}
    with pytest.raises(NetnsNotFound):
        Datapath("/run/netns/pw-missing-0-000000")


def test_pod_ifname_taken_raises_link_exists_and_leaks_nothing(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    pod_ns = make_netns("pod")
    pod_ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "squat0")
    pod = pod_net(pod_ns, "10.0.1.5")
    with pytest.raises(LinkExists) as caught:
        dp.wire(pod)
    assert caught.value.name == "eth0"
    assert not dp.link_exists(pod.host_veth)
    assert dp.host_veths() == {}
    assert "10.0.1.5" not in ip(node, "-4", "route")
    assert "eth0@squat0" in ip(pod_ns, "link", "show", "eth0")


def test_host_name_taken_raises_host_veth_exists_and_leaks_nothing(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    pod_ns = make_netns("pod")
    pod = pod_net(pod_ns, "10.0.1.5")
    node.run("ip", "link", "add", pod.host_veth, "type", "veth", "peer", "name", "squat0")
    with pytest.raises(HostVethExists) as caught:
        dp.wire(pod)
    assert caught.value.name == pod.host_veth
    assert "eth0" not in ip(pod_ns, "link")
    assert f"{pod.host_veth}@squat0" in ip(node, "link", "show", pod.host_veth)


def test_failure_on_the_host_side_undoes_the_pod_and_spares_the_owner(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    owner_ns, clash_ns = make_netns("owner"), make_netns("clash")
    owner = pod_net(owner_ns, "10.0.1.5", table=2)
    clash = pod_net(clash_ns, "10.0.1.5", table=2)
    dp.wire(owner)
    with pytest.raises(WireFailed) as caught:
        dp.wire(clash)
    assert caught.value.step == "host route 10.0.1.5/32"
    assert isinstance(caught.value.cause, RequestFailed)
    assert caught.value.cause.errno == errno.EEXIST
    assert "eth0" not in ip(clash_ns, "link")
    assert not dp.link_exists(clash.host_veth)
    assert dp.check(owner) == []
    assert pings(node, "10.0.1.5")


def test_twenty_pods_wired_concurrently_are_all_reachable(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    pods = [pod_net(make_netns(f"p{i}"), f"10.0.2.{i + 10}", table=3) for i in range(20)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        wired = list(pool.map(dp.wire, pods))
        problems = list(pool.map(dp.check, pods))
    assert len({w.host_ifindex for w in wired}) == 20
    assert problems == [[]] * 20
    assert set(dp.host_veths()) == {p.host_veth for p in pods}
    unreachable = [str(p.ip) for p in pods if not pings(node, str(p.ip))]
    assert unreachable == []
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(dp.unwire_host, pods))
        list(pool.map(dp.delete_link, [p.host_veth for p in pods]))
    assert dp.host_veths() == {}
    assert "10.0.2." not in ip(node, "rule")


def test_delete_pod_link_is_idempotent_and_fine_when_the_netns_is_gone(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    pod_ns = make_netns("pod")
    pod = pod_net(pod_ns, "10.0.1.5")
    dp.wire(pod)
    dp.delete_pod_link(pod.netns, "eth0")
    assert not dp.link_exists(pod.host_veth)
    dp.delete_pod_link(pod.netns, "eth0")

    gone_ns = make_netns("gone")
    gone = pod_net(gone_ns, "10.0.1.6")
    dp.wire(gone)
    gone_ns.close()
    dp.delete_pod_link(gone.netns, "eth0")
    dp.delete_pod_link("/run/netns/pw-missing-0-000000", "eth0")


def test_default_host_netns_is_the_constructing_threads(node: Netns, make_netns: MakeNetns) -> None:
    def construct() -> Datapath:
        with entered_path(node.path):
            return Datapath()

    with ThreadPoolExecutor(max_workers=1) as pool:
        datapath = pool.submit(construct).result()
    try:
        pod = pod_net(make_netns("pod"), "10.0.1.5")
        datapath.wire(pod)
        assert pod.host_veth in ip(node, "link")
        assert pings(node, "10.0.1.5")
    finally:
        datapath.close()
    with pytest.raises(DatapathClosed):
        datapath.wire(pod_net(make_netns("late"), "10.0.1.6"))
    with pytest.raises(DatapathClosed):
        datapath.host_veths()
    datapath.close()


def test_delete_links_removes_the_named_links_and_only_those(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    named_ns = [make_netns(f"d{i}") for i in range(30)]
    named = [pod_net(ns, f"10.0.3.{i + 10}", table=2) for i, ns in enumerate(named_ns)]
    kept_ns = [make_netns(f"k{i}") for i in range(2)]
    kept = [pod_net(ns, f"10.0.4.{i + 10}", table=2) for i, ns in enumerate(kept_ns)]
    for pod in named + kept:
        dp.wire(pod)
    node.run("ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    node.run("ip", "link", "set", "other1", "group", "7")

    dp.delete_links([p.host_veth for p in named] + ["pwvnothere00000", "nosuchlink"])

    assert set(dp.host_veths()) == {p.host_veth for p in kept}
    assert all("eth0" not in ip(ns, "link") for ns in named_ns)
    assert [dp.check(p) for p in kept] == [[], []]
    assert all(pings(node, str(p.ip)) for p in kept)
    assert dp.link_exists("other0") and dp.link_exists("other1")
    assert "group 7" in ip(node, "link", "show", "other1")
    assert ip(node, "link", "show", "group", str(DELETE_GROUP)) == ""

    dp.delete_links([p.host_veth for p in named])
    dp.delete_links(["pwvnothere00000"])
    dp.delete_links([])
    assert set(dp.host_veths()) == {p.host_veth for p in kept}


def test_concurrent_delete_batches_and_wires_do_not_disturb_each_other(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    pods = [pod_net(make_netns(f"c{i}"), f"10.0.5.{i + 10}") for i in range(24)]
    for pod in pods[:16]:
        dp.wire(pod)
    batches = [[p.host_veth for p in pods[i : i + 4]] for i in range(0, 16, 4)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        deleting = [pool.submit(dp.delete_links, batch) for batch in batches]
        wiring = [pool.submit(dp.wire, pod) for pod in pods[16:]]
        for future in deleting + wiring:
            future.result()
    assert set(dp.host_veths()) == {p.host_veth for p in pods[16:]}
    assert [dp.check(p) for p in pods[16:]] == [[]] * 8


def test_delete_links_falls_back_when_the_group_holds_an_undeletable_link(
    node: Netns, dp: Datapath, make_netns: MakeNetns
) -> None:
    a, b = pod_net(make_netns("fa"), "10.0.1.5"), pod_net(make_netns("fb"), "10.0.1.6")
    dp.wire(a)
    dp.wire(b)
    # The loopback has no rtnl_link_ops: the kernel refuses to delete it, and so the group.
    with pytest.raises(RequestFailed) as caught:
        dp.delete_links(["lo", a.host_veth])
    assert caught.value.op == "delete lo"
    assert caught.value.errno == errno.EOPNOTSUPP
    assert not dp.link_exists(a.host_veth)
    assert "group default" in ip(node, "link", "show", "lo")
    dp.delete_links([b.host_veth])
    assert dp.host_veths() == {}
