"""The GCE metadata server for the simulated nodes, and their alias IP ranges.

A simulated node can play a GCE VM: its primary ENI is ``nic0`` (address, subnet mask,
gateway, MAC) and its pod CIDRs (``NodeSpec.pod_cidrs``, which the VPC router already routes to
the primary ENI, as GCE routes alias ranges natively) are ``nic0``'s alias IP ranges. They can
be changed at run time (``Vpc.set_alias_ranges``, ``PUT /_emulator/nodes/<id>/alias-ranges``):
the router's routes follow at once.

``gce_tree`` renders one instance's metadata as a nested tree (pure); ``render`` answers one
path of it as GCE does: a leaf's text, a directory's listing (children one per line,
subdirectories with a trailing ``/``), a directory asked without its trailing ``/`` is a 301 to
it, ``?recursive=true`` gives JSON (camelCase keys, indexed directories as lists). Every 200
carries an ``ETag`` (a hash of the body). ``GceMetadataApp`` serves it: the caller's node is
found by the resolver (the source address on the one endpoint in the router, or a fixed
instance on a loopback port), ``Metadata-Flavor: Google`` is required (403 without it, and with
an ``X-Forwarded-For`` header, as on GCE) and echoed on every reply, and
``?wait_for_change=true`` holds the request until the answer's ETag differs from ``last_etag``
(at once if it already does; from the current one when none is given), or ``timeout_sec``
passes (then the unchanged answer). ``MetadataRouter`` puts it beside IMDS on 169.254.169.254:80.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Network
from typing import Any, Union
from urllib.parse import parse_qs

import attrs
import orjson

from cloud.emulator import backend_state
from cloud.emulator.imds import Resolver
from cloud.emulator.state import CloudState
from cloud.emulator.wiring import gateway_of

PREFIX = "/computeMetadata/v1"
FLAVOR_HEADER = "HTTP_METADATA_FLAVOR"
FORWARDED_HEADER = "HTTP_X_FORWARDED_FOR"
PROJECT_ID = "podwire-emulator"
NIC_MTU = "1460"  # a GCE VPC's default; the emulated links carry 1500, so 1460 fits
MAX_WAIT = 3600.0  # a wait_for_change without timeout_sec
RECHECK = 1.0  # a waiting request also looks again this often (changes made elsewhere)

Tree = dict[str, Union[str, "Tree", list[str]]]
WsgiReply = tuple[str, list[tuple[str, str]], bytes]


# --- the tree (pure) ------------------------------------------------------------------------


def numeric_id(instance_id: str) -> str:
    """A GCE-style numeric instance id derived from the EC2 one (stable, below 2**63)."""
    return str(int(instance_id.removeprefix("i-"), 16) % (2**63))


def instance_name(instance_id: str) -> str:
    return f"gke-node-{instance_id.removeprefix('i-')[:8]}"


def gce_tree(instance: Any, backend: Any, project: str, aliases: Iterable[IPv4Network]) -> Tree:
    """Return one instance's metadata as a nested tree: str leaves, dict directories, lists
    for indexed directories (``network-interfaces/<n>/ip-aliases/<i>``)."""
    name = instance_name(instance.id)
    nics: Tree = {}
    alias_list = [str(a) for a in aliases]
    for index, eni in sorted(instance.nics.items()):
        if backend_state.is_attaching(eni):
            continue
        subnet = IPv4Network(eni.subnet.cidr_block)
        nics[str(index)] = {
            "ip": eni.private_ip_address,
            "subnetmask": str(subnet.netmask),
            "gateway": str(gateway_of(subnet)),
            "mac": eni.mac_address,
            "mtu": NIC_MTU,
            "network": f"projects/{project}/networks/{eni.subnet.vpc_id}",
            "ip-aliases": list(alias_list) if index == 0 else [],
            "forwarded-ips": [],
        }
    return {
        "instance": {
            "id": numeric_id(instance.id),
            "name": name,
            "hostname": f"{name}.c.{PROJECT_ID}.internal",
            "zone": f"projects/{project}/zones/{instance.placement.zone}",
            "machine-type": f"projects/{project}/machineTypes/{instance.instance_type}",
            "network-interfaces": nics,
        },
        "project": {"project-id": PROJECT_ID, "numeric-project-id": project},
    }


def _camel(key: str) -> str:
    head, *rest = key.split("-")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _json(node: str | Tree | list[str]) -> Any:
    if isinstance(node, dict):
        return {_camel(k): _json(v) for k, v in node.items()}
    return node


def _child(node: str | Tree | list[str], name: str) -> str | Tree | list[str] | None:
    if isinstance(node, dict):
        return node.get(name)
    if isinstance(node, list) and name.isdigit() and int(name) < len(node):
        return node[int(name)]
    return None


def _listing(node: Tree | list[str]) -> str:
    if isinstance(node, list):
        names = [str(i) for i in range(len(node))]
    else:
        names = [k + ("" if isinstance(v, str) else "/") for k, v in node.items()]
    return "".join(n + "\n" for n in names)


@attrs.frozen(kw_only=True)
class Answer:
    status: str
    body: bytes = b""
    content_type: str = "application/text"
    location: str | None = None

    @property
    def etag(self) -> str:
        return hashlib.sha1(self.body).hexdigest()[:16] if self.status.startswith("200") else ""


def render(tree: Tree, path: str, *, recursive: bool = False, alt: str = "") -> Answer:
    """Answer ``path`` (below ``/computeMetadata/v1``) as the GCE metadata server does."""
    parts = [p for p in path.split("/") if p]
    node: str | Tree | list[str] | None = tree
    for part in parts:
        node = _child(node, part) if node is not None else None
    if node is None:
        return Answer(status="404 Not Found", body=b"not found\n")
    if isinstance(node, str):
        if alt == "json":
            return Answer(status="200 OK", body=orjson.dumps(node), content_type="application/json")
        return Answer(status="200 OK", body=node.encode())
    if not path.endswith("/"):
        return Answer(status="301 Moved Permanently", location=f"{PREFIX}{path}/")
    if recursive:
        return Answer(
            status="200 OK", body=orjson.dumps(_json(node)), content_type="application/json"
        )
    return Answer(status="200 OK", body=_listing(node).encode())


# --- the server -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Request:
    """One request as the emulator saw it (for tests that check paths and headers)."""

    instance_id: str | None
    method: str
    path: str
    query: str
    flavor: str | None


class GceMetadataServer:
    """The shared state of every GCE metadata endpoint of one ``Vpc``: alias ranges, the change
    signal long polls wait on, a "down" fault, the request log."""

    def __init__(self, state: CloudState, initial_aliases: Callable[[str], Iterable[str]]) -> None:
        self.state = state
        self._initial = initial_aliases
        self._aliases: dict[str, tuple[IPv4Network, ...]] = {}
        self._changed = threading.Condition()
        self._version = 0
        self._closed = False
        self.down = False
        self.requests: deque[Request] = deque(maxlen=2000)

    def aliases(self, instance_id: str) -> tuple[IPv4Network, ...]:
        with self.state.lock:
            found = self._aliases.get(instance_id)
            if found is None:
                found = tuple(IPv4Network(c) for c in self._initial(instance_id))
                self._aliases[instance_id] = found
            return found

    def set_alias_ranges(self, instance_id: str, cidrs: Iterable[str | IPv4Network]) -> None:
        """Give the node these alias ranges (replacing its ranges): the router routes them to
        its primary ENI before this returns, and waiting requests see the change."""
        nets = tuple(IPv4Network(c) for c in cidrs)

        def change() -> None:
            self.state.backend.get_instance(instance_id)  # an unknown id raises
            self._aliases[instance_id] = nets
            spec = self.state.nodes.get(instance_id)
            if spec is not None:
                self.state.nodes[instance_id] = attrs.evolve(spec, pod_cidrs=nets)

        self.state.call(change)
        self.changed()

    def set_down(self, down: bool) -> None:
        """While down, every GCE metadata request answers 503."""
        self.down = down
        self.changed()

    def changed(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def version(self) -> int:
        with self._changed:
            return self._version

    def wait(self, seen: int, timeout: float) -> None:
        """Return once the version moved past ``seen``, the server closed, or ``timeout``."""
        with self._changed:
            if self._version == seen and not self._closed:
                self._changed.wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def tree(self, instance_id: str) -> Tree:
        aliases = self.aliases(instance_id)
        with self.state.lock:
            backend = self.state.backend
            return gce_tree(
                backend.get_instance(instance_id), backend, self.state.account_id, aliases
            )


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    return query.get(name, [""])[0].lower() in ("true", "1")


class GceMetadataApp:
    """WSGI app serving GCE metadata for the instances its resolver names."""

    def __init__(self, server: GceMetadataServer, resolve: Resolver) -> None:
        self.server = server
        self.resolve = resolve

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        status, headers, body = self._answer(environ)
        start_response(
            status,
            [
                ("Metadata-Flavor", "Google"),
                ("Content-Length", str(len(body))),
                *headers,
            ],
        )
        return [body]

    def _answer(self, environ: dict[str, Any]) -> WsgiReply:
        instance_id = self.resolve(environ)
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        query_text = environ.get("QUERY_STRING", "")
        flavor = environ.get(FLAVOR_HEADER)
        self.server.requests.append(
            Request(
                instance_id=instance_id, method=method, path=path, query=query_text, flavor=flavor
            )
        )
        text = [("Content-Type", "text/plain")]
        if instance_id is None:
            return "403 Forbidden", text, b"not a simulated node\n"
        if environ.get(FORWARDED_HEADER):
            return "403 Forbidden", text, b"Request had an X-Forwarded-For header\n"
        if flavor != "Google":
            return "403 Forbidden", text, b"Missing Metadata-Flavor:Google header.\n"
        if method != "GET":
            return "405 Method Not Allowed", text, b""
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            return "404 Not Found", text, b"not found\n"
        query = parse_qs(query_text)
        try:
            timeout = float(query["timeout_sec"][0]) if "timeout_sec" in query else MAX_WAIT
        except ValueError:
            return "400 Bad Request", text, b"timeout_sec must be a number\n"
        sub = path[len(PREFIX) :] or "/"
        recursive, alt = _flag(query, "recursive"), query.get("alt", [""])[0]

        def look() -> Answer:
            if self.server.down:
                return Answer(status="503 Service Unavailable", body=b"unavailable\n")
            try:
                tree = self.server.tree(instance_id)
            except Exception:  # the instance went away
                return Answer(status="404 Not Found", body=b"not found\n")
            return render(tree, sub, recursive=recursive, alt=alt)

        seen = self.server.version()
        answer = look()
        if _flag(query, "wait_for_change") and answer.status.startswith("200"):
            last = query.get("last_etag", [answer.etag])[0]
            deadline = time.monotonic() + min(max(timeout, 0.0), MAX_WAIT)
            while answer.etag == last and not self.server.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.server.wait(seen, min(remaining, RECHECK))
                seen = self.server.version()
                answer = look()
        headers = [("Content-Type", answer.content_type)]
        if answer.etag:
            headers.append(("ETag", answer.etag))
        if answer.location:
            headers.append(("Location", answer.location))
        return answer.status, headers, answer.body


class MetadataRouter:
    """169.254.169.254:80 as the nodes see it: GCE metadata under ``/computeMetadata/``,
    IMDS for everything else."""

    def __init__(self, imds: Callable[..., Any], gce: GceMetadataApp) -> None:
        self.imds = imds
        self.gce = gce

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "").startswith("/computeMetadata"):
            return self.gce(environ, start_response)
        return self.imds(environ, start_response)
