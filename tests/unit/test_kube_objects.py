"""Parsing the API's JSON into the fields the agent keeps; never an exception for an object the
API server accepted."""

from __future__ import annotations

from ipaddress import IPv4Network

from cloud.kube.objects import parse_node, parse_pod, parse_policy, parse_service_account


def test_pod() -> None:
    p = parse_pod(
        {
            "metadata": {
                "namespace": "shop",
                "name": "web-1",
                "uid": "u1",
                "resourceVersion": "42",
                "labels": {"app": "web"},
                "annotations": {"podwire.io/security-groups": "sg-1"},
                "deletionTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": {
                "nodeName": "n1",
                "serviceAccountName": "web",
                "hostNetwork": False,
                "containers": [
                    {"name": "c", "resources": {"limits": {"vpc.amazonaws.com/pod-eni": "1"}}},
                    {"name": "sidecar"},
                ],
            },
            "status": {"phase": "Running", "podIP": "10.0.0.7"},
        }
    )
    assert (p.key, p.uid, p.resource_version, p.node_name) == (("shop", "web-1"), "u1", "42", "n1")
    assert p.labels == {"app": "web"} and p.service_account == "web"
    assert p.requests_pod_eni and p.deleting and p.phase == "Running" and p.pod_ip == "10.0.0.7"
    bare = parse_pod({"metadata": {"namespace": "a", "name": "b"}, "spec": {"containers": []}})
    assert bare.service_account == "default" and not bare.requests_pod_eni and bare.labels == {}


def test_node() -> None:
    n = parse_node(
        {
            "metadata": {"name": "n1", "uid": "u", "resourceVersion": "3"},
            "spec": {
                "podCIDR": "10.1.0.0/24",
                "podCIDRs": ["10.1.0.0/24", "fd00:1::/64"],
                "providerID": "aws:///us-east-1a/i-0123",
            },
        }
    )
    assert n.pod_cidrs == (IPv4Network("10.1.0.0/24"),) and n.provider_id.endswith("i-0123")
    legacy = parse_node({"metadata": {"name": "n2"}, "spec": {"podCIDR": "10.2.0.0/24"}})
    assert legacy.pod_cidrs == (IPv4Network("10.2.0.0/24"),)
    assert parse_node({"metadata": {"name": "n3"}, "spec": {}}).pod_cidrs == ()


def test_policy() -> None:
    p = parse_policy(
        {
            "metadata": {"namespace": "shop", "name": "db", "uid": "u", "resourceVersion": "9"},
            "spec": {
                "podSelector": {"matchLabels": {"role": "db"}},
                "securityGroups": {"groupIds": ["sg-1", "sg-2"]},
            },
        }
    )
    assert p.group_ids == ("sg-1", "sg-2") and p.pod_selector == {"matchLabels": {"role": "db"}}
    assert p.service_account_selector is None and p.problem == ""
    empty = parse_policy(
        {"metadata": {"name": "e"}, "spec": {"serviceAccountSelector": {}, "securityGroups": {}}}
    )
    assert empty.service_account_selector == {} and empty.problem
    assert parse_policy({"metadata": {"name": "x"}}).problem


def test_service_account() -> None:
    sa = parse_service_account(
        {"metadata": {"namespace": "a", "name": "b", "uid": "u", "labels": {"k": "v"}}}
    )
    assert sa.key == ("a", "b") and sa.labels == {"k": "v"}


def test_agentctl_kube_view() -> None:
    from agent.ctl import show_kube

    assert show_kube({"enabled": False}).startswith("kubernetes: off")
    watch = {
        "name": "pods",
        "synced": True,
        "connected": False,
        "disconnected_since": None,
        "objects": 3,
        "resource_version": "42",
        "lists": 2,
        "expired": 1,
        "errors": 4,
        "last_error": "list pods: ConnectError",
    }
    text = show_kube(
        {
            "enabled": True,
            "node": "n1",
            "watches": [watch],
            "pods": [],
            "cninode": {"name": "n1", "state": "SecurityGroupsForPods requested"},
            "groups": {
                "applied": 1,
                "pods": [
                    {
                        "pod": "shop/plain",
                        "running": [],
                        "resolved": ["sg-1"],
                        "state": "restart to apply: on the shared pool",
                    }
                ],
            },
        }
    )
    assert "cninode: SecurityGroupsForPods requested" in text
    assert "pods" in text and "NO" in text and "ConnectError" in text
    assert "shop/plain" in text and "restart to apply" in text
