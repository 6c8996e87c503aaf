"""The control endpoint (JSON over HTTP under ``/_emulator``): the Python API for a process.

GET    /_emulator                         -> VpcInfo
POST   /_emulator/subnets                 {cidr, az?}                           -> SubnetInfo
POST   /_emulator/nodes                   {instance_type?, subnet_id?, pod_cidr?,
                                           security_groups?}                    -> NodeInfo
DELETE /_emulator/nodes/<instance-id>
POST   /_emulator/instances               {instance_type?, subnet_id?, security_groups?}
                                                                                -> InstanceInfo
DELETE /_emulator/instances/<instance-id>
POST   /_emulator/instances/<id>/serve    {port, protocol?}  (an echo service in the instance)
PUT    /_emulator/nodes/<id>/alias-ranges {cidrs}  (GCE alias IP ranges)    -> AliasRanges
POST   /_emulator/faults/gce-metadata     {down?}  (503 on every GCE metadata request)
GET    /_emulator/drops                   -> {eni-id: Drops} (every ENI on the wire)
GET    /_emulator/drops/<eni-id>          -> Drops (all zero for an ENI not on the wire)
POST   /_emulator/faults/throttle         {action, count}
POST   /_emulator/faults/error            {action, count, status?}
POST   /_emulator/faults/latency          {action, seconds}
POST   /_emulator/faults/attach-delay     {seconds}
DELETE /_emulator/faults                  (clear every fault)

Faults are keyed by EC2 action name (``AssociateTrunkInterface``, ``AuthorizeSecurityGroup
Ingress``, ...): every action the API serves can be throttled, failed or slowed. The app talks
to the emulator through ``VpcControl`` only (``api`` provides it), so it imports no part of the
Python API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import orjson
from cattrs.errors import BaseValidationError

from cloud.emulator import info
from cloud.emulator.errors import EmulatorError
from cloud.emulator.faults import FaultPlan

T = TypeVar("T")


class VpcControl(Protocol):
    """What the control endpoint may do to a running emulator, in the endpoint's own terms.

    Lookups of unknown ids raise KeyError (answered 404).
    """

    @property
    def faults(self) -> FaultPlan: ...

    def describe(self) -> info.VpcInfo: ...

    def add_subnet(self, req: info.AddSubnet) -> info.SubnetInfo: ...

    def add_node(self, req: info.AddNode) -> info.NodeInfo: ...

    def remove_node(self, instance_id: str) -> None: ...

    def add_instance(self, req: info.AddInstance) -> info.InstanceInfo: ...

    def remove_instance(self, instance_id: str) -> None: ...

    def serve(self, instance_id: str, req: info.Serve) -> None: ...

    def set_alias_ranges(self, instance_id: str, req: info.SetAliasRanges) -> info.AliasRanges: ...

    def set_gce_metadata_down(self, req: info.GceMetadataFault) -> None: ...
    def drops(self) -> dict[str, info.Drops]: ...


class ControlApp:
    def __init__(self, vpc: VpcControl) -> None:
        self.vpc = vpc

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "").removeprefix("/_emulator").rstrip("/")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b"{}"
        try:
            status, result = self._route(method, path, body)
        except (BaseValidationError, orjson.JSONDecodeError, ValueError) as e:
            status, result = "400 Bad Request", {"error": str(e)}
        except KeyError as e:
            status, result = "404 Not Found", {"error": f"no such id: {e.args[0]}"}
        except (EmulatorError, RuntimeError) as e:
            status, result = "500 Internal Server Error", {"error": str(e)}
        except Exception as e:  # moto's EC2 errors (bad subnet id, limits) reach us here
            status, result = "400 Bad Request", {"error": f"{type(e).__name__}: {e}"}
        payload = info.converter.dumps(result)
        start_response(
            status,
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
        )
        return [payload]

    def _route(self, method: str, path: str, body: bytes) -> tuple[str, Any]:
        vpc, faults = self.vpc, self.vpc.faults
        ok = "200 OK"
        parts = path.split("/")[1:]
        match method, parts:
            case "GET", []:
                return ok, vpc.describe()
            case "POST", ["subnets"]:
                return ok, vpc.add_subnet(_load(body, info.AddSubnet))
            case "POST", ["nodes"]:
                return ok, vpc.add_node(_load(body, info.AddNode))
            case "DELETE", ["nodes", instance_id]:
                vpc.remove_node(instance_id)
            case "POST", ["instances"]:
                return ok, vpc.add_instance(_load(body, info.AddInstance))
            case "DELETE", ["instances", instance_id]:
                vpc.remove_instance(instance_id)
            case "POST", ["instances", instance_id, "serve"]:
                vpc.serve(instance_id, _load(body, info.Serve))
            case "PUT", ["nodes", instance_id, "alias-ranges"]:
                return ok, vpc.set_alias_ranges(instance_id, _load(body, info.SetAliasRanges))
            case "POST", ["faults", "gce-metadata"]:
                vpc.set_gce_metadata_down(_load(body, info.GceMetadataFault))
            case "GET", ["drops"]:
                return ok, vpc.drops()
            case "GET", ["drops", eni_id]:
                return ok, vpc.drops().get(eni_id, info.Drops())
            case "POST", ["faults", "throttle"]:
                t = _load(body, info.Throttle)
                faults.throttle(t.action, t.count)
            case "POST", ["faults", "error"]:
                e = _load(body, info.ServerError)
                faults.error(e.action, e.count, e.status)
            case "POST", ["faults", "latency"]:
                lat = _load(body, info.Latency)
                faults.latency(lat.action, lat.seconds)
            case "POST", ["faults", "attach-delay"]:
                faults.attach_delay(_load(body, info.AttachDelay).seconds)
            case "DELETE", ["faults"]:
                faults.clear()
            case _:
                return "404 Not Found", {"error": f"no route {method} {path or '/'}"}
        return ok, {}


def _load(body: bytes, cls: type[T]) -> T:
    return info.converter.structure(orjson.loads(body or b"{}"), cls)
