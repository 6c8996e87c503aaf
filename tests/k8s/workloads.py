"""Pods, Services and traffic for tests/k8s: manifests of the test server, waiting on what the
API reports, and HTTP from inside the VPC's namespaces (never from the machine's own)."""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import urllib.parse
from collections.abc import Mapping
from typing import Any

from cloud.emulator.netns import call_in_netns
from tests.cri import wait_for
from tests.k8s.api import Api, NotFound
from tests.k8s.artifacts import SERVER_IMAGE

DEADLINE = 120.0  # for anything kubelet does: generous, the machine is shared
HTTP_PORT = 8080
ECHO_PORT = 9000


def server_pod(
    name: str, *, node: str, labels: Mapping[str, str] | None = None, probes: bool = True
) -> dict[str, Any]:
    """A pod running the test server on ``node`` (through the scheduler: a node selector),
    with HTTP liveness and readiness probes."""
    container: dict[str, Any] = {
        "name": "server",
        "image": SERVER_IMAGE,
        "imagePullPolicy": "Never",
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT},
            {"name": "echo-udp", "containerPort": ECHO_PORT, "protocol": "UDP"},
        ],
    }
    if probes:
        for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            container[kind] = {
                "httpGet": {"path": path, "port": HTTP_PORT},
                "periodSeconds": 1,
                "timeoutSeconds": 5,
                "failureThreshold": 30,
            }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels or {"app": name})},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "dnsPolicy": "Default",
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
        },
    }


class Namespace:
    """A namespace of the test's own; ``close()`` deletes its pods and itself."""

    def __init__(self, api: Api, prefix: str = "t") -> None:
        self.api = api
        self.name = f"{prefix}-{secrets.token_hex(3)}"
        api.create("/api/v1/namespaces", {"metadata": {"name": self.name}})
        # pods are admitted only once the controller manager made the default service account
        wait_for(
            f"service account in {self.name}",
            lambda: api.exists(f"/api/v1/namespaces/{self.name}/serviceaccounts/default"),
            DEADLINE,
        )

    def path(self, kind: str, name: str = "") -> str:
        return f"/api/v1/namespaces/{self.name}/{kind}" + (f"/{name}" if name else "")

    def create_pod(self, manifest: Mapping[str, Any]) -> Any:
        return self.api.create(self.path("pods"), manifest)

    def pod(self, name: str) -> Any:
        return self.api.get(self.path("pods", name))

    def wait_ready(self, name: str, on_fail: Any = str) -> Any:
        """Wait until the pod is Running and Ready; return it."""

        def ready() -> Any:
            pod = self.pod(name)
            conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            return pod if conditions.get("Ready") == "True" else None

        return wait_for(
            f"pod {self.name}/{name} Ready",
            ready,
            DEADLINE,
            on_fail=lambda: self.describe(name) + on_fail(),
        )

    def run(self, manifest: Mapping[str, Any], on_fail: Any = str) -> Any:
        self.create_pod(manifest)
        return self.wait_ready(manifest["metadata"]["name"], on_fail=on_fail)

    def delete_pod(self, name: str) -> None:
        """Delete the pod and wait until the API no longer has it."""
        self.api.delete(self.path("pods", name), grace=0)
        wait_for(f"pod {name} gone", lambda: not self.api.exists(self.path("pods", name)), DEADLINE)

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.api.items(self.path("events"), fieldSelector=f"involvedObject.name={name}")

    def describe(self, name: str) -> str:
        try:
            pod = self.pod(name)
        except NotFound:
            return f"pod {name}: not found"
        events = [f"{e['reason']}: {e['message']}" for e in self.events(name)]
        return json.dumps(pod.get("status", {}), indent=1) + "\n" + "\n".join(events)

    def service(self, name: str, selector: Mapping[str, str], *, kind: str = "ClusterIP") -> Any:
        """A Service on the test server: HTTP on 80 and the UDP echo on 53."""
        return self.api.create(
            self.path("services"),
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name},
                "spec": {
                    "type": kind,
                    "selector": dict(selector),
                    "ports": [
                        {"name": "http", "port": 80, "targetPort": HTTP_PORT, "protocol": "TCP"},
                        {"name": "echo", "port": 53, "targetPort": ECHO_PORT, "protocol": "UDP"},
                    ],
                },
            },
        )

    def close(self) -> None:
        for pod in self.api.items(self.path("pods")):
            self.api.delete(self.path("pods", pod["metadata"]["name"]), grace=0)
        self.api.delete(f"/api/v1/namespaces/{self.name}")


def http_get(netns: str, url: str, timeout: float = 10) -> tuple[int, str]:
    """GET ``url`` with a socket opened inside the namespace at ``netns``; return the status
    and the body. Raises OSError when the connection fails."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    sock = call_in_netns(netns, lambda: socket.create_connection((host, port), timeout))
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path or "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def answer(netns: str, url: str) -> Any:
    """The test server's JSON answer to GET ``url`` from ``netns``, or None while it cannot
    be had (for ``wait_for``)."""
    try:
        status, body = http_get(netns, url)
    except OSError:
        return None
    return json.loads(body) if status == 200 else None


def pod_url(pod: Mapping[str, Any], path: str = "/", **query: str) -> str:
    q = f"?{urllib.parse.urlencode(query)}" if query else ""
    return f"http://{pod['status']['podIP']}:{HTTP_PORT}{path}{q}"
