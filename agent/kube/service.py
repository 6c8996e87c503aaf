"""The agent's view of its cluster: the reflectors of ``cloud.kube`` for what the node needs.

Theory of operation. One ``KubeService`` per agent, started before state is restored (a static
provider that takes its pod CIDRs from the Node needs them first). It runs:

* its node's pods (field selector ``spec.nodeName``): labels, annotations, service account, the
  ``vpc.amazonaws.com/pod-eni`` request, for the pods whose ADD asks and for live changes;
* its Node (field selector ``metadata.name``): ``spec.podCIDRs``, the static provider's source;
* with security groups for pods: every SecurityGroupPolicy (the policies of any namespace may
  select a pod of this node), and the ServiceAccounts of exactly the namespaces where a policy
  has a ``serviceAccountSelector`` (a reflector per namespace, started and stopped as policies
  come and go).

Every reflector keeps serving its last complete view while the API server cannot be reached;
``connected`` and ``synced`` say how fresh that view is, and readers decide what a stale view
is good for (an ordinary pod needs nothing from it; a pod a policy may select needs its labels).
Readers learn of changes through ``subscribe``: the callback gets the collection's name and its
changes, synchronously, as they are applied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc
import attrs

from agent.events import EventBus
from cloud.kube.objects import NodeInfo, PodInfo, PolicyObject, ServiceAccountInfo
from cloud.kube.reflector import ListWatch, Reflector
from cloud.kube.store import Change, Object, Store

log = logging.getLogger("podwire.kube")

PODS, NODE, POLICIES, SERVICE_ACCOUNTS = "pods", "node", "securitygrouppolicies", "serviceaccounts"

T = TypeVar("T", bound=Object)
Listener = Callable[[str, list[Change[Any]]], None]


class Collections(Protocol):
    """Where the service gets its ``ListWatch``es (``cloud.kube.client.KubeClient`` through
    ``KubeCollections``; an in-memory API in tests)."""

    def pods(self, node: str) -> ListWatch[PodInfo]: ...
    def node(self, node: str) -> ListWatch[NodeInfo]: ...
    def policies(self) -> ListWatch[PolicyObject]: ...
    def service_accounts(self, namespace: str) -> ListWatch[ServiceAccountInfo]: ...


def _pod_same(a: PodInfo, b: PodInfo) -> bool:
    # a pod's status changes all the time (conditions, container states): only what readers
    # look at counts as a change
    return a == b or (
        a.labels == b.labels
        and a.annotations == b.annotations
        and a.service_account == b.service_account
        and a.phase == b.phase
        and a.pod_ip == b.pod_ip
        and a.deleting == b.deleting
        and a.requests_pod_eni == b.requests_pod_eni
        and a.node_name == b.node_name
    )


def _same_but_version(a: Any, b: Any) -> bool:
    return bool(attrs.evolve(a, resource_version="") == attrs.evolve(b, resource_version=""))


class KubeService:
    """See the module docstring. ``policies=False`` (security groups off) watches neither
    SecurityGroupPolicy objects nor ServiceAccounts."""

    def __init__(
        self,
        collections: Collections,
        node_name: str,
        *,
        policies: bool = True,
        node: bool = True,
        session: float = 300.0,
        retry_base: float = 1.0,
        retry_cap: float = 30.0,
        wall: Callable[[], float] = time.time,
        events: EventBus | None = None,
    ) -> None:
        self.collections = collections
        self.events = events or EventBus()
        self.node_name = node_name
        self.watch_policies = policies
        self.watch_node = node
        self._opts: dict[str, Any] = {
            "session": session,
            "retry_base": retry_base,
            "retry_cap": retry_cap,
            "wall": wall,
        }
        self._listeners: list[Listener] = []
        self.pods: Reflector[PodInfo] = self._reflector(
            PODS, collections.pods(node_name), Store(same=_pod_same)
        )
        self.node: Reflector[NodeInfo] | None = None
        if node:
            self.node = self._reflector(
                NODE, collections.node(node_name), Store(same=_same_but_version)
            )
        self.policies: Reflector[PolicyObject] | None = None
        if policies:
            self.policies = self._reflector(
                POLICIES, collections.policies(), Store(same=_same_but_version)
            )
        self.service_accounts: dict[str, Reflector[ServiceAccountInfo]] = {}
        self._sa_scopes: dict[str, anyio.CancelScope] = {}
        self._sa_wanted_changed = anyio.Event()
        self._changed = anyio.Event()
        # more of ``agentctl kube`` from those who use the view (the live security groups)
        self.extra_status: dict[str, Callable[[], Any]] = {}

    def __repr__(self) -> str:
        parts = [repr(r) for r in self.reflectors()]
        return f"<KubeService node={self.node_name} {' '.join(parts)}>"

    def _reflector(self, name: str, source: ListWatch[T], store: Store[T]) -> Reflector[T]:
        return Reflector(name, source, store, on_change=self._on_change, **self._opts)

    def reflectors(self) -> list[Reflector[Any]]:
        out: list[Reflector[Any]] = [self.pods]
        if self.node is not None:
            out.append(self.node)
        if self.policies is not None:
            out.append(self.policies)
        out.extend(self.service_accounts.values())
        return out

    # -- changes ----------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(collection, changes)`` for every batch of changes from now on."""
        self._listeners.append(listener)

    def _on_change(self, reflector: Reflector[Any], changes: list[Change[Any]]) -> None:
        name = SERVICE_ACCOUNTS if reflector.name.startswith(SERVICE_ACCOUNTS) else reflector.name
        if name == POLICIES:
            self._sa_wanted_changed.set()
        event, self._changed = self._changed, anyio.Event()
        event.set()
        if name in (PODS, NODE):
            for c in changes:
                obj = c.new if c.new is not None else c.old
                self.events.publish(
                    f"kube.{name.rstrip('s')}",
                    change=c.kind.value,
                    name="/".join(p for p in c.key if p),
                    uid=getattr(obj, "uid", ""),
                )
        for listener in list(self._listeners):
            try:
                listener(name, changes)
            except Exception:
                log.exception("kubernetes change listener failed", extra={"collection": name})

    async def changed(self) -> None:
        """Wait for the next change of anything watched."""
        await self._changed.wait()

    # -- running ----------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[KubeService] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every reflector until cancelled; started at once (views fill as lists land)."""
        async with anyio.create_task_group() as tg:
            for r in self.reflectors():
                await tg.start(r.run)
            if self.policies is not None:
                tg.start_soon(self._follow_service_account_namespaces, tg)
            task_status.started(self)

    def wanted_sa_namespaces(self) -> set[str]:
        """The namespaces whose ServiceAccounts some policy's selector needs."""
        if self.policies is None:
            return set()
        return {p.namespace for p in self.policies.store if p.service_account_selector is not None}

    async def _follow_service_account_namespaces(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            wanted = self.wanted_sa_namespaces()
            for ns in sorted(set(self.service_accounts) - wanted):
                self._sa_scopes.pop(ns).cancel()
                del self.service_accounts[ns]
                log.info("stopped watching service accounts", extra={"namespace": ns})
            for ns in sorted(wanted - set(self.service_accounts)):
                r = self._reflector(
                    f"{SERVICE_ACCOUNTS}/{ns}",
                    self.collections.service_accounts(ns),
                    Store(same=_same_but_version),
                )
                self.service_accounts[ns] = r
                scope = anyio.CancelScope()
                self._sa_scopes[ns] = scope
                await tg.start(_run_in_scope, scope, r)
                log.info("watching service accounts", extra={"namespace": ns})
            await self._sa_wanted_changed.wait()
            self._sa_wanted_changed = anyio.Event()

    # -- reads ------------------------------------------------------------------------------------

    def pod(self, namespace: str, name: str) -> PodInfo | None:
        return self.pods.store.get((namespace, name))

    async def wait_pod(self, namespace: str, name: str, uid: str, timeout: float) -> PodInfo | None:
        """The pod (with ``uid`` when given) once the cache has it; None after ``timeout``, or
        at once while the pods' watch is not connected (nothing new can arrive)."""
        with anyio.move_on_after(timeout):
            while True:
                pod = self.pod(namespace, name)
                if pod is not None and (not uid or pod.uid == uid):
                    return pod
                if not self.pods.status.connected:
                    return None
                await self.changed()
        return None

    def node_info(self) -> NodeInfo | None:
        if self.node is None:
            return None
        return self.node.store.get(("", self.node_name))

    def policies_of(self, namespace: str) -> list[PolicyObject]:
        if self.policies is None:
            return []
        return sorted(
            (p for p in self.policies.store if p.namespace == namespace), key=lambda p: p.name
        )

    def service_account(self, namespace: str, name: str) -> ServiceAccountInfo | None:
        r = self.service_accounts.get(namespace)
        return None if r is None else r.store.get((namespace, name))

    def service_accounts_known(self, namespace: str) -> bool:
        r = self.service_accounts.get(namespace)
        return r is not None and r.status.synced

    def status(self) -> dict[str, Any]:
        """``agentctl kube``: every watch, its state and counts."""
        return {
            "node": self.node_name,
            "watches": [r.status.as_dict() for r in self.reflectors()],
            "pods": sorted(f"{p.namespace}/{p.name}" for p in self.pods.store),
            **{name: status() for name, status in self.extra_status.items()},
        }


async def _run_in_scope(
    scope: anyio.CancelScope,
    r: Reflector[Any],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        task_status.started()
        await r.run()
