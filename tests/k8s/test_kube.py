"""The agent's own view of the cluster (issue 12 item 3), against the real API server: watches
that survive an API server restart and 410 Gone without losing or inventing a change, and the
Node's pod CIDRs as the static provider's source, changing while the agent runs.

Besides the cluster's workers (whose agents already watch as deploy/kubernetes's service
account), a *probe* node: an agent on its own VPC instance with no kubelet, whose Node object
and pods the test makes itself, so it can freeze the agent (SIGSTOP), change the world behind
its back, compact etcd and restart the API server."""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from tests.cri import wait_for
from tests.harness import Node
from tests.k8s.cluster import STARTUP, Cluster
from tests.k8s.workloads import DEADLINE, Namespace, server_pod

pytestmark = pytest.mark.root

PROBE_CIDRS = ("10.0.80.0/24", "10.0.81.0/24")


class Probe:
    """An agent watching a Node that no kubelet runs (see the module docstring)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.api = cluster.api
        self.name = f"probe-{secrets.token_hex(3)}"
        self.vnode = cluster.vpc.add_node("m5.large")
        self.register(PROBE_CIDRS[0])
        self.agent = Node(
            netns=self.vnode.netns,
            primary_ip=self.vnode.primary_ip,
            cidrs=(),
            env={"PODWIRE_STATIC_SOURCE": "node"},
            extra_config=(
                "[kubernetes]\nenabled = true\n"
                f'node_name = "{self.name}"\n'
                f'kubeconfig = "{cluster.cp.agent_kubeconfig}"\n'
                # short watch requests: the server ends one while the test holds the agent
                "watch_session = 4.0\nretry_base = 0.2\nretry_cap = 1.0\n"
            ),
            tag="probe",
        )
        self.agent.start(timeout=STARTUP)

    def register(self, cidr: str) -> Any:
        """Create the Node as kubelet and the node IPAM controller would, with ``cidr``."""
        return self.api.create(
            "/api/v1/nodes",
            {
                "metadata": {"name": self.name, "labels": {"kubernetes.io/hostname": self.name}},
                "spec": {
                    "podCIDR": cidr,
                    "podCIDRs": [cidr],
                    "taints": [{"key": "podwire.test/probe", "effect": "NoSchedule"}],
                },
            },
        )

    def pod(self, ns: Namespace, name: str, **labels: str) -> Any:
        """A pod bound to the probe node (it never runs: there is no kubelet)."""
        return ns.create_pod(
            {
                "metadata": {"name": name, "labels": labels or {"app": name}},
                "spec": {
                    "nodeName": self.name,
                    "tolerations": [{"operator": "Exists"}],
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "c", "image": "none"}],
                },
            }
        )

    def kube(self) -> Any:
        return self.agent.call("agent.kube")

    def watch(self, name: str) -> dict[str, Any]:
        (w,) = [w for w in self.kube()["watches"] if w["name"] == name]
        return w

    def cached(self) -> set[str]:
        return set(self.kube()["pods"])

    def watches_ended(self) -> int:
        """How many of the agent's pod watches the API server has ended (its audit log)."""
        selector = f"fieldSelector=spec.nodeName%3D{self.name}"
        return sum(
            1
            for e in self.cluster.cp.audit()
            if e.get("verb") == "watch"
            and e.get("stage") == "ResponseComplete"
            and selector in e.get("requestURI", "")
        )

    def close(self) -> None:
        self.agent.close()
        with contextlib.suppress(Exception):
            self.api.delete(f"/api/v1/nodes/{self.name}")
        self.cluster.vpc.remove_node(self.vnode)


@pytest.fixture(scope="module")
def probe(cluster: Cluster) -> Iterator[Probe]:
    p = Probe(cluster)
    try:
        yield p
    finally:
        p.close()


def pod_events(agent: Node) -> list[tuple[str, str, str]]:
    return [
        (e["change"], e["name"], e["uid"])
        for e in agent.call("agent.events")
        if e["kind"] == "kube.pod"
    ]


def test_static_worker_takes_its_pod_cidr_from_its_node(cluster: Cluster, ns: Namespace) -> None:
    worker = cluster.workers["static"]
    pool = worker.agent.call("agent.pool")
    assert pool["ranges"]["ranges"] == [worker.pod_cidr]
    assert [o["owner"] for o in pool["owners"]] == [worker.pod_cidr]
    kube = worker.agent.call("agent.kube")
    watches = {w["name"]: w for w in kube["watches"]}
    assert watches["node"]["synced"] and watches["node"]["objects"] == 1
    assert watches["pods"]["synced"] and watches["pods"]["connected"]
    # in-cluster credentials, through the kubernetes Service (kube-proxy on the node)
    config = {r["setting"]: r["value"] for r in worker.agent.call("agent.config")}
    assert config["kubernetes.kubeconfig"] == "" and config["static.source"] == "node"
    # a pod created through the API reaches the agent's cache, then is wired in the Node's CIDR
    running = ns.run(server_pod("cidr", node="static", probes=False), on_fail=worker.logs)
    assert IPv4Address(running["status"]["podIP"]) in IPv4Network(worker.pod_cidr)
    assert f"{ns.name}/cidr" in worker.agent.call("agent.kube")["pods"]


def test_watches_survive_an_api_server_restart_and_410(
    cluster: Cluster, probe: Probe, ns: Namespace
) -> None:
    # a policy in this namespace: its new pods need their labels from the API to be decided
    ns.api.create(
        f"/apis/vpcresources.k8s.aws/v1beta1/namespaces/{ns.name}/securitygrouppolicies",
        {
            "apiVersion": "vpcresources.k8s.aws/v1beta1",
            "kind": "SecurityGroupPolicy",
            "metadata": {"name": "web"},
            "spec": {
                "podSelector": {"matchLabels": {"role": "web"}},
                "securityGroups": {"groupIds": ["sg-0123456789abcdef0"]},
            },
        },
    )
    live = probe.pod(ns, "live", role="a")
    doomed = probe.pod(ns, "doomed")
    wait_for(
        "probe caches both pods",
        lambda: {f"{ns.name}/live", f"{ns.name}/doomed"} <= probe.cached(),
        DEADLINE,
    )
    worker = cluster.workers["static"]
    ns.run(server_pod("steady", node="static", probes=False), on_fail=worker.logs)
    static = worker.agent
    static_pods = set(static.call("agent.kube")["pods"])
    assert f"{ns.name}/steady" in static_pods
    before = probe.watch("pods")

    assert probe.agent.proc is not None
    ended = probe.watches_ended()
    probe.agent.proc.send_signal(signal.SIGSTOP)  # the agent is frozen with its watch open
    try:
        ns.api.delete(ns.path("pods", "doomed"), grace=0)
        born = probe.pod(ns, "born")
        ns.api.patch(ns.path("pods", "live"), {"metadata": {"labels": {"role": "b"}}})
        # the server ends that watch (timeoutSeconds): its events wait in the agent's socket,
        # and the frozen agent cannot make the next request, so it misses what follows
        wait_for(
            "the server ends the probe's watch", lambda: probe.watches_ended() > ended, DEADLINE
        )
        ns.api.patch(ns.path("pods", "live"), {"metadata": {"annotations": {"missed": "yes"}}})
        cluster.cp.compact_etcd()  # the history goes ...
        cluster.cp.stop_apiserver()  # ... and the API server's cache with it
        try:
            adds_while_the_api_is_down(cluster, ns)
        finally:
            cluster.cp.start_apiserver()
    finally:
        probe.agent.proc.send_signal(signal.SIGCONT)

    # its next request resumes from a version etcd forgot: 410 Gone, then a list
    wait_for(
        "the probe's watch answered 410 and listed again",
        lambda: (
            (w := probe.watch("pods"))["expired"] > before["expired"]
            and w["lists"] > before["lists"]
            and w["connected"]
        ),
        DEADLINE,
        on_fail=lambda: json.dumps(probe.kube(), indent=1) + probe.agent.log()[-3000:],
    )
    assert probe.cached() >= {f"{ns.name}/live", f"{ns.name}/born"}
    assert f"{ns.name}/doomed" not in probe.cached()
    events = pod_events(probe.agent)
    uid = {p["metadata"]["name"]: p["metadata"]["uid"] for p in (live, doomed, born)}
    # the doomed pod is reported gone once; the live one never, whatever the 410 and the list did
    assert events.count(("deleted", f"{ns.name}/doomed", uid["doomed"])) == 1
    assert not [e for e in events if e[1] == f"{ns.name}/live" and e[0] == "deleted"]
    assert ("added", f"{ns.name}/born", uid["born"]) in events
    # what happened while it could not watch came in with the list
    assert events[-1] == ("modified", f"{ns.name}/live", uid["live"]), events

    # the workers' agents rode through the restart too: same pods, none reported gone
    wait_for(
        "the static worker's watch reconnected",
        lambda: all(w["connected"] for w in static.call("agent.kube")["watches"]),
        DEADLINE,
    )
    assert set(static.call("agent.kube")["pods"]) == static_pods
    assert not [e for e in pod_events(static) if e[0] == "deleted" and e[1] in static_pods]


def test_pod_cidr_change_while_the_agent_runs(cluster: Cluster, probe: Probe) -> None:
    old, new = PROBE_CIDRS
    assert probe.agent.call("agent.pool")["ranges"]["ranges"] == [old]
    first = probe.agent.new_pod("cidr1")
    r1 = probe.agent.add(first)
    assert r1.code == 0, r1
    assert IPv4Address(r1.ip) in IPv4Network(old)
    # podCIDRs cannot change in place: the Node is deleted and registered again with a new one
    cluster.api.delete(f"/api/v1/nodes/{probe.name}")
    wait_for(
        "the probe sees its Node gone",
        lambda: probe.watch("node")["objects"] == 0,
        DEADLINE,
    )
    assert probe.agent.call("agent.pool")["ranges"]["ranges"] == [old]  # kept meanwhile
    probe.register(new)
    wait_for(
        "the pool follows the Node's new CIDR",
        lambda: probe.agent.call("agent.pool")["ranges"]["ranges"] == [new],
        DEADLINE,
        on_fail=lambda: probe.agent.log()[-3000:],
    )
    pool = probe.agent.call("agent.pool")
    assert [o["owner"] for o in pool["owners"]] == [new]
    assert pool["withdrawn_in_use"] == [{"ip": r1.ip, "key": pool["withdrawn_in_use"][0]["key"]}]
    second = probe.agent.new_pod("cidr2")
    r2 = probe.agent.add(second)
    assert r2.code == 0, r2
    assert IPv4Address(r2.ip) in IPv4Network(new)
    assert probe.agent.delete(first).code == 0
    assert probe.agent.call("agent.pool")["withdrawn_in_use"] == []
    assert probe.agent.delete(second).code == 0


def adds_while_the_api_is_down(cluster: Cluster, ns: Namespace) -> None:
    """The aws worker (security groups on) while the API server is down: a pod a
    SecurityGroupPolicy may select cannot be decided (code 11, saying why); an ordinary pod
    (no policy in its namespace) gets its address as always."""
    agent = cluster.workers["aws"].agent
    wait_for(
        "the aws agent sees the API server gone",
        lambda: (
            not next(w for w in agent.call("agent.kube")["watches"] if w["name"] == "pods")[
                "connected"
            ]
        ),
        DEADLINE,
    )
    eligible = agent.new_pod("sgdown")
    r = agent.add(eligible, args=f"K8S_POD_NAMESPACE={ns.name};K8S_POD_NAME=new-web")
    assert r.code == 1 and r.doc["code"] == 11, r
    assert "the Kubernetes API cannot be reached" in r.doc["details"], r.doc
    ordinary = agent.new_pod("plaindown")
    r = agent.add(ordinary, args="K8S_POD_NAMESPACE=no-policies-here;K8S_POD_NAME=plain")
    assert r.code == 0, r
    assert (
        agent.delete(ordinary, args="K8S_POD_NAMESPACE=no-policies-here;K8S_POD_NAME=plain").code
        == 0
    )
