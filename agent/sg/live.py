"""Live changes of running pods' security groups: what EKS cannot do.

Theory of operation. EKS decides a pod's groups once, when its branch is made; editing a
SecurityGroupPolicy (or the pod's annotation) never reaches a running pod (Amazon's resource
controller issues #11 and #373, VPC CNI #1532). Here, whenever the agent's view of the cluster
changes, ``plan`` compares, for every pod the node runs, the groups it runs with against the
groups the cluster now resolves for it, and says what to do:

* ``Retarget`` — an agent-made branch whose resolved groups differ: its branch gets exactly the
  new set with ModifyNetworkInterfaceAttribute, at once. Connections the VPC already tracks
  keep their old verdict until they idle out (EC2's semantics for any rule change); new ones
  are judged by the new groups.
* ``RestartToApply`` — a change the pod's wiring cannot take in place: an ordinary pod (on the
  shared pool) that now has groups, a branch pod that no longer has any (it keeps its branch),
  a pod whose branch EKS's controller made (its groups are EKS's), a change between EKS's
  annotation and agent-made groups, any change of an eni-mode pod's set (its address is on the
  set's ENI, shared with the set's other pods: another set is another ENI). Reported
  (``agentctl kube``, an event on the pod, a metric) until the pod is restarted or the cluster
  changes back.
* nothing — in sync, or the cache cannot tell (the pod not in it, a service account not
  listed): an incomplete view never changes a running pod.

``plan`` is pure; ``LiveGroups`` carries it out under each pod's key lock, records the new
groups in the pod's allocation and branch record (checkpointed), and reports every outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

import anyio
import anyio.abc
import attrs

from agent.checkpoint import Allocation
from agent.events import EventBus
from agent.sg.branches import BranchError
from agent.sg.policy import Decision, PodIdentity, Source
from cloud.errors import CloudError

log = logging.getLogger("podwire.sg.live")

RESTART = "restart to apply"


@attrs.frozen(kw_only=True)
class Running:
    """A pod as it runs: ``source`` none (shared pool), eks, annotation or policy."""

    key: str
    pod: str  # namespace/name
    source: str
    groups: tuple[str, ...] = ()
    branch: str = ""
    on_set: bool = False  # eni mode: its address is on its set's ENI, not a branch of its own


@attrs.frozen(kw_only=True)
class Retarget:
    key: str
    pod: str
    branch: str
    old: tuple[str, ...]
    new: tuple[str, ...]
    source: str  # where the new groups come from (annotation, policy)
    policies: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class RestartToApply:
    key: str
    pod: str
    running: tuple[str, ...]
    resolved: tuple[str, ...]
    reason: str


Action = Retarget | RestartToApply


def running_of(a: Allocation) -> Running:
    pod = f"{a.pod_namespace}/{a.pod_name}"
    if a.sg_set is not None:
        return Running(
            key=str(a.key), pod=pod, source=a.sg_set.source, groups=a.sg_set.groups, on_set=True
        )
    if a.sg is None:
        return Running(key=str(a.key), pod=pod, source="none")
    return Running(
        key=str(a.key), pod=pod, source=a.sg.source, groups=a.sg.groups, branch=a.sg.branch
    )


def _shown(d: Decision) -> tuple[str, ...]:
    if d.source is Source.EKS:
        assert d.branch is not None
        return (f"{d.branch.eni_id} (EKS)",)
    return d.groups


def plan(running: Iterable[Running], resolved: Mapping[str, Decision | None]) -> list[Action]:
    """What to do for each running pod (see the module docstring); ``resolved`` maps a pod's
    key to the decision the cluster now gives (None: cannot tell)."""
    out: list[Action] = []
    for r in running:
        d = resolved.get(r.key)
        if d is None:
            continue
        running_shown = (f"{r.branch} (EKS)",) if r.source == "eks" else r.groups
        if r.on_set:
            same = d.source in (Source.ANNOTATION, Source.POLICY) and set(d.groups) == set(r.groups)
            if not same:
                out.append(
                    RestartToApply(
                        key=r.key,
                        pod=r.pod,
                        running=r.groups,
                        resolved=_shown(d) if d.wants_branch else (),
                        reason=(
                            "eni mode: its address is on the ENI of its set of groups; "
                            "another set is another ENI"
                            if d.wants_branch
                            else "no longer selected: it keeps its set's ENI until restarted"
                        ),
                    )
                )
            continue
        if r.source == "none":
            if d.wants_branch:
                out.append(
                    RestartToApply(
                        key=r.key,
                        pod=r.pod,
                        running=(),
                        resolved=_shown(d),
                        reason="on the shared pool: a branch ENI needs a new sandbox",
                    )
                )
            continue
        if r.source == "eks":
            same = d.source is Source.EKS and d.branch is not None and d.branch.eni_id == r.branch
            if not same:
                out.append(
                    RestartToApply(
                        key=r.key,
                        pod=r.pod,
                        running=running_shown,
                        resolved=_shown(d) if d.wants_branch else (),
                        reason="its branch ENI is EKS's resource controller's",
                    )
                )
            continue
        # an agent-made branch
        if d.source is Source.NONE:
            out.append(
                RestartToApply(
                    key=r.key,
                    pod=r.pod,
                    running=r.groups,
                    resolved=(),
                    reason="no longer selected: it keeps its branch ENI until restarted",
                )
            )
        elif d.source is Source.EKS:
            out.append(
                RestartToApply(
                    key=r.key,
                    pod=r.pod,
                    running=r.groups,
                    resolved=_shown(d),
                    reason="EKS's resource controller made it another branch ENI",
                )
            )
        elif d.groups != r.groups:
            out.append(
                Retarget(
                    key=r.key,
                    pod=r.pod,
                    branch=r.branch,
                    old=r.groups,
                    new=d.groups,
                    source=d.source.value,
                    policies=d.policies,
                )
            )
    return out


class LiveGroups:
    """Carries out ``plan`` whenever ``wake`` is called (the Kubernetes service's changes).

    ``allocations`` gives the node's pods; ``resolve(namespace, name)`` what the cluster now
    gives one (None: cannot tell); ``retarget(key, groups)`` changes a branch's groups (the
    branch manager); ``update(key, change)`` records it in the pod's allocation and commits;
    ``announce(pod, reason, message, type)`` posts a Kubernetes event on the pod."""

    def __init__(
        self,
        *,
        allocations: Callable[[], Iterable[Allocation]],
        resolve: Callable[[PodIdentity | None], Decision | None],
        identity: Callable[[str, str], PodIdentity | None],
        retarget: Callable[[str, tuple[str, ...]], Awaitable[Any]],
        update: Callable[[str, Retarget], Awaitable[bool]],
        announce: Callable[[str, str, str, str], Coroutine[Any, Any, None]] | None = None,
        events: EventBus | None = None,
        on_outcome: Callable[[str], None] = lambda outcome: None,
        debounce: float = 0.2,
        retry: float = 30.0,
    ) -> None:
        self.allocations = allocations
        self.resolve = resolve
        self.identity = identity
        self.retarget = retarget
        self.update = update
        self.announce = announce
        self.events = events or EventBus()
        self.on_outcome = on_outcome
        self.debounce = debounce
        self.retry = retry
        self.pending: dict[str, RestartToApply] = {}
        self.failed: dict[str, tuple[Retarget, str]] = {}
        self.applied = 0
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return (
            f"<LiveGroups applied={self.applied} restart_to_apply={len(self.pending)} "
            f"failed={len(self.failed)}>"
        )

    def wake(self, *_: Any) -> None:
        self._wake.set()

    def resolved(self) -> dict[str, Decision | None]:
        out: dict[str, Decision | None] = {}
        for a in self.allocations():
            if not a.pod_name:
                continue  # not a Kubernetes pod (no K8S_POD_NAME): nothing to resolve
            out[str(a.key)] = self.resolve(self.identity(a.pod_namespace, a.pod_name))
        return out

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[LiveGroups] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started(self)
            while True:
                with anyio.move_on_after(self.retry if self.failed else None):
                    await self._wake.wait()
                self._wake = anyio.Event()
                await anyio.sleep(self.debounce)  # a burst of changes is one pass
                await self.once()

    async def once(self) -> list[Action]:
        """One pass: plan and carry out; returns the plan."""
        running = [running_of(a) for a in self.allocations() if a.pod_name]
        actions = plan(running, self.resolved())
        keys = {a.key for a in actions}
        for key in [k for k in self.pending if k not in keys]:
            log.info("security groups back in sync", extra={"pod": self.pending[key].pod})
            del self.pending[key]
        for key in [k for k in self.failed if k not in keys]:
            del self.failed[key]
        for action in actions:
            if isinstance(action, RestartToApply):
                self._restart_to_apply(action)
            else:
                await self._retarget(action)
        return actions

    def _restart_to_apply(self, a: RestartToApply) -> None:
        if self.pending.get(a.key) == a:
            return  # reported already
        self.pending[a.key] = a
        self.on_outcome("restart_to_apply")
        message = (
            f"security groups {','.join(a.resolved) or 'none'} resolved, "
            f"running with {','.join(a.running) or 'the node pool'}: {RESTART} ({a.reason})"
        )
        log.warning("%s: %s", a.pod, message)
        self.events.publish(
            "sg.restart_to_apply",
            pod=a.pod,
            running=list(a.running),
            resolved=list(a.resolved),
            reason=a.reason,
        )
        self._announce(a.pod, "SecurityGroupsRestartToApply", message, "Warning")

    async def _retarget(self, a: Retarget) -> None:
        try:
            await self.retarget(a.key, a.new)
        except (BranchError, CloudError, TimeoutError) as e:  # reported, retried
            why = f"{type(e).__name__}: {e}"
            first = a.key not in self.failed
            self.failed[a.key] = (a, why)
            self.on_outcome("failed")
            if first:
                log.error(
                    "could not change a running pod's security groups: %s",
                    why,
                    extra={"pod": a.pod, "branch": a.branch},
                )
                self.events.publish(
                    "sg.retarget_failed", pod=a.pod, branch=a.branch, groups=list(a.new), error=why
                )
                self._announce(a.pod, "SecurityGroupsChangeFailed", why, "Warning")
            return
        self.failed.pop(a.key, None)
        if not await self.update(a.key, a):
            return  # the pod went meanwhile
        self.applied += 1
        self.on_outcome("applied")
        message = f"security groups {','.join(a.old)} -> {','.join(a.new)} on {a.branch}"
        log.info("%s: %s", a.pod, message)
        self.events.publish(
            "sg.retargeted",
            pod=a.pod,
            branch=a.branch,
            old=list(a.old),
            new=list(a.new),
            source=a.source,
        )
        self._announce(a.pod, "SecurityGroupsChanged", message, "Normal")

    def _announce(self, pod: str, reason: str, message: str, type: str) -> None:
        if self.announce is None or self._tg is None:
            return
        self._tg.start_soon(self.announce, pod, reason, message, type)

    def status(self) -> dict[str, Any]:
        """``agentctl kube``'s groups part: every pod not running with what it resolves to."""
        rows = [
            {
                "pod": a.pod,
                "running": list(a.running),
                "resolved": list(a.resolved),
                "state": f"{RESTART}: {a.reason}",
            }
            for a in self.pending.values()
        ]
        rows += [
            {"pod": a.pod, "running": list(a.old), "resolved": list(a.new), "state": f"failed: {e}"}
            for a, e in self.failed.values()
        ]
        return {"applied": self.applied, "pods": sorted(rows, key=lambda r: r["pod"])}
