"""The socket's methods: CNI verbs for the plugin, read and admin methods for agentctl.

This is the RPC edge: lower-layer errors are mapped to CNI codes here, once (``map_error``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import attrs

from agent import config as config_mod
from agent.checkpoint import Allocation
from agent.cni.service import CniService, map_error
from agent.cni.spec import INVALID_ENV, CniError, validate
from agent.config import Config
from agent.gc import GcService
from agent.health import Health
from agent.metrics import Metrics
from agent.snat.service import SnatService
from agent.trace import Traces, mark
from rpc.errors import RpcError
from rpc.messages import CniParams, Peer, structure, unstructure
from rpc.server import CURRENT_REQUEST

log = logging.getLogger("podwire.api")

CNI_METHODS = {
    "cni.add": "ADD",
    "cni.del": "DEL",
    "cni.check": "CHECK",
    "cni.gc": "GC",
    "cni.status": "STATUS",
}
MUTATING = frozenset({"cni.add", "cni.del", "cni.check", "cni.gc", "agent.gc", "agent.snat.set"})
UNKNOWN_METHOD = 101


def eni_row(e: Any) -> dict[str, Any]:
    return {
        "eni": e.eni_id,
        "device": e.device_index,
        "primary": e.primary,
        "no_manage": e.no_manage,
        "mac": e.mac,
        "subnet": e.subnet_id,
        "subnet_cidr": str(e.subnet_cidr),
        "primary_ip": str(e.primary_ip),
        "table": e.table,
        "ips": [str(i) for i in e.ips],
        "prefixes": [str(p) for p in e.prefixes],
    }


def pod_row(a: Allocation, now: float) -> dict[str, Any]:
    return {
        "namespace": a.pod_namespace,
        "name": a.pod_name,
        "container_id": a.container_id,
        "ifname": a.ifname,
        "network": a.network,
        "ip": str(a.ip),
        "owner": a.owner,
        "host_veth": a.host_veth,
        "netns": a.netns,
        "age_s": round(max(0.0, now - a.created_at), 1) if a.created_at else None,
        # security groups for pods: the pod's branch ENI, its set's ENI, or the shared pool
        "groups": list(a.sg.groups) if a.sg else list(a.sg_set.groups) if a.sg_set else [],
        "branch": (
            {"eni": a.sg.branch, "vlan": a.sg.vlan, "mode": a.sg.mode, "source": a.sg.source}
            if a.sg
            else None
        ),
        "set": {"source": a.sg_set.source} if a.sg_set else None,
    }


class AgentApi:
    def __init__(
        self,
        cni: CniService,
        cfg: Config,
        *,
        health: Health | None = None,
        metrics: Metrics | None = None,
        snat: SnatService | None = None,
        gc: GcService | None = None,
        provider: Any = None,
        refiller: Any = None,
        ranges: Any = None,
        kube: Any = None,
        sg: Any = None,
    ) -> None:
        self.cni = cni
        self.cfg = cfg
        self.health = health or Health()
        self.metrics = metrics or Metrics()
        self.snat = snat
        self.gc = gc
        self.provider = provider
        self.refiller = refiller
        self.ranges = ranges
        self.kube = kube
        self.sg = sg
        self.started_at = time.time()
        self.traces = Traces(observe=self.metrics.observe_phase)

    async def __call__(self, method: str, params: dict[str, Any], peer: Peer) -> Any:
        command = CNI_METHODS.get(method)
        if command is not None:
            return await self._cni(command, params)
        if method == "agent.status":
            return self.status()
        if method == "agent.pods":
            now = time.time()
            return [pod_row(a, now) for a in sorted(self.cni.pods(), key=lambda a: a.ip)]
        if method == "agent.gc":
            if self.gc is None:
                raise RpcError(UNKNOWN_METHOD, "GC is not running on this node")
            report = await self.gc.run_once(dry_run=bool(params.get("dry_run", False)))
            return {**attrs.asdict(report), "collected": report.collected}
        if method == "agent.enis":
            enis = getattr(self.provider, "enis", None)
            return [eni_row(e) for e in enis()] if enis else []
        if method == "agent.branches":
            if self.sg is None:
                return {"enabled": False, "state": "unavailable", "reason": "not the aws provider"}
            return self.sg.view(list(self.cni.pods()))
        if method == "agent.sets":
            if self.sg is None:
                return {"enabled": False, "state": "unavailable", "reason": "not the aws provider"}
            return self.sg.sets_view(list(self.cni.pods()))
        if method == "agent.snat":
            return self.snat.status() if self.snat else {"enabled": False}
        if method == "agent.snat.set":
            if self.snat is None or self.snat.backend is None:
                raise RpcError(UNKNOWN_METHOD, "SNAT is not running on this node")
            external = params.get("external")
            if not isinstance(external, bool):
                raise RpcError(6, "invalid request", 'expected {"external": true|false}')
            self.snat.set_external(external)
            return self.snat.status()
        if method == "agent.health":
            return self.health.report()
        if method == "agent.metrics":
            return self.metrics.text().decode()
        if method == "agent.pool":
            return self.pool()
        if method == "agent.kube":
            if self.kube is None:
                return {"enabled": False}
            return {"enabled": True, **self.kube.status()}
        if method == "agent.config":
            return [
                {"setting": name, "value": value, "source": source}
                for name, value, source in config_mod.effective(self.cfg)
            ]
        if method == "agent.traces":
            since = params.get("since", 0)
            return self.traces.recent(since if type(since) is int else 0)
        if method == "agent.events":
            if not params.get("follow"):
                return self.cni.events.recent()
            return self._events(bool(params.get("replay", False)))
        raise RpcError(UNKNOWN_METHOD, f"unknown method {method!r}")

    async def _cni(self, command: str, params: dict[str, Any]) -> Any:
        timing = CURRENT_REQUEST.get()
        stamps = params.get("trace")
        plugin = stamps if isinstance(stamps, list) and all(type(t) is int for t in stamps) else []
        trace = self.traces.start(command, "", plugin, timing.received if timing else None)
        if timing is not None:
            timing.on_replied = partial(self.traces.finish, trace)
        p = structure(params, CniParams)
        env = unstructure(p.env)
        started = time.perf_counter()
        cid, ifname = env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", "")
        key = trace.key = f"{p.config.get('name', '')}/{cid}/{ifname}"
        try:
            if env.get("CNI_COMMAND") != command:
                raise CniError(
                    INVALID_ENV, f"CNI_COMMAND {env.get('CNI_COMMAND')!r} does not match {command}"
                )
            req = validate(env, p.config)
            mark("validate")
            if command == "ADD":
                result: Any = await self.cni.add(req)
            elif command == "DEL":
                await self.cni.delete(req)
                result = None
            elif command == "CHECK":
                await self.cni.check(req)
                result = None
            elif command == "GC":
                await self.cni.gc(req)
                result = None
            else:
                self.cni.status()
                result = None
        except Exception as e:
            err = map_error(e)
            trace.code = err.code
            self.metrics.observe_cni(command, err.code, time.perf_counter() - started)
            log.warning(
                f"{command} failed",
                extra={
                    "key": key,
                    "code": err.code,
                    "error": err.msg,
                    "details": err.details,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
            raise RpcError(err.code, err.msg, err.details) from None
        done = partial(self._succeeded, command, key, time.perf_counter() - started)
        if timing is None:
            done()
        else:  # once the reply is on its way: the runtime need not wait for the log line
            timing.on_replied = _and_then(timing.on_replied, done)
        return result

    def _succeeded(self, command: str, key: str, elapsed: float) -> None:
        self.metrics.observe_cni(command, 0, elapsed)
        log.info(command, extra={"key": key, "duration_ms": round(elapsed * 1000, 2)})

    def status(self) -> dict[str, Any]:
        pool = self.cni.pool
        now = self.cni.clock()
        available = pool.available(now)  # first: it moves addresses whose cooldown ended
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "ready": self.cni.ready,
            "provider": self.cni.provider.name,
            "socket": self.cfg.agent.socket,
            "pods": len(self.cni.allocations),
            "pool": {
                "total": pool.total,
                "assigned": pool.assigned,
                "cooling": pool.cooling,
                "available": available,
                "cooldown_s": pool.cooldown,
                "withdrawn_in_use": len(pool.withdrawn_in_use()),
            },
            "checkpoint": {
                "path": str(self.cni.checkpoint.path),
                "writes": self.cni.checkpoint.writes,
            },
            "deletions": {"rounds": self.cni.deleter.rounds, "links": self.cni.deleter.links},
            "snat": self.snat.status() if self.snat else {"enabled": False},
            "security_groups": self.sg.status() if self.sg else {"enabled": False},
        }

    def pool(self) -> dict[str, Any]:
        now = self.cni.clock()
        owners = [
            {
                "owner": c.owner,
                "table": self.cni.pool.table_of(c.owner),
                "total": c.total,
                "assigned": c.assigned,
                "cooling": c.cooling,
                "free": c.total - c.assigned - c.cooling,
            }
            for c in self.cni.pool.owner_counts(now)
        ]
        out: dict[str, Any] = {
            "provider": self.cni.provider.name,
            "cooldown_s": self.cni.pool.cooldown,
            "owners": owners,
        }
        if self.refiller is not None:
            out["refiller"] = attrs.asdict(self.refiller.status())
            out["targets"] = attrs.asdict(self.refiller.targets)
        # addresses that left the node's ranges while a pod holds them (never handed out again)
        out["withdrawn_in_use"] = [
            {"ip": str(ip), "key": str(k)}
            for ip, k in sorted(self.cni.pool.withdrawn_in_use().items())
        ]
        if self.ranges is not None:
            out["ranges"] = self.ranges.status()
        status = getattr(self.provider, "status", None)
        if callable(status):
            out["provider_status"] = status()
        return out

    async def _events(self, replay: bool) -> AsyncIterator[dict[str, Any]]:
        async with self.cni.events.subscribe(replay=replay) as events:
            async for event in events:
                yield event


def _and_then(
    first: Callable[[int], None] | None, then: Callable[[], None]
) -> Callable[[int], None]:
    """``first(at)`` (when there is one), then ``then()``."""

    def both(at: int) -> None:
        if first is not None:
            first(at)
        then()

    return both
