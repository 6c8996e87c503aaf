"""``make demo``: podwire on an emulated VPC, told step by step.

An EC2 API with IMDS and a VPC fabric run on this machine (cloud/emulator): a router and an
"internet" namespace, two m5.large nodes whose ENIs are real links. podwire-agent runs in each
node with the aws provider; pods are added through the installed ``podwire`` plugin exactly as
a container runtime calls it. Real packets then prove pod<->pod across nodes without NAT,
node<->pod, and pod->internet through SNAT to the node's address. Everything is removed at the
end; the machine's own network namespace is never touched.

``python -m tests.demo --static`` runs the single-node demo of the static provider instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from cloud.emulator import Vpc
from tests.harness import CniResult, Node, ping
from tests.netns import Netns

PODS_PER_NODE = 12
PORT = 7007
CREDS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo"}
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
                aws: dict[str, Any] = {
                    "imds_url": vnode.imds_url,
                    "ec2_endpoint": vnode.ec2_url,
                    "region": vpc.region,
                    "min_eni_age": 5.0,
                }
                node = Node(
                    netns=vnode.netns, primary_ip=vnode.primary_ip, aws=aws, env=CREDS, tag=name
                )
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


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    return static_demo() if "--static" in sys.argv else aws_demo()


if __name__ == "__main__":
    raise SystemExit(main())
