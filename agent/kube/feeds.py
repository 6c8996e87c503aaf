"""Wiring the agent's view of the cluster into security groups for pods beyond ADD (which
``agent.sg.kube.KubeGroups`` serves): live changes of running pods (``agent.sg.live``), and
Kubernetes events on the pods they concern."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import anyio.abc
import attrs
from prometheus_client import Counter, Gauge

from agent.events import EventBus
from agent.health import Health
from agent.kube.service import KubeService
from agent.sg.annotations import ANNOTATIONS, AnnotationError
from agent.sg.branches import BranchError
from agent.sg.live import LiveGroups, Retarget
from agent.sg.policy import Decision, PodIdentity, decide
from cloud.kube.errors import KubeError

log = logging.getLogger("podwire.kube")


class PodEvents:
    """Kubernetes events (core/v1) on this node's pods; failures are logged, never raised."""

    def __init__(self, client: Any, kube: KubeService, component: str = "podwire-agent") -> None:
        self.client = client
        self.kube = kube
        self.component = component
        self.posted = 0
        self.failed = 0

    async def __call__(self, pod: str, reason: str, message: str, type: str) -> None:
        from cloud.kube.client import EVENTS

        ns, _, name = pod.partition("/")
        info = self.kube.pod(ns, name)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{name}."},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": ns,
                "name": name,
                "uid": info.uid if info is not None else "",
            },
            "reason": reason,
            "message": message[:1024],
            "type": type,
            "source": {"component": self.component, "host": self.kube.node_name},
            "reportingComponent": f"podwire.io/{self.component}",
            "reportingInstance": self.kube.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.client.create(EVENTS, event, namespace=ns)
            self.posted += 1
        except KubeError as e:
            self.failed += 1
            log.warning("could not post a Kubernetes event", extra={"pod": pod, "error": str(e)})


async def start_live_groups(
    tg: anyio.abc.TaskGroup,
    health: Health,
    *,
    cni: Any,
    sg: Any,
    kube: KubeService,
    client: Any,
    registry: Any,
    events: EventBus,
) -> LiveGroups:
    """Run live changes of running pods' groups (``agent.sg.live``) from now on."""
    outcomes = Counter(
        "podwire_sg_live_changes",
        "Running pods whose resolved security groups changed, by outcome (applied: the branch "
        "got them in place; restart_to_apply: the pod cannot take them in place; failed).",
        ("outcome",),
        registry=registry,
    )
    for o in ("applied", "restart_to_apply", "failed"):
        outcomes.labels(o)

    def resolve(identity: PodIdentity | None) -> Decision | None:
        if identity is None:
            return None
        try:
            return decide(identity, sg.policies.policies(identity.namespace))
        except AnnotationError:
            return None  # an unusable annotation: reported at the pod's ADD, not here

    def identity(namespace: str, name: str) -> PodIdentity | None:
        return cached_identity(kube, sg.policies.policies(namespace), namespace, name)

    async def retarget(key: str, new: tuple[str, ...]) -> Any:
        if sg.manager is None:
            raise BranchError("branch ENIs not ready")
        return await sg.manager.retarget(key, new)

    async def update(key: str, action: Retarget) -> bool:
        for a in list(cni.allocations.values()):
            if str(a.key) != key:
                continue
            async with cni.locks.hold(a.key):
                now = cni.allocations.get(a.key)
                if now is None or now.sg is None:
                    return False
                cni.allocations[a.key] = attrs.evolve(
                    now,
                    sg=attrs.evolve(
                        now.sg, groups=action.new, policies=action.policies, source=action.source
                    ),
                )
                await cni.checkpoint.commit()
            return True
        return False

    live = LiveGroups(
        allocations=lambda: list(cni.allocations.values()),
        resolve=resolve,
        identity=identity,
        retarget=retarget,
        update=update,
        announce=PodEvents(client, kube),
        events=events,
        on_outcome=lambda o: outcomes.labels(o).inc(),
    )
    pending = Gauge(
        "podwire_sg_restart_to_apply",
        "Running pods whose resolved security groups they can only get by a restart.",
        registry=registry,
    )
    pending.set_function(lambda: float(len(live.pending)))
    kube.subscribe(live.wake)
    await tg.start(health.run, "sg-live", live.run)
    live.wake()  # one pass at start: pods restored from the checkpoint may be out of date
    return live


def cached_identity(
    kube: KubeService, policies: Any, namespace: str, name: str
) -> PodIdentity | None:
    """A running pod as the matcher sees it, from the cache alone; None when the cache cannot
    tell (the pod not in it, or the service accounts a policy selects by not listed): an
    incomplete view never changes a running pod."""
    pod = kube.pod(namespace, name)
    if pod is None:
        return None
    sa_labels: Any = {}
    if any(p.usable and p.service_account_selector is not None for p in policies):
        if not kube.service_accounts_known(namespace):
            return None
        account = kube.service_account(namespace, pod.service_account)
        sa_labels = dict(account.labels) if account is not None else {}
    return PodIdentity(
        namespace=namespace,
        name=name,
        labels=dict(pod.labels),
        service_account_labels=sa_labels,
        annotations={k: v for k, v in pod.annotations.items() if k in ANNOTATIONS},
    )
