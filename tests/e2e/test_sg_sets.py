"""Security groups for pods in eni mode on the emulated VPC: pods asking for the same set of
groups share a secondary ENI made with exactly that set (CreateNetworkInterface, attach, no
trunk); the VPC router judges their real packets by it. The agent runs as a process with the
aws provider and the real plugin.

A denied packet is dropped silently, so a denial is asserted as a connect that does not
complete AND a drop counted by the router for the receiving ENI."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cloud.emulator import Vpc
from cloud.emulator.api import Node as VpcNode
from tests.harness import Node, aws_node

from .test_sg_pods import FAST, add, conf, ec2_calls, groups, until
from .test_sg_traffic import DB_PORT, INTERNET, tcp
from .test_sg_traffic import Env as TrafficEnv

pytestmark = pytest.mark.root

TAG_INSTANCE = "node.k8s.amazonaws.com/instance_id"
TAG_GROUPS = "podwire.io/security-groups"


def eni_agent(vpc: Vpc, vnode: VpcNode, tag: str, **sg: Any) -> Node:
    """An agent in eni mode: sets of groups on ENIs of their own, short timers."""
    section = {
        "enabled": True,
        "mode": "eni",
        "set_cooldown": 2.0,
        "shared_reserve": 0,
        "branch_wait": 15.0,
        **sg,
    }
    node = aws_node(
        vpc,
        vnode,
        aws={**FAST, "reconcile_interval": 2.0},
        security_groups=section,
        cooldown=1.0,
        tag=tag,
    )
    node.start()
    return node


class Env(TrafficEnv):
    """test_sg_traffic's VPC (groups app, other, db; a database admitting app), and the ENIs
    the agent made for sets."""

    def set_enis(self, vnode: VpcNode) -> list[dict[str, Any]]:
        """ENIs the agent made for sets of groups, wherever they are (attached or not)."""
        found = self.ec2.describe_network_interfaces(
            Filters=[
                {"Name": f"tag:{TAG_INSTANCE}", "Values": [vnode.instance_id]},
                {"Name": "tag-key", "Values": [TAG_GROUPS]},
            ]
        )["NetworkInterfaces"]
        return list(found)


@pytest.fixture
def env() -> Iterator[Env]:
    with Vpc.start("10.0.0.0/16") as vpc:
        yield Env(vpc)


def pod_of(node: Node, ip: str) -> dict[str, Any]:
    return next(p for p in node.call("agent.pods") if p["ip"] == ip)


def test_pods_of_a_set_reach_what_admits_the_set_and_others_are_refused_across_nodes(
    env: Env,
) -> None:
    one = env.vpc.add_node("m5.large", env.subnet)
    two = env.vpc.add_node("m5.large", env.subnet)
    node1, node2 = eni_agent(env.vpc, one, "eni1"), eni_agent(env.vpc, two, "eni2")
    try:
        a, b, t = (node1.new_pod(n) for n in ("sa", "sb", "st"))
        c, plain = node2.new_pod("sc"), node2.new_pod("pl")
        a_ip = add(node1, a, groups(env.app)).ip
        b_ip = add(node1, b, groups(env.app)).ip
        t_ip = add(node1, t, groups(env.other)).ip
        c_ip = add(node2, c, groups(env.app)).ip
        plain_ip = add(node2, plain, {}).ip
        # a and b share one ENI made with exactly {app}; t is on another; c on node 2's own
        sets = {s["set"]: s for s in node1.call("agent.sets")["rows"]}
        (app_eni,) = sets[env.app]["enis"]
        assert pod_of(node1, a_ip)["owner"] == pod_of(node1, b_ip)["owner"] == app_eni["eni"]
        assert sets[env.app]["assigned"] == 2 and len(sets[env.app]["pods"]) == 2
        described = env.ec2.describe_network_interfaces(NetworkInterfaceIds=[app_eni["eni"]])
        eni = described["NetworkInterfaces"][0]
        assert [g["GroupId"] for g in eni["Groups"]] == [env.app]
        assert {t["Key"]: t["Value"] for t in eni["TagSet"]}[TAG_GROUPS] == env.app
        assert eni["Attachment"]["InstanceId"] == one.instance_id
        assert pod_of(node1, t_ip)["owner"] == sets[env.other]["enis"][0]["eni"]
        # the pod's traffic leaves by its set's ENI: its table, rules 512/1536
        rules = node1.netns.run("ip", "rule").stdout
        assert (
            f"from {a_ip} lookup {app_eni['table']}" in rules and f"to {a_ip} lookup main" in rules
        )
        # the database admits {app} only: a, b (node 1) and c (node 2) reach it, unNATed
        assert tcp(a, env.db.primary_ip, DB_PORT) == a_ip
        assert tcp(b, env.db.primary_ip, DB_PORT) == b_ip
        assert tcp(c, env.db.primary_ip, DB_PORT) == c_ip
        before = env.vpc.drops(env.db.eni_id).inbound
        assert tcp(t, env.db.primary_ip, DB_PORT) is None  # another set
        assert tcp(plain, env.db.primary_ip, DB_PORT) is None  # the node's groups
        assert env.vpc.drops(env.db.eni_id).inbound >= before + 2
        assert plain_ip not in (a_ip, b_ip, c_ip, t_ip)
        # leaving the VPC: SNATed to the node, by the primary ENI (its groups then apply)
        proc = env.vpc.internet.popen(
            [sys.executable, "-m", "tests.echo", "serve", "7007"], stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            assert tcp(a, INTERNET, 7007, timeout=5.0) == one.primary_ip
        finally:
            proc.kill()
            proc.wait()
        status = node1.ctl("status").stdout
        assert "eni mode" in status and "stays on the node" in status
        table = node1.ctl("sets")
        assert table.returncode == 0 and app_eni["eni"] in table.stdout
    finally:
        node1.close()
        node2.close()


def test_the_second_pod_of_a_set_starts_with_no_ec2_call(env: Env) -> None:
    vnode = env.vpc.add_node("m5.large", env.subnet)
    node = eni_agent(env.vpc, vnode, "warm")
    try:
        first, second = node.new_pod("w1"), node.new_pod("w2")
        assert add(node, first, groups(env.app)).code == 0
        # the margin: a free address of the set, on its ENI in EC2 already
        row = until(
            lambda: node.call("agent.sets")["rows"][0],
            lambda r: r["free"] >= 1 and not r["waiting"],
        )
        (eni_id,) = [e["eni"] for e in row["enis"]]
        held = {
            a["PrivateIpAddress"]
            for a in env.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])[
                "NetworkInterfaces"
            ][0]["PrivateIpAddresses"]
        }
        made = ec2_calls(node, "CreateNetworkInterface")
        r = node.add(second, conf=conf(node, **groups(env.app)))  # once: no try-again loop
        assert r.code == 0, r
        assert r.ip in held  # its address was on the set's ENI before its ADD began
        assert pod_of(node, r.ip)["owner"] == eni_id
        assert ec2_calls(node, "CreateNetworkInterface") == made
        # behind it the refiller puts the margin back on the same ENI
        until(lambda: node.call("agent.sets")["rows"][0], lambda r: r["free"] >= 1)
        assert ec2_calls(node, "CreateNetworkInterface") == made
    finally:
        node.close()


def test_the_last_pod_of_a_set_leaves_and_its_eni_goes_after_the_cooldown(env: Env) -> None:
    vnode = env.vpc.add_node("m5.large", env.subnet)
    node = eni_agent(env.vpc, vnode, "last", set_cooldown=3.0)
    try:
        pod = node.new_pod("last")
        assert add(node, pod, groups(env.app)).code == 0
        (eni,) = env.set_enis(vnode)
        assert node.delete(pod, conf=conf(node)).code == 0
        left = time.monotonic()
        gone = until(lambda: env.set_enis(vnode), lambda enis: enis == [], timeout=90)
        assert gone == []
        assert time.monotonic() - left >= 3.0  # never before the set cooldown
        assert until(lambda: node.call("agent.sets")["rows"], lambda rows: rows == []) == []
        links = node.netns.run("ip", "-o", "link").stdout
        assert eni["MacAddress"].lower() not in links.lower()  # detached from the node
    finally:
        node.close()


def test_no_eni_slot_left_for_a_new_set_is_code_11_then_it_recovers(env: Env) -> None:
    vnode = env.vpc.add_node("m5.large", env.subnet)  # 3 ENIs: the primary, 1 kept, 1 for sets
    node = eni_agent(env.vpc, vnode, "slots", shared_reserve=1, set_cooldown=1.0)
    try:
        app_pod, other_pod = node.new_pod("sl1"), node.new_pod("sl2")
        assert add(node, app_pod, groups(env.app)).code == 0
        r = node.add(other_pod, conf=conf(node, **groups(env.other)))
        assert r.code == 1 and r.doc["code"] == 11, r
        assert r.doc["msg"] == "no ENI for the pod's security groups"
        assert (
            "no ENI slot left for a new set of security groups: 3 ENI slots" in (r.doc["details"])
        )
        assert "security_groups.shared_reserve = 1" in r.doc["details"]
        metrics = node.ctl("metrics").stdout
        assert 'podwire_sg_refused_total{limit="eni_slots"} 1.0' in metrics
        assert env.other in node.ctl("sets").stdout  # refused, and why
        assert node.delete(app_pod, conf=conf(node)).code == 0
        # the set empties: its ENI goes, and the other set gets the slot (kubelet retries)
        r = add(node, other_pod, groups(env.other), timeout=120)
        assert r.code == 0, r
        (eni,) = env.set_enis(vnode)
        assert [g["GroupId"] for g in eni["Groups"]] == [env.other]
    finally:
        node.close()


def test_sigkill_during_the_creation_of_a_sets_eni_leaks_nothing(env: Env) -> None:
    vnode = env.vpc.add_node("m5.large", env.subnet)
    node = eni_agent(env.vpc, vnode, "kill")
    try:
        done = node.new_pod("kd")
        done_ip = add(node, done, groups(env.app)).ip
        env.vpc.faults.latency("AttachNetworkInterface", 3.0)
        pods = [node.new_pod("kl") for _ in range(3)]
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            futures = [ex.submit(node.add, p, conf=conf(node, **groups(env.other))) for p in pods]
            until(lambda: len(env.set_enis(vnode)), lambda n: n >= 2, timeout=60)
            node.kill()  # the set's ENI made, its attachment in flight
            for f in futures:
                f.result()
        env.vpc.faults.latency("AttachNetworkInterface", 0.0)
        node.start()
        ips = [add(node, p, groups(env.other)).ip for p in pods]
        live = node.call("agent.pods")
        assert {p["container_id"] for p in live} == {p.name for p in [done, *pods]}
        assert pod_of(node, done_ip)["container_id"] == done.name  # kept across the crash
        assert len({*ips, done_ip}) == 4  # no address handed out twice
        # every set ENI left is attached to the node and holds its pods' addresses: the one
        # whose creation was cut short was adopted (attached) or deleted (not attached)
        attached = until(
            lambda: env.set_enis(vnode),
            lambda enis: len(enis) == 2 and all(e.get("Attachment") for e in enis),
            timeout=90,
        )
        assert len(attached) == 2, attached
        owners = {p["ip"]: p["owner"] for p in live}
        for e in attached:
            held = {a["PrivateIpAddress"] for a in e["PrivateIpAddresses"]}
            for ip, owner in owners.items():
                assert (ip in held) == (owner == e["NetworkInterfaceId"])
        for p in pods:
            assert tcp(p, env.db.primary_ip, DB_PORT) is None  # {other}: still refused
        assert tcp(done, env.db.primary_ip, DB_PORT) == done_ip
    finally:
        node.close()
