"""Pods created through the API, run by the real kubelet on containerd, wired by podwire
(issue 12 item 2): addresses, traffic, probes, deletion, and an agent restart under load.
Every test runs on the static provider's node and on the aws provider's (emulated EC2) node."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from cloud.emulator.netns import call_in_netns
from tests.cri import wait_for
from tests.k8s.cluster import STATIC_POD_CIDR, Cluster, Worker
from tests.k8s.workloads import DEADLINE, ECHO_PORT, Namespace, answer, pod_url, server_pod

pytestmark = [pytest.mark.root, pytest.mark.slow]


def ip_of(pod: Any) -> str:
    return str(pod["status"]["podIP"])


def test_pods_get_their_addresses_from_podwire(ns: Namespace, worker: Worker) -> None:
    pods = [ns.run(server_pod(f"web-{i}", node=worker.name), on_fail=worker.logs) for i in (1, 2)]
    rows = worker.pods()
    for pod in pods:
        row = rows[(ns.name, pod["metadata"]["name"])]
        assert pod["spec"]["nodeName"] == worker.name
        assert pod["status"]["podIPs"] == [{"ip": row["ip"]}]
        assert row["ifname"] == "eth0"
        if worker.provider == "static":
            assert ipaddress.ip_address(row["ip"]) in ipaddress.ip_network(STATIC_POD_CIDR)
        else:
            enis = worker.agent.call("agent.enis")
            owner = next(e for e in enis if row["ip"] in e["ips"])
            assert row["ip"] != owner["primary_ip"]
            assert row["owner"] == owner["eni"]
    assert len({ip_of(p) for p in pods}) == 2


def test_pod_to_pod_and_node_to_pod(cluster: Cluster, ns: Namespace) -> None:
    static, aws = cluster.workers["static"], cluster.workers["aws"]
    a = ns.run(server_pod("a", node=static.name))
    b = ns.run(server_pod("b", node=aws.name))
    c = ns.run(server_pod("c", node=static.name))
    # node -> its own pods, without NAT
    for pod in (a, b, c):
        worker = cluster.workers[pod["spec"]["nodeName"]]
        got = answer(worker.vnode.netns_path, pod_url(pod))
        assert got == {"pod": pod["metadata"]["name"], "local": ip_of(pod), "peer": worker.ip}
    # pod -> pod on the same node and across the VPC, both ways; the peer sees the pod itself
    for src, dst in ((a, c), (c, a), (a, b), (b, a)):
        got = wait_for(
            f"{src['metadata']['name']} -> {dst['metadata']['name']}",
            lambda src=src, dst=dst: answer(
                cluster.netns_of(src), pod_url(src, "/call", url=pod_url(dst))
            ),
            DEADLINE,
        )
        assert got == {"pod": dst["metadata"]["name"], "local": ip_of(dst), "peer": ip_of(src)}


def test_liveness_and_readiness_probes_pass(ns: Namespace, worker: Worker) -> None:
    pod = ns.run(server_pod("probed", node=worker.name), on_fail=worker.logs)
    netns = worker.vnode.netns_path

    def probed() -> Any:
        got = answer(netns, pod_url(pod, "/probes"))
        enough = got and all(sum(got[k].values()) >= 3 for k in ("healthz", "readyz"))
        return got if enough else None

    probes = wait_for("three probes of each kind", probed, DEADLINE)
    # kubelet probes from the node itself, through the pod's routed veth
    assert set(probes["healthz"]) | set(probes["readyz"]) <= worker.addresses()
    status = ns.pod("probed")["status"]
    (container,) = status["containerStatuses"]
    assert container["ready"] is True
    assert container["restartCount"] == 0


def test_deleting_a_pod_releases_its_address(ns: Namespace, worker: Worker) -> None:
    ns.run(server_pod("doomed", node=worker.name), on_fail=worker.logs)
    row = worker.pods()[(ns.name, "doomed")]
    before = worker.agent.call("agent.status")["pods"]
    ns.delete_pod("doomed")

    def released() -> bool:
        links = worker.host.run("ip", "-o", "link").stdout
        routes = worker.host.run("ip", "-4", "route", "show", "table", "all").stdout
        rules = worker.host.run("ip", "-4", "rule").stdout
        return (
            (ns.name, "doomed") not in worker.pods()
            and row["host_veth"] not in links
            and f"{row['ip']} " not in routes
            and row["ip"] not in rules
        )

    # kubelet tears the sandbox down after the API object is gone: wait for its DEL
    wait_for("the pod's DEL", released, DEADLINE, on_fail=worker.logs)
    assert worker.agent.call("agent.status")["pods"] == before - 1


def _echo_connection(netns: str, ip: str) -> socket.socket:
    return call_in_netns(netns, lambda: socket.create_connection((ip, ECHO_PORT), timeout=10))


def _echo(conn: socket.socket) -> str:
    conn.sendall(b"?\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(100)
        if not chunk:
            raise ConnectionError("echo connection closed")
        data += chunk
    return data.decode().strip()


def test_restarting_the_agent_disturbs_no_pod(
    cluster: Cluster, ns: Namespace, worker: Worker
) -> None:
    pods = [
        ns.run(server_pod(f"steady-{i}", node=worker.name), on_fail=worker.logs) for i in (1, 2)
    ]
    netns = worker.vnode.netns_path
    rows = worker.pods()
    conn = _echo_connection(netns, ip_of(pods[0]))
    try:
        assert _echo(conn) == worker.ip

        worker.agent.stop()
        # a pod created while the agent is down: its ADD answers "try again later", kubelet
        # retries, and the pod starts once the agent is back
        ns.create_pod(server_pod("latecomer", node=worker.name))
        wait_for(
            "kubelet's failed sandbox for the latecomer",
            lambda: any(e["reason"] == "FailedCreatePodSandBox" for e in ns.events("latecomer")),
            DEADLINE,
            on_fail=worker.logs,
        )
        assert _echo(conn) == worker.ip  # pods keep working while the agent is away
        worker.start_agent()

        assert _echo(conn) == worker.ip  # the same TCP connection, across the restart
        late = ns.wait_ready("latecomer", on_fail=worker.logs)
    finally:
        conn.close()
    after = worker.pods()
    for pod in pods:
        key = (ns.name, pod["metadata"]["name"])
        assert after[key] == {**rows[key], "age_s": after[key]["age_s"]}
        now = ns.pod(pod["metadata"]["name"])
        assert ip_of(now) == ip_of(pod)
        assert now["status"]["containerStatuses"][0]["restartCount"] == 0
        assert (
            now["status"]["containerStatuses"][0]["containerID"]
            == (pod["status"]["containerStatuses"][0]["containerID"])
        )
    assert (ns.name, "latecomer") in after and after[(ns.name, "latecomer")]["ip"] == ip_of(late)
    # and the pods still reach each other
    got = answer(netns, pod_url(pods[0], "/call", url=pod_url(pods[1])))
    assert got == {"pod": "steady-2", "local": ip_of(pods[1]), "peer": ip_of(pods[0])}
