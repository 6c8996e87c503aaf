"""Security groups for pods decide real packets on the emulated VPC: the router enforces every
ENI's groups (branches included) statefully; the agent runs as a process with the real plugin.

The trunk's cable carries 802.1Q frames as on EC2 (this kernel has no VLAN devices: the
agent's ``vlan.eth.<vid>`` are veths tagged by eBPF, ``netlink.dot1q``), and the VPC takes a
branch's traffic by its VLAN id and MAC. A denied packet is dropped silently, so a denial is
asserted as a connect that does not complete AND a drop counted by the router for the
receiving ENI.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from cloud.emulator import Vpc
from cloud.emulator.dot1q.links import VlanLinks, kernel_has_vlan_devices
from tests.frames import udp_from, vlan_of_next_frame
from tests.netns import Netns

from .test_sg_pods import add, conf, groups, sg_agent, until

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
    with Vpc.start("10.0.0.0/16") as vpc:
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


def test_a_pods_frames_cross_the_trunk_tagged_with_its_branchs_vlan(env: Env) -> None:
    """EC2's wire format: what a pod with groups sends leaves the trunk's link 802.1Q-tagged
    with its branch's VLAN id (a packet capture on the node's side of the cable)."""
    vnode = env.vpc.add_node("m5.large", env.subnet)
    node = sg_agent(env.vpc, vnode, "tag")
    try:
        sg = node.call("agent.status")["security_groups"]
        kind = "vlan" if kernel_has_vlan_devices() else "ebpf"
        assert sg["link"] == kind
        assert f'podwire_branch_link_info{{kind="{kind}"}} 1.0' in node.ctl("metrics").stdout
        words = "802.1Q VLAN links" if kind == "vlan" else "802.1Q links by eBPF"
        assert words in node.ctl("status").stdout
        pods = [node.new_pod(f"t{i}") for i in range(2)]
        for pod in pods:
            add(node, pod, groups(env.app))
        for pod, row in zip(pods, node.call("agent.pods"), strict=True):
            send = udp_from(pod, env.db.primary_ip)
            seen = vnode.call(lambda: vlan_of_next_frame(sg["trunk"]["link"], send))  # noqa: B023
            assert seen == row["branch"]["vlan"]
        assert {r["branch"]["vlan"] for r in node.call("agent.pods")} == {1, 2}
    finally:
        node.close()


def tcp_from(ns: Netns, source: str, ip: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection from ``source`` (an address of ``ns``) completes."""
    code = (
        "import socket\n"
        f"socket.create_connection(('{ip}',{port}),timeout={timeout},"
        f"source_address=('{source}',0))\n"
    )
    return ns.run(sys.executable, "-c", code, check=False, timeout=timeout + 15).returncode == 0


def test_an_unassociated_vlan_from_the_node_is_dropped_counted_and_collected(env: Env) -> None:
    """A VLAN link no branch is associated with (what a crashed ADD leaves, made with the
    agent's own construction): the VPC drops its frames and counts them on the trunk; the
    agent's GC deletes the link and takes its VLAN out of the trunk's demultiplexer, and the
    pod on its own VLAN never notices."""
    vnode = env.vpc.add_node("m5.large", env.subnet)
    # the harness's [gc] table is open when extra_config starts: a short grace for leaks
    node = sg_agent(env.vpc, vnode, "stray", prelude="missing_grace = 1.0\n")
    try:
        sg = node.call("agent.status")["security_groups"]
        trunk, trunk_link = sg["trunk"]["eni_id"], sg["trunk"]["link"]
        pod = node.new_pod("own")
        ip = add(node, pod, groups(env.app)).ip
        assert tcp(pod, env.db.primary_ip, DB_PORT) == ip
        stray = "10.0.1.250"  # a spare address of the subnet, nobody's
        VlanLinks(vnode.namespace, trunk_link).add(99, "02:00:00:00:00:99")  # type: ignore[arg-type]
        node.netns.run("ip", "addr", "add", f"{stray}/32", "dev", "vlan.eth.99")
        gateway = str(env.subnet.gateway)
        node.netns.run(
            "ip", "route", "add", "default", "via", gateway, "dev", "vlan.eth.99", "onlink",
            "table", "199",
        )  # fmt: skip
        node.netns.run("ip", "rule", "add", "from", stray, "lookup", "199", "priority", "100")
        before = env.vpc.drops(trunk).frames
        assert not tcp_from(node.netns, stray, env.db.primary_ip, DB_PORT)
        assert env.vpc.drops(trunk).frames > before

        def demux() -> list[str]:
            """The VLANs the trunk's demultiplexer lets in (its program's name carries them)."""
            shown = node.netns.run("tc", "filter", "show", "dev", trunk_link, "ingress").stdout
            return re.findall(r"pw_dot1q_demux vlans (\S+) ", shown)

        assert demux() == ["1,99"]

        def collected() -> bool:
            node.ctl("gc")
            return "vlan.eth.99" not in node.netns.run("ip", "-o", "link").stdout

        assert until(collected, bool)
        assert demux() == ["1"]  # (a substring test once matched "99" in the program's id)
        assert tcp(pod, env.db.primary_ip, DB_PORT) == ip
    finally:
        node.close()


def test_a_removed_802_1q_program_is_put_back(env: Env) -> None:
    """Someone removes the programs of a pod's branch link and the trunk's demultiplexer
    (``tc qdisc del``): the agent sees it, checks its branch pods and puts them back."""
    if kernel_has_vlan_devices():
        pytest.skip("branch links are VLAN devices here: no programs to remove")
    vnode = env.vpc.add_node("m5.large", env.subnet)
    node = sg_agent(env.vpc, vnode, "rep")
    try:
        trunk_link = node.call("agent.status")["security_groups"]["trunk"]["link"]
        pod = node.new_pod("rep")
        ip = add(node, pod, groups(env.app)).ip
        node.netns.run("tc", "qdisc", "del", "dev", "vlan.eth.1", "clsact")
        node.netns.run("tc", "filter", "del", "dev", trunk_link, "ingress")

        def programs() -> str:
            return "".join(
                node.netns.run("tc", "filter", "show", "dev", dev, hook).stdout
                for dev, hook in (("vlan.eth.1", "egress"), (trunk_link, "ingress"))
            )

        got = until(programs, lambda out: "pw_dot1q_tag" in out and "pw_dot1q_demux" in out)
        assert "pw_dot1q_tag vlan 1" in got and "pw_dot1q_demux vlans 1" in got
        assert 'podwire_gc_repairs_total{kind="802.1Q program"}' in node.ctl("metrics").stdout
        assert tcp(pod, env.db.primary_ip, DB_PORT) == ip
    finally:
        node.close()
