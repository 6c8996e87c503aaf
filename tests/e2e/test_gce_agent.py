"""The agent with the gce provider on two GKE-style nodes of the emulated VPC: pod addresses from
the nodes' alias IP ranges (read from the emulated GCE metadata server, routed natively by the
VPC router), real traffic between pods, nodes, an RFC 1918 network outside the VPC and the
internet, and the ranges changing under the running agents."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from cloud.emulator import Vpc
from cloud.emulator.fabric import METADATA_IP
from cloud.emulator.gce_metadata import GceMetadataApp
from cloud.emulator.imds import by_source_address
from cloud.emulator.server import serve
from tests.gke import INTERNET, ON_PREM, PARTNER, add_outside_hosts, gke_agent
from tests.harness import CniResult, Node, ping
from tests.netns import Netns

pytestmark = pytest.mark.root
PORT = 7007
ROOT = str(__import__("pathlib").Path(__file__).resolve().parents[2])


def echo_server(ns_name: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns_name, sys.executable, "-m", "tests.echo", "serve", str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def seen_by(pod: Netns, host: str) -> str:
    """The source address ``host``'s echo service saw for a datagram from ``pod``."""
    out = pod.run(sys.executable, "-m", "tests.echo", "ask", host, str(PORT), timeout=20)
    return out.stdout.strip()


def until(fn: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if ok(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def in_range(result: CniResult, cidr: str) -> bool:
    return result.code == 0 and IPv4Address(result.ip) in IPv4Network(cidr)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    servers: list[subprocess.Popen[str]] = []
    nodes: list[Node] = []
    with Vpc.start("10.0.0.0/16") as vpc:
        try:
            subnet = vpc.add_subnet("10.0.0.0/20")
            vnodes = [
                vpc.add_node("m5.large", subnet, pod_cidr=cidr)
                for cidr in ("10.4.1.0/24", "10.4.2.0/24")  # from a "secondary range" 10.4.0.0/14
            ]
            add_outside_hosts(vpc)
            for i, vnode in enumerate(vnodes):
                nodes.append(gke_agent(vnode, f"gke{i}"))
            servers.append(echo_server(vpc.internet.name))
            pod_a, pod_b = nodes[0].new_pod("ga"), nodes[1].new_pod("gb")
            ra, rb = nodes[0].add(pod_a), nodes[1].add(pod_b)
            assert ra.code == 0 and rb.code == 0, (ra, rb)
            servers.append(echo_server(pod_b.name))
            yield {
                "vpc": vpc,
                "vnodes": vnodes,
                "nodes": nodes,
                "pod_a": pod_a,
                "ip_a": ra.ip,
                "pod_b": pod_b,
                "ip_b": rb.ip,
            }
        finally:
            for s in servers:
                s.kill()
                s.wait()
            for n in nodes:
                n.close()
        assert vpc.state.fabric_errors == []


def test_pods_get_addresses_of_their_nodes_alias_range(cluster: dict[str, Any]) -> None:
    assert IPv4Address(cluster["ip_a"]) in IPv4Network("10.4.1.0/24")
    assert IPv4Address(cluster["ip_b"]) in IPv4Network("10.4.2.0/24")
    node = cluster["nodes"][0]
    status = node.call("agent.status")
    assert status["provider"] == "gce" and status["ready"]
    pool = node.call("agent.pool")
    assert [(o["owner"], o["total"]) for o in pool["owners"]] == [("10.4.1.0/24", 254)]
    assert pool["ranges"]["ranges"] == ["10.4.1.0/24"]
    assert pool["provider_status"]["ip"] == cluster["vnodes"][0].primary_ip
    assert "alias ranges: 10.4.1.0/24" in node.ctl("pool").stdout


def test_pod_to_pod_across_nodes_without_nat_and_node_to_pod(cluster: dict[str, Any]) -> None:
    a, b = cluster["nodes"]
    assert seen_by(cluster["pod_a"], cluster["ip_b"]) == cluster["ip_a"]
    assert ping(a.netns, cluster["ip_a"]) and ping(cluster["pod_a"], a.primary_ip)
    assert ping(b.netns, cluster["ip_a"])  # the VPC routes the alias range to node a


def test_snat_as_ip_masq_agent(cluster: dict[str, Any]) -> None:
    pod_a, node_a = cluster["pod_a"], cluster["nodes"][0]
    assert seen_by(pod_a, INTERNET) == node_a.primary_ip  # masqueraded to the node
    assert seen_by(pod_a, ON_PREM) == cluster["ip_a"]  # RFC 1918: keeps the pod address
    assert seen_by(pod_a, PARTNER) == cluster["ip_a"]  # listed in nonMasqueradeCIDRs
    assert node_a.call("agent.snat")["backend"]


def test_a_range_that_shrinks_withdraws_in_use_addresses_for_good(
    cluster: dict[str, Any],
) -> None:
    vpc, va = cluster["vpc"], cluster["vnodes"][0]
    node = cluster["nodes"][0]
    pods = [node.new_pod("gs") for _ in range(3)]
    held = [node.add(p) for p in pods]
    assert all(in_range(r, "10.4.1.0/25") for r in held), held
    in_use = {cluster["ip_a"], *(r.ip for r in held)}
    # the node keeps only the upper half: every address in use is in the lower one
    vpc.set_alias_ranges(va, ["10.4.1.128/28"])
    pool = until(
        lambda: node.call("agent.pool"), lambda p: p["ranges"]["ranges"] == ["10.4.1.128/28"]
    )
    # .129-.142: .128 (now a network address) and .143 (a broadcast one) left with the rest
    assert [(o["owner"], o["total"]) for o in pool["owners"]] == [("10.4.1.128/28", 14)]
    assert {w["ip"] for w in pool["withdrawn_in_use"]} == in_use
    shown = node.ctl("pool").stdout
    assert "withdrawn, still in use until their pods go (never handed out again): 4" in shown
    assert f"{cluster['ip_a']}  podwire/" in shown
    assert "4 withdrawn but in use" in node.ctl("status").stdout
    metrics = node.netns.run("curl", "-s", f"{node.health_url}/metrics").stdout
    assert "podwire_pool_withdrawn_in_use 4.0" in metrics
    events = [e["kind"] for e in node.call("agent.events")]
    assert "pool.ranges_changed" in events and events.count("pool.withdrawn_in_use") == 4
    # the pods go; their addresses never come back, even with no cooldown at all
    for p in pods:
        assert node.delete(p).code == 0
    assert len(node.call("agent.pool")["withdrawn_in_use"]) == 1  # pod_a still holds its own
    fresh = [node.new_pod("gf") for _ in range(14)]
    got = [node.add(p) for p in fresh]
    assert all(in_range(r, "10.4.1.128/28") for r in got), [r for r in got if r.code][:3]
    assert sorted(int(IPv4Address(r.ip)) & 0xFF for r in got) == list(range(129, 143))
    assert not {r.ip for r in got} & in_use
    one_more = node.add(node.new_pod("gx"))
    assert one_more.code == 1 and one_more.doc["code"] == 11  # the range is full
    # a pod of the new range is reachable across the VPC (the router follows the change)
    assert ping(cluster["pod_b"], got[0].ip)
    for p in fresh:
        assert node.delete(p).code == 0
    # the range grows back: the lower half joins, pod_a's address stays assigned to it
    vpc.set_alias_ranges(va, ["10.4.1.0/24"])
    pool = until(
        lambda: node.call("agent.pool"), lambda p: p["ranges"]["ranges"] == ["10.4.1.0/24"]
    )
    assert pool["withdrawn_in_use"] == []
    assert [(o["owner"], o["total"], o["assigned"]) for o in pool["owners"]] == [
        ("10.4.1.0/24", 254, 1)
    ]
    assert seen_by(cluster["pod_a"], cluster["ip_b"]) == cluster["ip_a"]


def test_added_range_serves_pods_routed_across_the_vpc(cluster: dict[str, Any]) -> None:
    vpc, vb = cluster["vpc"], cluster["vnodes"][1]
    node = cluster["nodes"][1]
    vpc.set_alias_ranges(vb, ["10.4.2.0/30", "10.4.9.0/29"])
    until(lambda: node.call("agent.pool")["ranges"]["ranges"], lambda r: len(r) == 2)
    pods = [node.new_pod("gr") for _ in range(2)]
    got = [node.add(p) for p in pods]
    # 10.4.2.1 is pod_b's, 10.4.2.2 has been free longest, then the added range
    assert [r.ip for r in got] == ["10.4.2.2", "10.4.9.1"], got
    assert ping(cluster["pod_a"], got[1].ip)  # the VPC routes the added range to node b
    assert seen_by(pods[1], INTERNET) == node.primary_ip
    snat = node.netns.run("nft", "list", "set", "ip", "podwire", "pod_cidrs").stdout
    assert "10.4.9.0/29" in snat
    for p in pods:
        assert node.delete(p).code == 0
    vpc.set_alias_ranges(vb, ["10.4.2.0/24"])
    until(lambda: node.call("agent.pool")["ranges"]["ranges"], lambda r: r == ["10.4.2.0/24"])


def test_metadata_unreachable_at_start_alive_not_ready_then_ready(
    cluster: dict[str, Any],
) -> None:
    vpc = cluster["vpc"]
    vnode = vpc.add_node("m5.large", vpc.subnets[0], pod_cidr="10.4.3.0/24")
    # nothing listens on port 81 in the router yet: connection refused
    url = f"http://{METADATA_IP}:81/computeMetadata/v1"
    node = gke_agent(vnode, "gkedown", start=False, metadata_url=url)
    server = None
    try:
        node.start(wait=False)

        def probe(path: str) -> tuple[str, str]:
            base = until(lambda: _health_url(node), lambda u: u is not None, timeout=30)
            out = node.netns.run(
                "curl", "-s", "-w", "\n%{http_code}", f"{base}{path}", check=False
            ).stdout
            body, _, code = out.rpartition("\n")
            return code, body

        # the first restore attempt fails: alive, retrying with backoff, not ready
        assert until(lambda: "CloudUnavailable" in node.log(), bool, timeout=60)
        code, body = probe("/readyz")
        assert code == "503" and "provider" in json.loads(body)["failing"]
        assert "CloudUnavailable" in json.loads(body)["conditions"]["provider"]["reason"]
        assert probe("/healthz")[0] == "200"
        app = GceMetadataApp(vpc.gce_metadata, by_source_address(vpc.state))
        server = serve(app, str(METADATA_IP), 81, vpc.router.path)
        code, _ = until(lambda: probe("/readyz"), lambda r: r[0] == "200", timeout=90)
        assert code == "200"
        pod = node.new_pod("gd")
        assert in_range(node.add(pod), "10.4.3.0/24")
    finally:
        node.close()
        if server is not None:
            server.stop()
        vpc.remove_node(vnode)


def _health_url(node: Node) -> str | None:
    try:
        return node.health_url
    except RuntimeError:
        return None
