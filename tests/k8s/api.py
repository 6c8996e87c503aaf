"""A small synchronous client for the test cluster's API server, for the tests' own use.

The API server listens inside the control plane's namespace; this client's sockets are opened
there (a thread enters the namespace to create each one), so the test process reaches it
without any route in the machine's own namespace. JSON in, JSON out, TLS with a client
certificate. (The agent's own Kubernetes client is another matter: it runs inside the node.)
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cloud.emulator.netns import call_in_netns
from tests.k8s.pki import Pair


class ApiError(Exception):
    """The API server answered an error status; ``status`` and ``doc`` say which."""

    def __init__(self, method: str, path: str, status: int, doc: Any) -> None:
        msg = doc.get("message") if isinstance(doc, dict) else doc
        super().__init__(f"{method} {path}: {status} {msg}")
        self.status = status
        self.doc = doc


class NotFound(ApiError):
    pass


class _Connection(http.client.HTTPSConnection):
    def __init__(self, netns: str, host: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=60, context=context)
        self._netns = netns
        self._ctx = context

    def connect(self) -> None:
        host, port, timeout = self.host, self.port, self.timeout
        raw = call_in_netns(self._netns, lambda: socket.create_connection((host, port), timeout))
        self.sock = self._ctx.wrap_socket(raw, server_hostname=host)


class Api:
    """The API server at ``host:port`` inside the namespace at ``netns``."""

    def __init__(self, netns: str, host: str, port: int, *, ca: str, client: Pair) -> None:
        self._netns, self._host, self._port = netns, host, port
        self._context = ssl.create_default_context(cafile=ca)
        self._context.load_cert_chain(str(client.cert), str(client.key))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """Send one request; return the decoded answer, raise ApiError (NotFound for 404)."""
        url = path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json", "Connection": "close"}
        if data is not None:
            headers["Content-Type"] = content_type
        # one connection per request: a few milliseconds, and never a request sent twice
        conn = _Connection(self._netns, self._host, self._port, self._context)
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        is_json = resp.getheader("Content-Type", "").startswith("application/json")
        doc = json.loads(raw) if is_json and raw.strip() else raw.decode(errors="replace")
        if resp.status == 404:
            raise NotFound(method, path, resp.status, doc)
        if resp.status >= 400:
            raise ApiError(method, path, resp.status, doc)
        return doc

    def get(self, path: str, **params: str) -> Any:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, obj: Mapping[str, Any]) -> Any:
        return self.request("POST", path, obj)

    def patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, path: str, *, grace: int | None = None) -> Any:
        body = {"gracePeriodSeconds": grace} if grace is not None else None
        return self.request("DELETE", path, body)

    def items(self, path: str, **params: str) -> list[Any]:
        return list(self.get(path, **params)["items"])

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
            return True
        except NotFound:
            return False

    def apply(self, manifest: Path) -> list[Any]:
        """Create every object of a YAML manifest (the kinds tests/k8s applies), or replace
        what exists; wait until a CustomResourceDefinition is established."""
        import yaml  # PyYAML, installed with the test extra

        made = []
        for doc in yaml.safe_load_all(manifest.read_text()):
            if not doc:
                continue
            path = collection_path(doc)
            name = doc["metadata"]["name"]
            try:
                made.append(self.create(path, doc))
            except ApiError as e:
                if e.status != 409:
                    raise
                current = self.get(f"{path}/{name}")
                doc["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                made.append(self.request("PUT", f"{path}/{name}", doc))
            if doc["kind"] == "CustomResourceDefinition":
                self._wait_established(name)
        return made

    def _wait_established(self, name: str) -> None:
        import time

        deadline = time.monotonic() + 60
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        while time.monotonic() < deadline:
            conditions = self.get(path).get("status", {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return
            time.sleep(0.1)
        raise TimeoutError(f"CRD {name} not established")

    def token(self, namespace: str, service_account: str, seconds: int = 6 * 3600) -> str:
        """A bound token for the service account (TokenRequest, as kubelet gets one)."""
        doc = self.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds},
            },
        )
        return str(doc["status"]["token"])


# kind -> (API prefix, plural, namespaced) for what tests/k8s applies from manifests
KINDS = {
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "CustomResourceDefinition": (
        "/apis/apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        False,
    ),
    "SecurityGroupPolicy": ("/apis/vpcresources.k8s.aws/v1beta1", "securitygrouppolicies", True),
    "CNINode": ("/apis/networking.k8s.aws/v1alpha1", "cninodes", False),
}


def collection_path(doc: Mapping[str, Any], namespace: str = "") -> str:
    """The collection URL of ``doc``'s kind (in its namespace, or ``namespace``)."""
    prefix, plural, namespaced = KINDS[doc["kind"]]
    if not namespaced:
        return f"{prefix}/{plural}"
    ns = namespace or doc["metadata"].get("namespace") or "default"
    return f"{prefix}/namespaces/{ns}/{plural}"
