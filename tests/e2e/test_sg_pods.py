"""Security groups for pods on the emulated VPC: the agent as a process with the aws provider,
the real plugin, branch ENIs made through EC2 (trunk, CreateNetworkInterface,
AssociateTrunkInterface), their limit and cooldown, throttling, a SIGKILL mid-creation, and
the EKS annotation path (a branch made by someone else).

The trunk's cable carries 802.1Q frames, as on EC2: this kernel has no VLAN devices, so the
agent's ``vlan.eth.<vid>`` links are its veths tagged by eBPF (``netlink.dot1q``)."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest

from cloud.emulator import Vpc
from cloud.emulator.api import Node as VpcNode
from tests.harness import CniResult, Node, aws_node
from tests.netns import Netns

pytestmark = pytest.mark.root

TAG_INSTANCE = "node.k8s.amazonaws.com/instance_id"
TAG_VLAN = "podwire.io/vlan-id"
FAST = {
    "retry_base": 0.02,
    "retry_cap": 0.2,
    "min_eni_age": 1.0,
    "release_interval": 1.0,
    "refill_interval": 0.5,
    "leak_grace": 1.0,
    "leak_interval": 1.0,
}


def sg_agent(
    vpc: Vpc, vnode: VpcNode, tag: str, *, cooldown: float = 2.0, prelude: str = "", **sg: Any
) -> Node:
    section = {"enabled": True, "branch_cooldown": cooldown, "branch_wait": 10.0, **sg}
    node = aws_node(
        vpc,
        vnode,
        aws=FAST,
        security_groups=section,
        extra_config=prelude,
        cooldown=1.0,
        tag=tag,
    )
    node.start()
    return node


def until(fn: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if ok(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def conf(node: Node, **annotations: str) -> dict[str, Any]:
    return node.plugin_conf(
        runtimeConfig={"io.kubernetes.cri.pod-annotations": annotations} if annotations else {}
    )


def groups(*ids: str) -> dict[str, str]:
    return {"podwire.io/security-groups": ",".join(ids)}


def add(node: Node, pod: Netns, annotations: dict[str, str], timeout: float = 90.0) -> CniResult:
    """ADD as kubelet does: code 11 means try again later."""
    c = node.plugin_conf(runtimeConfig={"io.kubernetes.cri.pod-annotations": annotations})
    deadline = time.monotonic() + timeout
    while True:
        r = node.add(pod, conf=c)
        if r.code == 0 or r.doc["code"] != 11 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


class Cloud:
    def __init__(self, vpc: Vpc) -> None:
        self.ec2 = boto3.client("ec2", **vpc.client_kwargs())

    def branches(self, vnode: VpcNode) -> list[dict[str, Any]]:
        found = self.ec2.describe_network_interfaces(
            Filters=[
                {"Name": f"tag:{TAG_INSTANCE}", "Values": [vnode.instance_id]},
                {"Name": "tag-key", "Values": [TAG_VLAN]},
            ]
        )["NetworkInterfaces"]
        return list(found)

    def associations(self, trunk: str) -> list[dict[str, Any]]:
        return list(
            self.ec2.describe_trunk_interface_associations(
                Filters=[
                    {"Name": "trunk-interface-association.trunk-interface-id", "Values": [trunk]}
                ]
            )["InterfaceAssociations"]
        )

    def group(self, vpc: Vpc, name: str) -> str:
        return str(
            self.ec2.create_security_group(GroupName=name, Description=name, VpcId=vpc.vpc_id)[
                "GroupId"
            ]
        )


def ec2_calls(node: Node, action: str) -> float:
    """Successful calls of ``action`` the agent made, from its metrics."""
    needle = f'podwire_ec2_requests_total{{action="{action}",outcome="ok"}} '
    for line in node.ctl("metrics").stdout.splitlines():
        if line.startswith(needle):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def vpc() -> Iterator[Vpc]:
    with Vpc.start("10.0.0.0/16") as running:
        yield running


def trunk_of(node: Node) -> str:
    st = node.call("agent.status")["security_groups"]
    assert st["state"] == "ready", st
    return str(st["trunk"]["eni_id"])


def test_the_branch_limit_is_reached_then_freed_after_the_cooldown(vpc: Vpc) -> None:
    cloud = Cloud(vpc)
    vnode = vpc.add_node("m5.large", vpc.add_subnet("10.0.1.0/24"))  # 9 branches
    node = sg_agent(vpc, vnode, "lim", cooldown=3.0)
    try:
        app = cloud.group(vpc, "app")
        pods = [node.new_pod("lim") for _ in range(10)]
        for p in pods[:9]:
            assert add(node, p, groups(app)).code == 0
        r = node.add(pods[9], conf=conf(node, **groups(app)))
        assert r.code == 1 and r.doc["code"] == 11, r
        assert "branch ENI limit reached: 9 per trunk; 9 in use" in r.doc["details"]
        assert node.delete(pods[0], conf=conf(node)).code == 0
        r = node.add(pods[9], conf=conf(node, **groups(app)))
        assert r.doc["code"] == 11 and "1 cooling" in r.doc["details"]  # cooling ones count
        deleted = time.monotonic()
        assert add(node, pods[9], groups(app)).code == 0
        assert time.monotonic() - deleted >= 2.0  # only once the cooldown let one go
        assert len(cloud.associations(trunk_of(node))) == 9
        vlans = {p["branch"]["vlan"] for p in node.call("agent.pods") if p["branch"]}
        assert vlans == set(range(1, 10))  # the freed VLAN 1 was taken again
        view = node.ctl("branches")
        assert view.returncode == 0 and "9 in use" in view.stdout
    finally:
        node.close()


def test_ec2_throttling_during_a_burst_of_sg_pods(vpc: Vpc) -> None:
    cloud = Cloud(vpc)
    vnode = vpc.add_node("m5.xlarge", vpc.add_subnet("10.0.2.0/24"))
    node = sg_agent(vpc, vnode, "thr")
    try:
        app = cloud.group(vpc, "app")
        for action in ("CreateNetworkInterface", "AssociateTrunkInterface"):
            vpc.faults.throttle(action, 6)
        pods = [node.new_pod("thr") for _ in range(12)]
        with concurrent.futures.ThreadPoolExecutor(12) as ex:
            results = list(ex.map(lambda p: add(node, p, groups(app)), pods))
        assert all(r.code == 0 for r in results), [r for r in results if r.code]
        assert len({r.ip for r in results}) == 12
        live = [p for p in node.call("agent.pods") if p["branch"]]
        assert len({p["branch"]["vlan"] for p in live}) == 12
        assert len(cloud.associations(trunk_of(node))) == 12
        metrics = node.ctl("metrics").stdout
        assert 'action="AssociateTrunkInterface",outcome="RequestLimitExceeded"' in metrics
        assert 'podwire_sg_adds_total{source="annotation"}' in metrics
        assert len(cloud.branches(vnode)) == 12  # nothing made twice, nothing leaked
    finally:
        node.close()


def test_sigkill_during_branch_creation_leaks_nothing(vpc: Vpc) -> None:
    cloud = Cloud(vpc)
    vnode = vpc.add_node("m5.large", vpc.add_subnet("10.0.3.0/24"))
    node = sg_agent(vpc, vnode, "kill", cooldown=2.0)
    try:
        app = cloud.group(vpc, "app")
        done = [node.new_pod("kd") for _ in range(2)]
        for p in done:
            assert add(node, p, groups(app)).code == 0
        vpc.faults.latency("AssociateTrunkInterface", 3.0)
        pods = [node.new_pod("kl") for _ in range(3)]
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            futures = [ex.submit(node.add, p, conf=conf(node, **groups(app))) for p in pods]
            until(lambda: len(cloud.branches(vnode)), lambda n: n >= 5, timeout=30)
            node.kill()  # creates done, associations in flight
            for f in futures:
                f.result()
        vpc.faults.latency("AssociateTrunkInterface", 0.0)
        node.start()
        for p in pods:
            r = add(node, p, groups(app))
            assert r.code == 0, r
        live = {p["container_id"]: p for p in node.call("agent.pods")}
        assert set(live) == {p.name for p in done + pods}
        vlans = [p["branch"]["vlan"] for p in live.values()]
        assert len(set(vlans)) == len(vlans) == 5  # no VLAN id used twice
        wanted = {p["branch"]["eni"] for p in live.values()}
        # every other branch the dead agent made goes (deleted, or cooled then deleted)
        left = until(
            lambda: {b["NetworkInterfaceId"] for b in cloud.branches(vnode)},
            lambda ids: ids == wanted,
        )
        assert left == wanted
        assocs = cloud.associations(trunk_of(node))
        assert {a["BranchInterfaceId"] for a in assocs} == wanted
        assert len({a["VlanId"] for a in assocs}) == 5
    finally:
        node.close()


def test_the_eks_annotation_wires_a_branch_made_by_someone_else(vpc: Vpc) -> None:
    cloud = Cloud(vpc)
    subnet = vpc.add_subnet("10.0.4.0/24")
    vnode = vpc.add_node("m5.large", subnet)
    node = sg_agent(vpc, vnode, "eks")
    try:
        app = cloud.group(vpc, "app")
        trunk = trunk_of(node)
        # EKS's resource controller: create the branch, associate it, annotate the pod
        branch = cloud.ec2.create_network_interface(SubnetId=subnet.id, Groups=[app])[
            "NetworkInterface"
        ]
        assoc = cloud.ec2.associate_trunk_interface(
            BranchInterfaceId=branch["NetworkInterfaceId"], TrunkInterfaceId=trunk, VlanId=7
        )["InterfaceAssociation"]
        annotation = json.dumps(
            [
                {
                    "eniId": branch["NetworkInterfaceId"],
                    "ifAddress": branch["MacAddress"],
                    "privateIp": branch["PrivateIpAddress"],
                    "vlanId": 7,
                    "subnetCidr": str(subnet.cidr),
                    "associationID": assoc["AssociationId"],
                }
            ]
        )
        before = ec2_calls(node, "CreateNetworkInterface")
        pod = node.new_pod("eks")
        r = add(node, pod, {"vpc.amazonaws.com/pod-eni": annotation})
        assert r.code == 0, r
        assert r.ip == branch["PrivateIpAddress"]
        assert ec2_calls(node, "CreateNetworkInterface") == before  # wired, nothing made
        link = node.netns.run("ip", "-d", "link", "show", "vlan.eth.7").stdout
        assert branch["MacAddress"].lower() in link and "alias podwire 802.1Q id 7" in link
        (row,) = [p for p in node.call("agent.pods") if p["branch"]]
        assert row["branch"] == {
            "eni": branch["NetworkInterfaceId"],
            "vlan": 7,
            "mode": "strict",
            "source": "eks",
        }
        assert 'podwire_sg_adds_total{source="eks"}' in node.ctl("metrics").stdout
        # an agent-made branch never takes VLAN 7
        mine = [node.new_pod("own") for _ in range(7)]
        for p in mine:
            assert add(node, p, groups(app)).code == 0
        vlans = {p["branch"]["vlan"] for p in node.call("agent.pods") if p["branch"]}
        assert vlans == set(range(1, 9))
        assert node.delete(pod, conf=conf(node)).code == 0
        time.sleep(3.0)  # past the cooldown: EKS's branch is still there, EKS deletes it
        found = cloud.ec2.describe_network_interfaces(
            NetworkInterfaceIds=[branch["NetworkInterfaceId"]]
        )["NetworkInterfaces"]
        assert found and found[0]["Status"] == "associated"
    finally:
        node.close()
