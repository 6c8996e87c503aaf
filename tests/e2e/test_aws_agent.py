"""The agent with the aws provider, as a process on emulated nodes: the warm pool grows and
shrinks through real EC2 calls, ENIs appear as real links, pods' packets cross the VPC fabric."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cloud.emulator import Vpc
from cloud.emulator.api import Node as VpcNode
from cloud.emulator.api import Subnet
from tests.harness import CniResult, Node, aws_node, ping
from tests.netns import Netns

pytestmark = pytest.mark.root

TAG_INSTANCE = "node.k8s.amazonaws.com/instance_id"
FAST = {
    "retry_base": 0.02,
    "retry_cap": 0.2,
    "min_eni_age": 1.0,
    "release_interval": 1.0,
    "refill_interval": 0.5,
    "leak_grace": 1.0,
    "leak_interval": 1.0,
}


def agent_on(vpc: Vpc, vnode: VpcNode, tag: str, **aws: Any) -> Node:
    node = aws_node(vpc, vnode, aws={**FAST, **aws}, cooldown=1.0, tag=tag)
    node.start()
    return node


def until(fn: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if ok(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def add_retrying(node: Node, pod: Netns, timeout: float = 60.0) -> CniResult:
    """ADD as kubelet does: code 11 means try again later."""
    deadline = time.monotonic() + timeout
    while True:
        r = node.add(pod)
        if r.code == 0 or r.doc["code"] != 11 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def enis(node: Node) -> list[dict[str, Any]]:
    return list(node.call("agent.enis"))


def our_enis_in_cloud(vpc: Vpc, vnode: VpcNode) -> list[Any]:
    import boto3

    ec2 = boto3.client("ec2", **vpc.client_kwargs())
    found = ec2.describe_network_interfaces(
        Filters=[{"Name": f"tag:{TAG_INSTANCE}", "Values": [vnode.instance_id]}]
    )
    return list(found["NetworkInterfaces"])


def tx_packets(node: Node, link: str) -> int:
    return int(node.netns.run("cat", f"/sys/class/net/{link}/statistics/tx_packets").stdout)


@pytest.fixture
def vpc() -> Iterator[Vpc]:
    with Vpc.start("10.0.0.0/16") as running:
        yield running


def two_nodes(
    vpc: Vpc, instance_type: str, subnet: Subnet, **aws: Any
) -> tuple[Node, Node, VpcNode]:
    va, vb = vpc.add_node(instance_type, subnet), vpc.add_node("m5.large", subnet)
    return agent_on(vpc, va, "awsa", **aws), agent_on(vpc, vb, "awsb"), va


def test_scale_0_30_0_enis_follow_the_targets_and_traffic_leaves_by_the_owning_eni(
    vpc: Vpc,
) -> None:
    subnet = vpc.add_subnet("10.0.0.0/20")
    a, b, va = two_nodes(vpc, "m5.xlarge", subnet)  # 4 ENIs x 15 IPs: 14 usable per ENI
    try:
        peer = b.new_pod("peer")
        peer_ip = add_retrying(b, peer).ip
        pods = [a.new_pod("sc") for _ in range(30)]
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda p: add_retrying(a, p), pods))
        assert all(r.code == 0 for r in results), [r for r in results if r.code]
        ips = {r.ip for r in results}
        assert len(ips) == 30
        # WARM_ENI_TARGET=1 with 30 pods: 30 assigned + 14 spare needs 44 -> 4 ENIs
        assert until(lambda: len(enis(a)), lambda n: n == 4) == 4
        assert all(e["table"] == e["device"] + 1 for e in enis(a) if not e["primary"])
        # a pod whose address lives on a secondary ENI leaves through that ENI's link
        by_eni = {ip: e for e in enis(a) for ip in e["ips"]}
        secondary = [
            (p, r.ip) for p, r in zip(pods, results, strict=True) if not by_eni[r.ip]["primary"]
        ]
        pod, ip = secondary[0]
        link = f"eth{by_eni[ip]['device']}"
        before = tx_packets(a, link)
        assert ping(pod, peer_ip, count=3)
        assert tx_packets(a, link) >= before + 3
        assert ping(a.netns, ip) and ping(peer, ip)  # node->pod, pod<->pod across nodes
        # the other node's pod sees this pod's own address (no NAT inside the VPC)
        assert "from" not in peer.run("ip", "route").stdout
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            assert all(r.code == 0 for r in ex.map(a.delete, pods))
        # back to 0 pods: secondary ENIs freed one per tick, after their minimum age
        assert until(lambda: len(enis(a)), lambda n: n == 1, timeout=60) == 1
        cloud = until(
            lambda: our_enis_in_cloud(vpc, va),
            lambda found: all(e.get("Attachment", {}).get("Status") == "attached" for e in found),
        )
        assert all(e.get("Attachment", {}).get("Status") == "attached" for e in cloud), cloud
    finally:
        a.close()
        b.close()


def test_prefix_mode_hands_out_addresses_of_28s(vpc: Vpc) -> None:
    subnet = vpc.add_subnet("10.0.16.0/20")
    node = agent_on(vpc, vpc.add_node("m5.large", subnet), "pfx", prefix_delegation=True)
    try:
        pods = [node.new_pod("pf") for _ in range(5)]
        results = [add_retrying(node, p) for p in pods]
        assert all(r.code == 0 for r in results)
        prefixes = [p for e in enis(node) for p in e["prefixes"]]
        assert prefixes and all(p.endswith("/28") for p in prefixes)
        from ipaddress import IPv4Address, IPv4Network

        assert all(any(IPv4Address(r.ip) in IPv4Network(p) for p in prefixes) for r in results)
        assert ping(node.netns, results[0].ip)
    finally:
        node.close()


def test_throttling_on_every_call_during_scale_up(vpc: Vpc) -> None:
    subnet = vpc.add_subnet("10.0.32.0/20")
    vnode = vpc.add_node("m5.large", subnet)
    for action in (
        "AssignPrivateIpAddresses",
        "CreateNetworkInterface",
        "AttachNetworkInterface",
        "ModifyNetworkInterfaceAttribute",
        "DescribeNetworkInterfaces",
        "DescribeInstanceTypes",
        "DescribeSubnets",
        "CreateTags",
    ):
        vpc.faults.throttle(action, 3)
    # leak cleanup off: an ENI the workflows left `available` must show, not be swept away
    node = agent_on(vpc, vnode, "thr", leak_cleanup=False)
    try:
        pods = [node.new_pod("th") for _ in range(15)]
        codes: list[int] = []
        results = []
        for p in pods:
            r = node.add(p)
            while r.code != 0:
                codes.append(r.doc["code"])
                assert r.doc["code"] == 11, r
                time.sleep(0.2)
                r = node.add(p)
            results.append(r)
        assert len({r.ip for r in results}) == 15
        metrics = node.ctl("metrics").stdout
        assert 'outcome="RequestLimitExceeded"' in metrics  # throttled, absorbed by retries
        for p in pods:
            assert node.delete(p).code == 0
        # an ENI being freed is briefly detached before it is deleted: wait for the workflow
        cloud = until(
            lambda: our_enis_in_cloud(vpc, vnode),
            lambda found: all(e["Status"] == "in-use" for e in found),
            timeout=30,
        )
        assert all(e["Status"] == "in-use" for e in cloud), cloud  # nothing leaked `available`
    finally:
        node.close()


def test_subnet_exhaustion_falls_back_from_prefixes_to_single_ips(vpc: Vpc) -> None:
    # a /26 whose free space is fragmented: no aligned /28 left, single addresses still free
    subnet = vpc.add_subnet("10.0.48.0/26")
    vnode = vpc.add_node("m5.large", subnet)
    import boto3

    ec2 = boto3.client("ec2", **vpc.client_kwargs())
    blocker = ec2.create_network_interface(SubnetId=subnet.id)["NetworkInterface"][
        "NetworkInterfaceId"
    ]
    taken = [f"10.0.48.{i}" for i in range(5, 64, 8)]  # one address in every /28 but the first
    ec2.assign_private_ip_addresses(NetworkInterfaceId=blocker, PrivateIpAddresses=taken[1:])
    node = agent_on(vpc, vnode, "exh", prefix_delegation=True)
    try:
        pods = [node.new_pod("ex") for _ in range(3)]
        results = [add_retrying(node, p) for p in pods]
        assert all(r.code == 0 for r in results), results
        pool = node.call("agent.pool")
        assert pool["refiller"]["fallback"] is not None
        assert pool["refiller"]["fallback"]["code"] in (
            "InsufficientCidrBlocks",
            "InsufficientFreeAddressesInSubnet",
        )
        assert "fallback to /32" in node.ctl("pool").stdout
    finally:
        node.close()


def test_agent_killed_during_an_eni_attach_leaks_nothing(vpc: Vpc) -> None:
    subnet = vpc.add_subnet("10.0.64.0/20")
    vnode = vpc.add_node("m5.large", subnet)
    vpc.faults.attach_delay(3.0)
    node = agent_on(vpc, vnode, "kill")
    try:
        pods = [node.new_pod("kl") for _ in range(12)]  # more than the primary ENI's 9
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            first = list(ex.map(node.add, pods))
        # the second ENI is being attached now (3 s in `attaching`): kill the agent mid-way
        until(
            lambda: [e for e in our_enis_in_cloud(vpc, vnode) if e.get("Attachment")],
            lambda found: len(found) >= 1,
            timeout=10,
        )
        node.kill()
        vpc.faults.attach_delay(0.0)
        node.start()
        ok = {p.name: r.ip for p, r in zip(pods, first, strict=True) if r.code == 0}
        for p in pods:
            if p.name not in ok:
                r = add_retrying(node, p)
                assert r.code == 0, r
                ok[p.name] = r.ip
        live = {pod["container_id"]: pod["ip"] for pod in node.call("agent.pods")}
        assert all(live[name] == ip for name, ip in ok.items())
        assert len(set(live.values())) == len(live) == 12  # no address twice

        # every ENI with our tag ends attached to the node and known to the agent: adopted, or
        # deleted if it never was. The refiller may still be adding a warm ENI (in-use in EC2
        # before the agent has configured its link), so wait for both views to settle together.
        def views() -> tuple[list[Any], set[str]]:
            return our_enis_in_cloud(vpc, vnode), {e["eni"] for e in enis(node) if not e["primary"]}

        def settled(got: tuple[list[Any], set[str]]) -> bool:
            cloud, known = got
            in_use = all(e["Status"] == "in-use" for e in cloud)
            return in_use and {e["NetworkInterfaceId"] for e in cloud} == known

        cloud, known = until(views, settled, timeout=60)
        assert all(e["Status"] == "in-use" for e in cloud), cloud
        assert {e["NetworkInterfaceId"] for e in cloud} == known
    finally:
        node.close()


def test_leaked_available_enis_with_our_tag_are_deleted(vpc: Vpc) -> None:
    import boto3

    subnet = vpc.add_subnet("10.0.80.0/20")
    vnode = vpc.add_node("m5.large", subnet)
    ec2 = boto3.client("ec2", **vpc.client_kwargs())
    tags = [
        {"Key": TAG_INSTANCE, "Value": vnode.instance_id},
        {"Key": "node.k8s.amazonaws.com/createdAt", "Value": "2020-01-01T00:00:00Z"},
    ]
    leaked = ec2.create_network_interface(
        SubnetId=subnet.id, TagSpecifications=[{"ResourceType": "network-interface", "Tags": tags}]
    )["NetworkInterface"]["NetworkInterfaceId"]
    foreign = ec2.create_network_interface(SubnetId=subnet.id)["NetworkInterface"][
        "NetworkInterfaceId"
    ]
    node = agent_on(vpc, vnode, "leak")
    try:
        left = until(
            lambda: {
                e["NetworkInterfaceId"]
                for e in ec2.describe_network_interfaces()["NetworkInterfaces"]
            },
            lambda ids: leaked not in ids,
            timeout=30,
        )
        assert leaked not in left and foreign in left
    finally:
        node.close()


def test_readiness_follows_the_provider_and_liveness_stays(vpc: Vpc) -> None:
    import json as _json

    subnet = vpc.add_subnet("10.0.96.0/20")
    vnode = vpc.add_node("m5.large", subnet)
    vpc.faults.error("DescribeInstanceTypes", 6, status=503)  # 3 restore attempts of 2 tries fail
    node = aws_node(vpc, vnode, aws={**FAST, "retry_attempts": 2}, tag="ready")
    try:
        node.start(wait=False)

        def probe(path: str) -> tuple[str, str]:
            url = until(lambda: _try_url(node), lambda u: u is not None, timeout=10)
            out = node.netns.run(
                "curl", "-s", "-w", "\n%{http_code}", f"{url}{path}", check=False
            ).stdout
            body, _, code = out.rpartition("\n")
            return code, body

        code, body = until(lambda: probe("/readyz"), lambda r: r[0] == "503", timeout=15)
        assert code == "503" and "provider" in _json.loads(body)["failing"]
        assert probe("/healthz")[0] == "200"  # alive: retrying, not crashed
        # the cloud comes back: ready, and the socket is served
        code, _ = until(lambda: probe("/readyz"), lambda r: r[0] == "200", timeout=60)
        assert code == "200"
        assert until(lambda: node.ctl("health").returncode, lambda rc: rc == 0, timeout=10) == 0
    finally:
        node.close()


def _try_url(node: Node) -> str | None:
    try:
        return node.health_url
    except RuntimeError:
        return None


def test_a_requested_address_must_be_one_the_nodes_enis_hold(vpc: Vpc) -> None:
    subnet = vpc.add_subnet("10.0.0.0/20")
    a, b, _ = two_nodes(vpc, "m5.large", subnet)
    try:
        peer = b.new_pod("peer")
        peer_ip = add_retrying(b, peer).ip
        # a pod on the first ENI makes the refiller attach a warm one
        first = a.new_pod("first")
        assert add_retrying(a, first).code == 0
        found = until(lambda: enis(a), lambda es: any(not e["primary"] and e["ips"] for e in es))
        eni = next(e for e in found if not e["primary"] and e["ips"])
        wanted = next(ip for ip in eni["ips"] if ip != eni["primary_ip"])
        pod = a.new_pod("req")
        r = a.add(pod, args=f"IgnoreUnknown=1;IP={wanted}")
        assert r.code == 0 and r.ip == wanted, r
        # wired as any pod of that ENI: its table, its rules, traffic across the VPC
        assert f"from {wanted} lookup {eni['table']}" in a.netns.run("ip", "rule").stdout
        assert ping(pod, peer_ip, count=2) and ping(a.netns, wanted)
        other = a.new_pod("req2")
        for ip, code in ((eni["primary_ip"], 7), ("10.0.15.250", 7), (wanted, 11)):
            r = a.add(other, args=f"IP={ip}")
            assert r.code == 1 and r.doc["code"] == code, (ip, r)
        assert a.delete(pod).code == 0
    finally:
        a.close()
        b.close()
