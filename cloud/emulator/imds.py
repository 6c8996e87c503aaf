"""IMDSv2 for the simulated nodes, read from the same cloud state as the EC2 API.

``metadata_tree`` renders one instance's metadata as ``{path: text}`` (pure); ``ImdsApp`` serves
it with the token flow: ``PUT /latest/api/token`` with a TTL header returns a token bound to the
calling node, every other request needs a valid one (401 otherwise). Which node is calling is
decided by the app's resolver: the source address (one endpoint on the router for all nodes) or
a fixed instance (one loopback port per node).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from cloud.emulator import backend_state, rules
from cloud.emulator.state import CloudState

TOKEN_PATH = "/latest/api/token"
META_PREFIX = "/latest/meta-data"
TTL_HEADER = "HTTP_X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS"
TOKEN_HEADER = "HTTP_X_AWS_EC2_METADATA_TOKEN"
MAX_TTL = 21600

Resolver = Callable[[dict[str, Any]], "str | None"]


def metadata_tree(instance: Any, backend: Any) -> dict[str, str]:
    """Return an instance's metadata as ``{path below meta-data/: text}``.

    Only ENIs whose attachment has completed are listed, as on EC2.
    """
    primary = instance.nics.get(0)
    tree = {
        "ami-id": instance.image_id,
        "instance-id": instance.id,
        "instance-type": instance.instance_type,
        "placement/availability-zone": instance.placement.zone,
        "placement/region": backend.region_name,
    }
    if primary is not None:
        tree["mac"] = primary.mac_address
        tree["local-ipv4"] = primary.private_ip_address
        tree["local-hostname"] = tree["hostname"] = instance.private_dns_name
    for index, eni in sorted(instance.nics.items()):
        if backend_state.is_attaching(eni):
            continue
        vpc = backend.get_vpc(eni.subnet.vpc_id)
        vpc_cidrs = [a["cidr_block"] for a in vpc.cidr_block_association_set] or [vpc.cidr_block]
        base = f"network/interfaces/macs/{eni.mac_address}/"
        tree |= {
            base + "device-number": str(index),
            base + "interface-id": eni.id,
            base + "mac": eni.mac_address,
            base + "owner-id": backend.account_id,
            base + "local-ipv4s": "\n".join(rules.private_ips_of(eni)),
            base + "subnet-id": eni.subnet.id,
            base + "subnet-ipv4-cidr-block": eni.subnet.cidr_block,
            base + "security-group-ids": "\n".join(sorted(g.id for g in eni.group_set)),
            base + "security-groups": "\n".join(sorted(g.name for g in eni.group_set)),
            base + "vpc-id": vpc.id,
            base + "vpc-ipv4-cidr-block": vpc.cidr_block,
            base + "vpc-ipv4-cidr-blocks": "\n".join(vpc_cidrs),
        }
        prefixes = rules.prefixes_of(eni)
        if prefixes:
            tree[base + "ipv4-prefix"] = "\n".join(str(p) for p in prefixes)
    return tree


def lookup(tree: dict[str, str], path: str) -> str | None:
    """The text at ``path``: a leaf's value or a directory listing (children, ``/`` after
    directories), None if there is nothing there."""
    path = path.strip("/")
    if path in tree:
        return tree[path]
    prefix = f"{path}/" if path else ""
    children: dict[str, None] = {}
    for key in sorted(tree):
        if key.startswith(prefix):
            head, sep, _ = key[len(prefix) :].partition("/")
            children[head + ("/" if sep else "")] = None
    return "\n".join(children) if children else None


def by_source_address(state: CloudState) -> Resolver:
    """Resolve the calling node from the request's source address."""

    def resolve(environ: dict[str, Any]) -> str | None:
        return state.instance_of_address(environ.get("REMOTE_ADDR", "0.0.0.0"))

    return resolve


def fixed_instance(instance_id: str) -> Resolver:
    """Every caller is ``instance_id`` (a per-node endpoint)."""
    return lambda environ: instance_id


class ImdsApp:
    """WSGI app serving IMDSv2 for the instances its resolver names."""

    def __init__(self, state: CloudState, resolve: Resolver) -> None:
        self.state = state
        self.resolve = resolve
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        status, text = self._answer(environ)
        body = text.encode()
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    def _answer(self, environ: dict[str, Any]) -> tuple[str, str]:
        instance_id = self.resolve(environ)
        if instance_id is None:
            return "403 Forbidden", "not a simulated node"
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        if path == TOKEN_PATH:
            if method != "PUT":
                return "405 Method Not Allowed", ""
            return self._issue_token(instance_id, environ.get(TTL_HEADER))
        if not self._token_valid(instance_id, environ.get(TOKEN_HEADER)):
            return "401 Unauthorized", ""
        if method != "GET":
            return "405 Method Not Allowed", ""
        if path != META_PREFIX and not path.startswith(META_PREFIX + "/"):
            return "404 Not Found", ""
        with self.state.lock:
            backend = self.state.backend
            tree = metadata_tree(backend.get_instance(instance_id), backend)
        found = lookup(tree, path[len(META_PREFIX) :])
        return ("200 OK", found) if found is not None else ("404 Not Found", "")

    def _issue_token(self, instance_id: str, ttl_text: str | None) -> tuple[str, str]:
        try:
            ttl = int(ttl_text or "")
        except ValueError:
            return "400 Bad Request", ""
        if not 1 <= ttl <= MAX_TTL:
            return "400 Bad Request", ""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (instance_id, time.monotonic() + ttl)
        return "200 OK", token

    def _token_valid(self, instance_id: str, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            found = self._tokens.get(token)
        return found is not None and found[0] == instance_id and time.monotonic() < found[1]
