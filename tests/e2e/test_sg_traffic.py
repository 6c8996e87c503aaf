"""Security groups for pods decide real packets on the emulated VPC: the router enforces every
ENI's groups (branches included) statefully; the agent runs as a process with the real plugin.

This kernel has no 802.1Q: the agent makes its branch links as macvlan and the VPC carries
branches untagged, told apart by MAC (``Vpc.start(branch_frames="mac")``). A denied packet is
dropped silently, so a denial is asserted as a connect that does not complete AND a drop
counted by the router for the receiving ENI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from cloud.emulator import Vpc
from tests.netns import Netns

from .test_sg_pods import add, conf, groups, sg_agent

pytestmark = pytest.mark.root

DB_PORT = 5432
POD_PORT = 7000
INTERNET = "203.0.113.10"


class Env:
    def __init__(self, vpc: Vpc) -> None:
        self.vpc = vpc
        self.ec2 = boto3.client("ec2", **vpc.client_kwargs())
        self.subnet = vpc.add_subnet("10.0.1.0/24")
        self.app = self.group("app")
        self.other = self.group("other")
        self.db_group = self.group("db")
        self.allow(self.db_group, DB_PORT, self.app)  # the database admits TCP only from app
        self.db = vpc.add_instance(self.subnet, security_groups=[self.db_group])
        self.db.serve(DB_PORT)

    def group(self, name: str) -> str:
        return str(
            self.ec2.create_security_group(GroupName=name, Description=name, VpcId=self.vpc.vpc_id)[
                "GroupId"
            ]
        )

    def allow(self, group: str, port: int, source: str) -> None:
        self.ec2.authorize_security_group_ingress(
            GroupId=group,
            IpPermissions=[
                {
                    "IpProtocol": "tcp",
                    "FromPort": port,
                    "ToPort": port,
                    "UserIdGroupPairs": [{"GroupId": source}],
                }
            ],
        )

    def default_group(self) -> str:
        found = self.ec2.describe_security_groups(
            Filters=[
                {"Name": "vpc-id", "Values": [self.vpc.vpc_id]},
                {"Name": "group-name", "Values": ["default"]},
            ]
        )["SecurityGroups"]
        return str(found[0]["GroupId"])


@pytest.fixture
def env() -> Iterator[Env]:
    with Vpc.start("10.0.0.0/16", branch_frames="mac") as vpc:
        yield Env(vpc)


def tcp(ns: Netns, ip: str, port: int, timeout: float = 3.0) -> str | None:
    """One TCP exchange from ``ns``: what the server said (the address it saw), or None when
    the connection did not complete."""
    code = (
        "import socket\n"
        f"s=socket.create_connection(('{ip}',{port}),timeout={timeout})\n"
        "s.sendall(b'hi\\n'); print(s.makefile().readline().strip())\n"
    )
    done = ns.run(sys.executable, "-c", code, check=False, timeout=timeout + 15)
    return done.stdout.strip().split(":")[0] if done.returncode == 0 else None


def serve(pod: Netns, port: int = POD_PORT) -> Any:
    proc = pod.popen(
        [sys.executable, "-m", "tests.echo", "serve", str(port)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc


def inbound_drops(env: Env, eni: str) -> int:
    return int(env.vpc.drops(eni).inbound)


@pytest.mark.parametrize("mode", ["strict", "standard"])
def test_a_pod_reaches_the_database_only_with_the_group_it_admits(env: Env, mode: str) -> None:
    vnode = env.vpc.add_node("m5.large", env.subnet)
    node = sg_agent(env.vpc, vnode, mode[:3], enforcing_mode=mode)
    try:
        app_pod, plain_pod, other_pod = (node.new_pod(t) for t in ("app", "plain", "oth"))
        app_ip = add(node, app_pod, groups(env.app)).ip
        add(node, plain_pod, {})
        add(node, other_pod, groups(env.other))
        assert tcp(app_pod, env.db.primary_ip, DB_PORT) == app_ip  # its own address: no NAT
        before = inbound_drops(env, env.db.eni_id)
        assert tcp(plain_pod, env.db.primary_ip, DB_PORT) is None  # the node's groups: denied
        assert tcp(other_pod, env.db.primary_ip, DB_PORT) is None  # another group: denied
        assert inbound_drops(env, env.db.eni_id) >= before + 2
    finally:
        node.close()


def test_strict_pods_on_one_node_meet_only_through_the_vpc_and_standard_ones_locally(
    env: Env,
) -> None:
    """Same-node pod<->pod: strict mode judges it by the groups (it crosses the VPC), standard
    mode keeps it on the node (the groups do not see it). Once "other" admits itself, strict
    pods meet too: it was the groups, not the datapath."""
    for mode in ("strict", "standard"):
        vnode = env.vpc.add_node("m5.large", env.subnet)
        node = sg_agent(env.vpc, vnode, mode[:3], enforcing_mode=mode)
        try:
            a, b = node.new_pod("a"), node.new_pod("b")
            a_ip = add(node, a, groups(env.other)).ip
            b_ip = add(node, b, groups(env.other)).ip  # "other" admits nothing inbound
            server = serve(b)
            try:
                b_branch = next(
                    p["branch"]["eni"] for p in node.call("agent.pods") if p["ip"] == b_ip
                )
                before = inbound_drops(env, b_branch)
                got = tcp(a, b_ip, POD_PORT)
                if mode == "strict":
                    assert got is None
                    assert inbound_drops(env, b_branch) > before  # b's groups refused it
                else:
                    assert got == a_ip
                    assert inbound_drops(env, b_branch) == before  # never seen by the VPC
            finally:
                server.kill()
                server.wait()
        finally:
            node.close()
    env.allow(env.other, POD_PORT, env.other)
    vnode = env.vpc.add_node("m5.large", env.subnet)
    node = sg_agent(env.vpc, vnode, "str2")
    try:
        a, b = node.new_pod("a"), node.new_pod("b")
        a_ip = add(node, a, groups(env.other)).ip
        b_ip = add(node, b, groups(env.other)).ip
        server = serve(b)
        try:
            assert tcp(a, b_ip, POD_PORT) == a_ip
        finally:
            server.kill()
            server.wait()
    finally:
        node.close()


def test_the_node_reaches_a_strict_pod_with_early_demux_on(env: Env) -> None:
    """kubelet's probes: TCP from the node's own address to a strict-mode pod (through the
    VPC, admitted by the pod's groups), with net.ipv4.tcp_early_demux left at 1."""
    env.allow(env.app, POD_PORT, env.default_group())  # the node's group may probe app pods
    vnode = env.vpc.add_node("m5.large", env.subnet)
    node = sg_agent(env.vpc, vnode, "probe")
    try:
        assert vnode.run("sysctl", "-n", "net.ipv4.tcp_early_demux").stdout.strip() == "1"
        pod = node.new_pod("probe")
        add(node, pod, groups(env.app))
        ip = node.call("agent.pods")[0]["ip"]
        server = serve(pod)
        try:
            assert tcp(node.netns, ip, POD_PORT) == vnode.primary_ip
            # an HTTP-style exchange too: several segments each way
            code = (
                "import socket\n"
                f"s=socket.create_connection(('{ip}',{POD_PORT}),timeout=5)\n"
                "f=s.makefile('rwb')\n"
                "for i in range(20):\n"
                "    f.write(b'GET /healthz %d\\n' % i); f.flush(); f.readline()\n"
                "print('ok')\n"
            )
            assert node.netns.run(sys.executable, "-c", code).stdout.strip() == "ok"
        finally:
            server.kill()
            server.wait()
    finally:
        node.close()


def test_strict_pods_are_never_snated_and_standard_ones_are(env: Env) -> None:
    proc = env.vpc.internet.popen(
        [sys.executable, "-m", "tests.echo", "serve", "7007"], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        for mode, snat in (("strict", False), ("standard", True)):
            vnode = env.vpc.add_node("m5.large", env.subnet)
            node = sg_agent(env.vpc, vnode, mode[:3], enforcing_mode=mode)
            try:
                pod = node.new_pod("net")
                ip = add(node, pod, groups(env.app)).ip
                seen = tcp(pod, INTERNET, 7007, timeout=5.0)
                assert seen == (vnode.primary_ip if snat else ip), (mode, seen)
            finally:
                node.close()
    finally:
        proc.kill()
        proc.wait()


def test_the_eks_annotation_pod_is_judged_by_that_branchs_groups(env: Env) -> None:
    vnode = env.vpc.add_node("m5.large", env.subnet)
    node = sg_agent(env.vpc, vnode, "eks", branches="agent")
    try:
        trunk = node.call("agent.status")["security_groups"]["trunk"]["eni_id"]
        results = {}
        for vlan, group in ((7, env.app), (8, env.other)):
            branch = env.ec2.create_network_interface(SubnetId=env.subnet.id, Groups=[group])[
                "NetworkInterface"
            ]
            env.ec2.associate_trunk_interface(
                BranchInterfaceId=branch["NetworkInterfaceId"], TrunkInterfaceId=trunk, VlanId=vlan
            )
            annotation = json.dumps(
                [
                    {
                        "eniId": branch["NetworkInterfaceId"],
                        "ifAddress": branch["MacAddress"],
                        "privateIp": branch["PrivateIpAddress"],
                        "vlanId": vlan,
                        "subnetCidr": str(env.subnet.cidr),
                    }
                ]
            )
            pod = node.new_pod(f"e{vlan}")
            assert add(node, pod, {"vpc.amazonaws.com/pod-eni": annotation}).code == 0
            results[vlan] = tcp(pod, env.db.primary_ip, DB_PORT)
        assert results[7] is not None and results[8] is None
        assert node.delete(pod, conf=conf(node)).code == 0
    finally:
        node.close()
