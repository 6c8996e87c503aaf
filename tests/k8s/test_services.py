"""Services through kube-proxy (iptables mode) in front of podwire's pods (issue 12 item 2):
ClusterIP from pods on both nodes, a pod reaching itself through its own Service, and NodePort
from outside the node."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cri import wait_for
from tests.k8s.cluster import Cluster, Worker
from tests.k8s.workloads import DEADLINE, Namespace, answer, http_get, pod_url, server_pod

pytestmark = [pytest.mark.root, pytest.mark.slow]


def ip_of(pod: Any) -> str:
    return str(pod["status"]["podIP"])


def test_cluster_ip_reaches_pods_from_pods_on_every_node(cluster: Cluster, ns: Namespace) -> None:
    backends = {w: ns.run(server_pod(f"backend-{w}", node=w)) for w in cluster.workers}
    clients = {w: ns.run(server_pod(f"client-{w}", node=w)) for w in cluster.workers}
    services = {
        w: ns.service(f"web-{w}", {"app": f"backend-{w}"})["spec"]["clusterIP"]
        for w in cluster.workers
    }
    for client in clients.values():
        netns = cluster.netns_of(client)
        for w, cluster_ip in services.items():
            got = wait_for(
                f"{client['metadata']['name']} -> service web-{w}",
                lambda client=client, ip=cluster_ip, netns=netns: answer(
                    netns, pod_url(client, "/call", url=f"http://{ip}/")
                ),
                DEADLINE,
            )
            # DNAT to the backend; the backend sees the client pod's own address
            backend = backends[w]
            assert got == {
                "pod": backend["metadata"]["name"],
                "local": ip_of(backend),
                "peer": ip_of(client),
            }
            status, body = http_get(netns, pod_url(client, "/call", udp=f"{cluster_ip}:53"))
            assert (status, body.strip()) == (200, ip_of(client))


def test_a_pod_reaches_itself_through_its_service(
    cluster: Cluster, ns: Namespace, worker: Worker
) -> None:
    pod = ns.run(server_pod("loner", node=worker.name), on_fail=worker.logs)
    cluster_ip = ns.service("loner", {"app": "loner"})["spec"]["clusterIP"]
    got = wait_for(
        "the pod through its own service",
        lambda: answer(worker.vnode.netns_path, pod_url(pod, "/call", url=f"http://{cluster_ip}/")),
        DEADLINE,
        on_fail=worker.logs,
    )
    # hairpin: out of the pod's veth, DNATed back into it (kube-proxy masquerades it, so the
    # pod sees the node's address, as on any node)
    assert (got["pod"], got["local"]) == ("loner", ip_of(pod))
    assert got["peer"] in worker.addresses() | {ip_of(pod)}


def test_node_port_answers_from_outside_the_node(
    cluster: Cluster, ns: Namespace, worker: Worker
) -> None:
    pod = ns.run(server_pod("exposed", node=worker.name), on_fail=worker.logs)
    service = ns.service("exposed", {"app": "exposed"}, kind="NodePort")
    node_port = next(p["nodePort"] for p in service["spec"]["ports"] if p["name"] == "http")
    outside = cluster.cp.vnode.netns_path  # another instance of the VPC
    for node in cluster.workers.values():  # the pod's own node, and the other one
        got = wait_for(
            f"NodePort {node.ip}:{node_port} from outside",
            lambda node=node: answer(outside, f"http://{node.ip}:{node_port}/"),
            DEADLINE,
            on_fail=worker.logs,
        )
        assert (got["pod"], got["local"]) == ("exposed", ip_of(pod))
