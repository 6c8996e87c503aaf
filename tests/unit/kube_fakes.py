"""An in-memory Kubernetes API for the reflector and the agent's Kubernetes service: objects
with a global resourceVersion counter, a bounded event history (older resourceVersions get 410
Gone, as after a compaction), watches that block for new events, and faults (the server down,
every open watch cut)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
import attrs

from cloud.kube.errors import Expired, KubeUnavailable
from cloud.kube.objects import NodeInfo, PodInfo, PolicyObject, ServiceAccountInfo
from cloud.kube.store import EventType, Object, WatchEvent

T = TypeVar("T", bound=Object)


class FakeCollection(Generic[T]):
    """One collection of the fake API (``ListWatch``), with its own history window."""

    def __init__(self, api: FakeApi, select: Callable[[Any], bool] = lambda o: True) -> None:
        self.api = api
        self.select = select
        self.lists = 0
        self.watches = 0
        self.watch_from: list[str] = []

    async def list(self) -> tuple[Sequence[T], str]:
        await anyio.sleep(self.api.latency)
        self.api.check_up("list")
        self.lists += 1
        objs = [o for o in self.api.objects.values() if self.select(o)]
        return objs, str(self.api.rv)

    async def watch(
        self, resource_version: str, timeout: int = 300
    ) -> AsyncGenerator[WatchEvent[T], None]:
        self.api.check_up("watch")
        self.watches += 1
        self.watch_from.append(resource_version)
        since = int(resource_version or 0)
        if since < self.api.oldest:
            raise Expired("watch", f"too old resource version: {since} ({self.api.oldest})")
        epoch = self.api.cuts
        ends = anyio.current_time() + timeout  # the server ends the request then
        while anyio.current_time() < ends:
            for rv, etype, obj in list(self.api.history):
                if rv > since and (etype is EventType.BOOKMARK or self.select(obj)):
                    since = rv
                    yield WatchEvent(type=etype, obj=obj, resource_version=str(rv))
            if self.api.cuts != epoch:
                raise KubeUnavailable("watch", "connection reset")
            if since < self.api.oldest:
                raise Expired("watch", "too old resource version")
            with anyio.move_on_after(ends - anyio.current_time()):
                await self.api.wait_change()


class FakeApi:
    """See the module docstring; objects are keyed (namespace, name)."""

    def __init__(self, *, history: int = 1000) -> None:
        self.rv = 1
        self.objects: dict[tuple[str, str], Any] = {}
        self.history: list[tuple[int, EventType, Any]] = []
        self.window = history
        self.oldest = 0  # the first resourceVersion still watchable from
        self.down = False
        self.cuts = 0
        self.latency = 0.0
        self._changed = anyio.Event()

    def check_up(self, what: str) -> None:
        if self.down:
            raise KubeUnavailable(what, "ConnectError: connection refused")

    async def wait_change(self) -> None:
        await self._changed.wait()

    def _bump(self) -> None:
        event, self._changed = self._changed, anyio.Event()
        event.set()

    def _record(self, etype: EventType, obj: Any) -> None:
        self.history.append((self.rv, etype, obj))
        if len(self.history) > self.window:
            drop = self.history[: len(self.history) - self.window]
            self.history = self.history[len(drop) :]
            self.oldest = drop[-1][0]
        self._bump()

    def put(self, obj: Any) -> Any:
        """Create or update ``obj`` (an attrs object with key/uid/resource_version)."""
        self.rv += 1
        obj = attrs.evolve(obj, resource_version=str(self.rv))
        etype = EventType.MODIFIED if obj.key in self.objects else EventType.ADDED
        self.objects[obj.key] = obj
        self._record(etype, obj)
        return obj

    def delete(self, key: tuple[str, str]) -> None:
        self.rv += 1
        obj = attrs.evolve(self.objects.pop(key), resource_version=str(self.rv))
        self._record(EventType.DELETED, obj)

    def bookmark(self) -> None:
        self._record(EventType.BOOKMARK, None)

    def compact(self) -> None:
        """Forget all history: any watch from an older resourceVersion gets 410 Gone."""
        self.history.clear()
        self.oldest = self.rv
        self._bump()

    def cut(self) -> None:
        """Reset every open watch connection."""
        self.cuts += 1
        self._bump()


def pod(name: str, ns: str = "default", *, node: str = "n1", uid: str = "", **kw: Any) -> PodInfo:
    return PodInfo(
        namespace=ns, name=name, uid=uid or f"uid-{name}", resource_version="", node_name=node, **kw
    )


def node(name: str = "n1", cidrs: Sequence[str] = (), uid: str = "") -> NodeInfo:
    from ipaddress import IPv4Network

    return NodeInfo(
        name=name,
        uid=uid or f"uid-{name}",
        resource_version="",
        pod_cidrs=tuple(IPv4Network(c) for c in cidrs),
    )


def policy(name: str, ns: str = "default", groups: Sequence[str] = ("sg-1",), **kw: Any) -> Any:
    return PolicyObject(
        namespace=ns,
        name=name,
        uid=f"uid-{name}",
        resource_version="",
        group_ids=tuple(groups),
        **kw,
    )


def service_account(name: str, ns: str = "default", **labels: str) -> ServiceAccountInfo:
    return ServiceAccountInfo(
        namespace=ns, name=name, uid=f"uid-sa-{name}", resource_version="", labels=labels
    )


class FakeCollections:
    """``agent.kube.service.Collections`` over one FakeApi per kind."""

    def __init__(self) -> None:
        self.pods_api, self.nodes_api = FakeApi(), FakeApi()
        self.policies_api, self.sa_api = FakeApi(), FakeApi()
        self.made: dict[str, FakeCollection[Any]] = {}

    def pods(self, node_name: str) -> FakeCollection[PodInfo]:
        c: FakeCollection[PodInfo] = FakeCollection(
            self.pods_api, lambda o: o.node_name == node_name
        )
        self.made["pods"] = c
        return c

    def node(self, node_name: str) -> FakeCollection[NodeInfo]:
        c: FakeCollection[NodeInfo] = FakeCollection(self.nodes_api, lambda o: o.name == node_name)
        self.made["node"] = c
        return c

    def policies(self) -> FakeCollection[PolicyObject]:
        c: FakeCollection[PolicyObject] = FakeCollection(self.policies_api)
        self.made["policies"] = c
        return c

    def service_accounts(self, namespace: str) -> FakeCollection[ServiceAccountInfo]:
        c: FakeCollection[ServiceAccountInfo] = FakeCollection(
            self.sa_api, lambda o: o.namespace == namespace
        )
        self.made[f"sa/{namespace}"] = c
        return c
