"""``make demo``: podwire on an emulated VPC, told step by step.

An EC2 API with IMDS and a VPC fabric run on this machine (cloud/emulator): a router and an
"internet" namespace, two m5.large nodes whose ENIs are real links. podwire-agent runs in each
node with the aws provider; pods are added through the installed ``podwire`` plugin exactly as
a container runtime calls it. Real packets then prove pod<->pod across nodes without NAT,
node<->pod, and pod->internet through SNAT to the node's address. Then security groups for
pods: a database VM whose group admits TCP only from group ``app``; on a node in strict mode and
on one in standard mode, a pod annotated with ``app`` (its own branch ENI on the node's trunk)
connects and a pod without times out. Everything is removed at the end; the machine's own
network namespace is never touched.

``python -m tests.demo --static`` runs the single-node demo of the static provider instead;
``python -m tests.demo --gke`` (``make demo-gke``) the GKE VPC-native story: two nodes whose pod
addresses are their alias IP ranges, read from the emulated GCE metadata server and routed
natively by the VPC router, SNAT as ip-masq-agent, and a range that shrinks under live pods.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from cloud.emulator import Vpc
from tests.frames import udp_from, vlan_of_next_frame
from tests.harness import CniResult, Node, aws_node, ping
from tests.netns import Netns

PODS_PER_NODE = 12
PORT = 7007
BOLD = "\033[1m" if sys.stdout.isatty() else ""
PLAIN = "\033[0m" if sys.stdout.isatty() else ""
STARTED = time.monotonic()


def step(text: str) -> None:
    print(f"\n{BOLD}==> [{time.monotonic() - STARTED:5.1f}s] {text}{PLAIN}", flush=True)


def show(label: str, ok: bool, detail: str = "") -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'} {label}{'  ' + detail if detail else ''}", flush=True)
    return ok


def echo_server(ns_name: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns_name, sys.executable, "-m", "tests.echo", "serve", str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def seen_by(pod: Netns, host: str) -> str:
    return pod.run(
        sys.executable, "-m", "tests.echo", "ask", host, str(PORT), timeout=20
    ).stdout.strip()


def add_pod(node: Node, pod: Netns, name: str) -> CniResult:
    """ADD as kubelet does: code 11 ("try again later") while an ENI is being attached."""
    waited = False
    while True:
        r = node.add(pod, args=f"K8S_POD_NAMESPACE=demo;K8S_POD_NAME={name}")
        if r.code == 0:
            return r
        if r.doc["code"] != 11:
            raise RuntimeError(f"ADD {name} failed: {r.doc}")
        if not waited:
            print(
                f"    {name}: no free address yet ({r.doc.get('details', '')}); the agent is "
                "attaching another ENI, retrying...",
                flush=True,
            )
            waited = True
        time.sleep(0.2)


def aws_demo() -> int:
    failures = 0
    servers: list[subprocess.Popen[str]] = []
    nodes: list[Node] = []
    step(
        "Bringing up an emulated VPC 10.0.0.0/16: EC2 API + IMDS (moto, patched), a router and an "
        "internet namespace"
    )
    with Vpc.start("10.0.0.0/16") as vpc:
        try:
            subnet = vpc.add_subnet("10.0.0.0/20")
            print(
                f"  EC2 API at {vpc.ec2_url}, subnet {subnet.id} {subnet.cidr}, "
                "internet at 203.0.113.10"
            )
            step(
                "Launching two m5.large nodes (3 ENIs x 10 IPs each) and starting podwire-agent on "
                "the aws provider in each"
            )
            for name in ("node-a", "node-b"):
                vnode = vpc.add_node("m5.large", subnet)
                node = aws_node(vpc, vnode, aws={"min_eni_age": 5.0}, tag=name)
                nodes.append(node)
                node.start()
                print(
                    f"  {name}: {vnode.instance_id}, primary ENI {vnode.eni_id}, address "
                    f"{vnode.primary_ip}, agent ready"
                )
            servers.append(echo_server(vpc.internet.name))

            step(
                f"Scheduling {PODS_PER_NODE} pods on each node (more than one ENI holds: watch the "
                "warm pool grow)"
            )
            pods: dict[str, list[tuple[Netns, str]]] = {}
            for i, node in enumerate(nodes):
                pods[node.netns.name] = []
                known = {e["eni"] for e in node.call("agent.enis")}
                print(
                    f"  node-{'ab'[i]}: starts with {len(known)} ENI; WARM_ENI_TARGET=1 keeps a "
                    "spare ENI's worth of free addresses"
                )
                for j in range(PODS_PER_NODE):
                    name = f"web-{'ab'[i]}{j}"
                    pod = node.new_pod("demo")
                    r = add_pod(node, pod, name)
                    pods[node.netns.name].append((pod, r.ip))
                    for e in node.call("agent.enis"):
                        if e["eni"] not in known:
                            known.add(e["eni"])
                            print(
                                f"    after {j + 1} pods: ENI {e['eni']} attached as "
                                f"eth{e['device']} "
                                f"(route table {e['table']}, {len(e['ips'])} IPs joined the pool)",
                                flush=True,
                            )
                    print(f"    {name}: {r.ip}", flush=True)
                print(f"  node-{'ab'[i]}: {PODS_PER_NODE} pods up on {len(known)} ENIs")

            for i, node in enumerate(nodes):
                step(f"node-{'ab'[i]}: agentctl status, agentctl pods, agentctl enis")
                print(node.ctl("status").stdout)
                print(node.ctl("pods").stdout)
                print(node.ctl("enis").stdout)

            step("Proving the datapath with real packets")
            (a_pod, a_ip), (b_pod, b_ip) = (
                pods[nodes[0].netns.name][-1],
                pods[nodes[1].netns.name][-1],
            )
            servers.append(echo_server(b_pod.name))
            seen = seen_by(a_pod, b_ip)
            failures += not show(
                f"pod {a_ip} on node-a -> pod {b_ip} on node-b: the other pod sees {seen}",
                seen == a_ip,
                "(its own address: no NAT inside the VPC)",
            )
            failures += not show(f"node-a -> its pod {a_ip}", ping(nodes[0].netns, a_ip))
            failures += not show(
                f"pod {a_ip} -> node-a {nodes[0].primary_ip}", ping(a_pod, nodes[0].primary_ip)
            )
            failures += not show(f"node-b -> pod {a_ip} on node-a", ping(nodes[1].netns, a_ip))
            seen = seen_by(a_pod, "203.0.113.10")
            failures += not show(
                f"pod {a_ip} -> internet 203.0.113.10: the internet sees {seen}",
                seen == nodes[0].primary_ip,
                "(SNAT to node-a's address)",
            )
            print(f"  node-a's SNAT: {nodes[0].ctl('snat').stdout.strip()}")

            step("Deleting every pod (CNI DEL through the plugin)")
            for i, node in enumerate(nodes):
                for pod, _ in pods[node.netns.name]:
                    failures += node.delete(pod).code != 0
                pool = node.ctl("status").stdout.splitlines()[4].split(":", 1)[1].strip()
                print(f"  node-{'ab'[i]}: {pool}")

            failures += security_groups_story(vpc, subnet, nodes)
        finally:
            step("Stopping the agents and the emulator; removing every namespace the demo made")
            for s in servers:
                s.kill()
                s.wait()
            for node in nodes:
                node.close()
    print(
        f"\n{'done' if not failures else f'{failures} check(s) FAILED'} in "
        f"{time.monotonic() - STARTED:.1f} s; the machine's own namespace was not touched"
    )
    return 1 if failures else 0


DB_PORT = 5432


def connect(pod: Netns, ip: str, port: int, timeout: float = 3.0) -> str | None:
    """One real TCP exchange: the address the server saw, or None when it never connected."""
    code = (
        "import socket\n"
        f"s=socket.create_connection(('{ip}',{port}),timeout={timeout})\n"
        "s.sendall(b'hello\\n'); print(s.makefile().readline().strip())\n"
    )
    done = pod.run(sys.executable, "-c", code, check=False, timeout=timeout + 15)
    return done.stdout.strip().split(":")[0] if done.returncode == 0 else None


def security_groups_story(vpc: Vpc, subnet: Any, nodes: list[Node]) -> int:
    """A database VM whose group admits TCP only from group ``app``: a pod annotated with
    ``app`` reaches it, a pod without does not, in strict and in standard mode."""
    import boto3

    failures = 0
    step(
        "Security groups for pods: a database VM whose group admits TCP 5432 only from the "
        "group 'app'"
    )
    ec2 = boto3.client("ec2", **vpc.client_kwargs())

    def group(name: str) -> str:
        made = ec2.create_security_group(GroupName=name, Description=name, VpcId=vpc.vpc_id)
        return str(made["GroupId"])

    app, db = group("app"), group("db")
    ec2.authorize_security_group_ingress(
        GroupId=db,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": DB_PORT,
                "ToPort": DB_PORT,
                "UserIdGroupPairs": [{"GroupId": app}],
            }
        ],
    )
    vm = vpc.add_instance(subnet, security_groups=[db])
    vm.serve(DB_PORT)
    print(f"  groups: app {app}, db {db} (inbound tcp/{DB_PORT} from app only)")
    print(f"  database VM {vm.instance_id} at {vm.primary_ip}:{DB_PORT}, group db")
    for mode in ("strict", "standard"):
        name = f"node-{mode[:3]}"
        step(
            f"{name}: an m5.large with [security_groups] enabled, enforcing_mode = {mode}: the "
            "agent attaches a trunk ENI"
        )
        vnode = vpc.add_node("m5.large", subnet)
        section = {"enabled": True, "enforcing_mode": mode, "branch_cooldown": 10.0}
        node = aws_node(vpc, vnode, security_groups=section, tag=name)
        nodes.append(node)
        node.start()
        print("  " + node.ctl("status").stdout.splitlines()[-1])
        pods: dict[str, tuple[Netns, str]] = {}
        for pod_name, wanted in (
            ("orders", {"podwire.io/security-groups": app}),
            ("batch", {}),
        ):
            pod = node.new_pod("sg")
            c = node.plugin_conf(runtimeConfig={"io.kubernetes.cri.pod-annotations": wanted})
            while True:
                r = node.add(pod, conf=c, args=f"K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod_name}")
                if r.code == 0 or r.doc["code"] != 11:
                    break
                time.sleep(0.2)
            failures += not show(
                f"ADD shop/{pod_name}"
                + (f" (annotation podwire.io/security-groups: {app})" if wanted else ""),
                r.code == 0,
                r.ip if r.code == 0 else str(r.doc),
            )
            pods[pod_name] = (pod, r.ip)
        print(node.ctl("branches").stdout)
        print(node.ctl("pods").stdout)
        rules = node.netns.run("ip", "rule").stdout
        print("  the node's ip rule:\n" + "".join(f"    {line}\n" for line in rules.splitlines()))
        (orders, orders_ip), (batch, _) = pods["orders"], pods["batch"]
        seen = connect(orders, vm.primary_ip, DB_PORT)
        failures += not show(
            f"shop/orders ({orders_ip}, group app) -> database {vm.primary_ip}:{DB_PORT}: "
            f"connected, the database sees {seen}",
            seen == orders_ip,
        )
        sg = node.call("agent.status")["security_groups"]
        vlan = next(p["branch"]["vlan"] for p in node.call("agent.pods") if p["branch"])
        send = udp_from(orders, vm.primary_ip)
        tag = vnode.call(lambda: vlan_of_next_frame(sg["trunk"]["link"], send))  # noqa: B023
        failures += not show(
            f"shop/orders' frames leave the trunk's link {sg['trunk']['link']} 802.1Q-tagged "
            f"with VLAN {tag} ({sg['link_detail']})",
            tag == vlan,
        )
        drops = vpc.drops(vm.eni_id).inbound
        started = time.monotonic()
        seen = connect(batch, vm.primary_ip, DB_PORT)
        failures += not show(
            f"shop/batch (no groups of its own: the node's) -> database: "
            f"{'connected?!' if seen else 'timed out'} after {time.monotonic() - started:.1f}s",
            seen is None and vpc.drops(vm.eni_id).inbound > drops,
            f"(the VPC dropped it silently: {vpc.drops(vm.eni_id).inbound - drops} packets)",
        )
        for pod, _ in pods.values():
            failures += node.delete(pod).code != 0
        print("  after DEL, the branch cools down before it is deleted:")
        print(node.ctl("branches").stdout)
        node.close()
        nodes.remove(node)
    return failures


def static_demo() -> int:
    step(
        "A namespace plays the node; podwire-agent runs in it with the static provider "
        "(10.77.0.0/24)"
    )
    node = Node(cidrs=("10.77.0.0/24",), tag="demo")
    failures = 0
    try:
        node.start()
        step("Creating 10 pod namespaces and running CNI ADD for each through the plugin")
        pods = [node.new_pod("demopod") for _ in range(10)]
        ips = [
            node.add(p, args=f"K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-{i}").ip
            for i, p in enumerate(pods)
        ]
        print(node.ctl("pods").stdout)
        step("Pinging pod->pod, node->pod and pod->node")
        for i, pod in enumerate(pods):
            failures += not show(f"web-{i} -> web-{(i + 1) % 10}", ping(pod, ips[(i + 1) % 10]))
            failures += not show(f"node -> web-{i}", ping(node.netns, ips[i]))
        step("Running CNI DEL for every pod")
        failures += sum(node.delete(p).code != 0 for p in pods)
    finally:
        step("Stopping the agent and removing every namespace the demo made")
        node.close()
    return 1 if failures else 0


def gke_demo() -> int:
    from tests.gke import INTERNET, ON_PREM, PARTNER, PARTNER_CIDR, add_outside_hosts, gke_agent

    failures = 0
    servers: list[subprocess.Popen[str]] = []
    nodes: list[Node] = []
    ranges = ("10.4.1.0/24", "10.4.2.0/24")
    step(
        "Bringing up an emulated VPC 10.0.0.0/16 with a GCE metadata server per node, a router "
        "and an internet namespace"
    )
    with Vpc.start("10.0.0.0/16") as vpc:
        try:
            subnet = vpc.add_subnet("10.0.0.0/20")
            add_outside_hosts(vpc)
            print(
                f"  subnet {subnet.cidr}; behind the router: the internet {INTERNET}, an "
                f"on-premises host {ON_PREM} (RFC 1918), a partner {PARTNER} (public)"
            )
            step(
                "Launching two GKE-style nodes: each NIC has an alias IP range from the secondary "
                "range 10.4.0.0/14, which the VPC routes to it natively (no custom routes)"
            )
            vnodes = []
            for name, cidr in zip(("node-a", "node-b"), ranges, strict=True):
                vnode = vpc.add_node("m5.large", subnet, pod_cidr=cidr)
                vnodes.append(vnode)
                nodes.append(gke_agent(vnode, name))
                print(
                    f"  {name}: {vnode.primary_ip}, alias range {cidr}; podwire-agent (gce "
                    f"provider, nonMasqueradeCIDRs += {PARTNER_CIDR}) read it from "
                    f"{vnode.gce_metadata_url}/instance/network-interfaces/0/ip-aliases/0"
                )
            servers.append(echo_server(vpc.internet.name))

            step(f"Scheduling {PODS_PER_NODE} pods on each node")
            pods: list[list[tuple[Netns, str]]] = []
            for i, node in enumerate(nodes):
                pods.append([])
                for j in range(PODS_PER_NODE):
                    pod = node.new_pod("demo")
                    r = add_pod(node, pod, f"web-{'ab'[i]}{j}")
                    pods[i].append((pod, r.ip))
                print(f"  node-{'ab'[i]}: " + ", ".join(ip for _, ip in pods[i]))
            for i, node in enumerate(nodes):
                step(f"node-{'ab'[i]}: agentctl status, agentctl pool")
                print(node.ctl("status").stdout)
                print(node.ctl("pool").stdout)

            step("Proving the datapath with real packets")
            (a_pod, a_ip), (b_pod, b_ip) = pods[0][-1], pods[1][-1]
            servers.append(echo_server(b_pod.name))
            node_a = nodes[0]
            checks = [
                (
                    f"pod {a_ip} on node-a -> pod {b_ip} on node-b",
                    b_ip,
                    a_ip,
                    "(no NAT in the VPC)",
                ),
                (f"pod {a_ip} -> internet {INTERNET}", INTERNET, node_a.primary_ip, "(SNAT)"),
                (f"pod {a_ip} -> on-premises {ON_PREM}", ON_PREM, a_ip, "(RFC 1918: no SNAT)"),
                (f"pod {a_ip} -> partner {PARTNER}", PARTNER, a_ip, "(nonMasqueradeCIDRs)"),
            ]
            for label, host, want, why in checks:
                seen = seen_by(a_pod, host)
                failures += not show(f"{label}: it sees {seen}", seen == want, why)
            failures += not show(f"node-a -> its pod {a_ip}", ping(node_a.netns, a_ip))
            failures += not show(
                f"pod {a_ip} -> node-a {node_a.primary_ip}", ping(a_pod, node_a.primary_ip)
            )
            failures += not show(f"node-b -> pod {a_ip} on node-a", ping(nodes[1].netns, a_ip))

            step(
                "GCE shrinks node-a's alias range to 10.4.1.128/25 while its pods hold addresses "
                "in the lower half (wait_for_change: the agent follows at once)"
            )
            vpc.set_alias_ranges(vnodes[0], ["10.4.1.128/25"])
            deadline = time.monotonic() + 60
            while node_a.call("agent.pool")["ranges"]["ranges"] != ["10.4.1.128/25"]:
                if time.monotonic() > deadline:
                    failures += not show("node-a follows the new range", False)
                    break
                time.sleep(0.1)
            print(node_a.ctl("pool").stdout)
            for line in node_a.ctl("events").stdout.splitlines():
                if "pool.ranges_changed" in line:
                    print(f"  agentctl events: {line}")
            failures += not show(
                f"pod {a_ip}, withdrawn, still reaches node-a", ping(a_pod, node_a.primary_ip)
            )

            step("Deleting every pod (CNI DEL through the plugin)")
            for i, node in enumerate(nodes):
                for pod, _ in pods[i]:
                    failures += node.delete(pod).code != 0
                pool = node.ctl("status").stdout.splitlines()[4].split(":", 1)[1].strip()
                print(f"  node-{'ab'[i]}: {pool}")
        finally:
            step("Stopping the agents and the emulator; removing every namespace the demo made")
            for s in servers:
                s.kill()
                s.wait()
            for node in nodes:
                node.close()
    print(
        f"\n{'done' if not failures else f'{failures} check(s) FAILED'} in "
        f"{time.monotonic() - STARTED:.1f} s; the machine's own namespace was not touched"
    )
    return 1 if failures else 0


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    if "--gke" in sys.argv:
        return gke_demo()
    return static_demo() if "--static" in sys.argv else aws_demo()


if __name__ == "__main__":
    raise SystemExit(main())
