"""The control endpoint (JSON over HTTP under ``/_emulator``): the Python API for a process.

GET    /_emulator                       -> VpcInfo
POST   /_emulator/subnets               {cidr, az?}                   -> SubnetInfo
POST   /_emulator/nodes                 {instance_type?, subnet_id?, pod_cidr?} -> NodeInfo
DELETE /_emulator/nodes/<instance-id>
POST   /_emulator/faults/throttle       {action, count}
POST   /_emulator/faults/error          {action, count, status?}
POST   /_emulator/faults/latency        {action, seconds}
POST   /_emulator/faults/attach-delay   {seconds}
DELETE /_emulator/faults                (clear every fault)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from cattrs.errors import BaseValidationError

from cloud.emulator import info
from cloud.emulator.errors import EmulatorError

if TYPE_CHECKING:
    from cloud.emulator.api import Vpc

T = TypeVar("T")


class ControlApp:
    def __init__(self, vpc: Vpc) -> None:
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
        except EmulatorError as e:
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
        match method, path:
            case "GET", "":
                return ok, vpc.describe()
            case "POST", "/subnets":
                req = _load(body, info.AddSubnet)
                return ok, vpc.add_subnet(req.cidr, req.az).info()
            case "POST", "/nodes":
                node_req = _load(body, info.AddNode)
                subnet = vpc.subnet(node_req.subnet_id) if node_req.subnet_id else None
                node = vpc.add_node(node_req.instance_type, subnet, pod_cidr=node_req.pod_cidr)
                return ok, node.info()
            case "DELETE", _ if path.startswith("/nodes/"):
                vpc.remove_node(vpc.node(path.removeprefix("/nodes/")))
                return ok, {}
            case "POST", "/faults/throttle":
                t = _load(body, info.Throttle)
                faults.throttle(t.action, t.count)
            case "POST", "/faults/error":
                e = _load(body, info.ServerError)
                faults.error(e.action, e.count, e.status)
            case "POST", "/faults/latency":
                lat = _load(body, info.Latency)
                faults.latency(lat.action, lat.seconds)
            case "POST", "/faults/attach-delay":
                faults.attach_delay(_load(body, info.AttachDelay).seconds)
            case "DELETE", "/faults":
                faults.clear()
            case _:
                return "404 Not Found", {"error": f"no route {method} {path or '/'}"}
        return ok, {}


def _load(body: bytes, cls: type[T]) -> T:
    return info.converter.structure(orjson.loads(body or b"{}"), cls)
