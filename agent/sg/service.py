"""Security groups for pods on this node: what the CNI service asks for a pod that has groups.

Theory of operation.

* Deciding: ``lease`` turns the request into a ``PodIdentity`` (namespace and name from
  CNI_ARGS, labels from the identity source, annotations from ``runtimeConfig`` and CNI_ARGS)
  and asks ``policy.decide``. An ordinary pod (no groups) gets None and goes to the warm pool.
  A pod that asks for groups never silently gets none: a bad annotation, the feature off, a
  type without trunking all answer with an error naming why.
* The trunk: at ``restore`` the trunk ENI is looked up (any attached ENI of InterfaceType
  trunk) or, with agent-made branches, created and attached; its link gets its MTU and goes
  up. A failure is reported (``agentctl status``) and retried by ``run`` every
  ``trunk_retry`` seconds; meanwhile pods with groups are answered "try again later" and
  ordinary pods are served. The warm pool never takes the trunk's ENI slot (the daemon passes
  the refiller one slot fewer).
* The branch: EKS's annotation names a branch EKS's controller made and associated; the agent
  only wires it (its VLAN is marked held so an agent-made branch never takes it). Otherwise
  ``BranchManager.acquire`` makes one (create + associate) or hands back the pod's own.
* DEL: an agent-made branch cools down, then goes (``BranchManager``); an EKS branch is EKS's.
* Node-wide, once: in strict mode the ``local`` rule moves from priority 0 to 20; and the
  kernel is asked how ``vlan.eth.<vid>`` can carry 802.1Q: a ``vlan`` device, or where the
  kernel has none a veth tagged by eBPF under tc (``ebpf``, ``netlink.dot1q``), reported in
  ``agentctl status``, the log and ``podwire_branch_link_info{kind}``.
* eni mode (``mode = "eni"``): no trunk, no branches. The pod's groups resolve to a set; its
  address comes from the set's group of the node's pool (``agent.sg.sets.SetPools``), whose
  ENIs the refiller makes with exactly those groups. The pod is then an ordinary pod of a
  secondary ENI for the datapath (its table, rules 512/1536), SNAT and GC; DEL cools its
  address in its set. The decision path is the same as in branch mode (``decision``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from ipaddress import IPv4Network
from typing import Any, Protocol

import anyio
import anyio.abc
import attrs

from agent.checkpoint import Allocation
from agent.cni.spec import INVALID_CONFIG, TRY_AGAIN_LATER, CniError, CniRequest
from agent.config import SecurityGroupsSection
from agent.events import EventBus
from agent.pool.ipam import IpPool, Lease
from agent.sg.annotations import ANNOTATIONS, AnnotationError
from agent.sg.branches import (
    BranchFailed,
    BranchLimitReached,
    BranchManager,
    BranchPending,
    BranchRecord,
    State,
)
from agent.sg.kube import Facts
from agent.sg.metrics import SgMetrics
from agent.sg.policy import Decision, PodIdentity, SecurityGroupPolicy, Source, decide
from agent.sg.records import SetMembership, SgAttachment
from agent.sg.sets import SetFailed, SetPending, SetPools, SetRefused
from cloud.errors import CloudError, LimitExceeded, NotFound
from cloud.trunk import BranchCloud
from netlink.dot1q.links import Support
from netlink.errors import NetlinkError
from netlink.requests import RT_TABLE_LOCAL
from netlink.vlan import BranchLink, LinkKind, table_of
from netlink.watcher import Batch, Item, RuleEvent

log = logging.getLogger("podwire.sg")

# CNI error codes of security groups for pods (100+ are plugin-defined).
INVALID_SG_REQUEST = 111  # the pod's groups request is unusable as it is
SG_UNAVAILABLE = 112  # the pod asks for groups this node cannot give


class PolicySource(Protocol):
    """SecurityGroupPolicy objects by namespace (the agent's Kubernetes watch feeds one)."""

    def policies(self, namespace: str) -> Sequence[SecurityGroupPolicy]: ...


class IdentitySource(Protocol):
    """What the cluster says of a pod: its labels, its service account's labels, its
    annotations (``agent.sg.kube.KubeGroups`` over the agent's watch)."""

    async def facts(self, namespace: str, name: str, uid: str) -> Facts: ...


class NoPolicies:
    def policies(self, namespace: str) -> Sequence[SecurityGroupPolicy]:
        return ()


class StaticPolicies:
    """A fixed list of policies (tests, and nodes configured without the API)."""

    def __init__(self, policies: Iterable[SecurityGroupPolicy]) -> None:
        self._all = tuple(policies)

    def policies(self, namespace: str) -> Sequence[SecurityGroupPolicy]:
        return [p for p in self._all if p.namespace == namespace]


class NoIdentities:
    """No cluster to ask: labels unknown (selectors see none), annotations from the runtime."""

    async def facts(self, namespace: str, name: str, uid: str) -> Facts:
        return Facts()


class TrunkInfo(Protocol):
    """The trunk ENI as the provider reports it (``cloud.aws.provider.EniInfo``)."""

    @property
    def eni_id(self) -> str: ...
    @property
    def mac(self) -> str: ...
    @property
    def device_index(self) -> int: ...
    @property
    def subnet_id(self) -> str: ...


class TrunkProvider(Protocol):
    """What the service needs of the provider (``cloud.aws.provider.AwsProvider``)."""

    @property
    def instance_type(self) -> str: ...
    def trunk(self) -> TrunkInfo | None: ...
    async def find_trunk(self) -> TrunkInfo | None: ...
    async def create_trunk(self) -> TrunkInfo: ...
    async def configure_trunk(self) -> TrunkInfo: ...


class LinkRef(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def name(self) -> str: ...


class LinkWaiter(Protocol):
    async def wait_link(self, mac: str, timeout: float) -> LinkRef: ...


class NodeRules(Protocol):
    """What the service needs of the node's kernel (``agent.cni.datapath.ThreadedDatapath``)."""

    async def move_local_rule(self) -> bool: ...
    async def vlan_support(self) -> Support: ...


BranchCloudFactory = Callable[[TrunkInfo], Awaitable[BranchCloud]]
Limit = Callable[[str], int | None]


@attrs.frozen(kw_only=True)
class Trunk:
    eni_id: str
    mac: str
    device_index: int
    link: str
    index: int


def request_annotations(req: CniRequest) -> dict[str, str]:
    """The pod's annotations as the runtime passed them: runtimeConfig's, then CNI_ARGS (for
    runtimes without the capability) for the keys runtimeConfig lacks."""
    annotations = {k: v for k, v in req.args.items() if k in ANNOTATIONS}
    annotations.update(req.annotations)
    return annotations


class SgService:
    """Security groups for pods on one node (see the module docstring)."""

    def __init__(
        self,
        settings: SecurityGroupsSection,
        *,
        provider: TrunkProvider | None,
        link_waiter: LinkWaiter | None,
        rules: NodeRules | None,
        branch_cloud: BranchCloudFactory | None,
        branch_limit: Limit,
        commit: Callable[[], Awaitable[None]] | None = None,
        events: EventBus | None = None,
        metrics: SgMetrics | None = None,
        policies: PolicySource | None = None,
        identities: IdentitySource | None = None,
        wall: Callable[[], float] = time.time,
        trunk_retry: float = 30.0,
        sweep_interval: float = 10.0,
        link_timeout: float = 60.0,
        leak_grace: float = 300.0,
        leak_interval: float = 3600.0,
        pool: IpPool | None = None,
    ) -> None:
        self.settings = settings
        self.provider = provider
        self.link_waiter = link_waiter
        self.rules = rules
        self.branch_cloud = branch_cloud
        self.branch_limit = branch_limit
        self.commit = commit
        self.events = events or EventBus()
        self.metrics = metrics or SgMetrics()
        self.policies = policies or NoPolicies()
        self.identities = identities or NoIdentities()
        self.wall = wall
        self.trunk_retry = trunk_retry
        self.sweep_interval = sweep_interval
        self.link_timeout = link_timeout
        self.leak_grace = leak_grace
        self.leak_interval = leak_interval
        self.state = "disabled" if not settings.enabled else "starting"
        self.reason = "" if settings.enabled else "security_groups.enabled is off"
        self.limit = 0
        self.trunk: Trunk | None = None
        # How branch links are made here: the setting, resolved against the kernel at restore
        # (``vlan`` becomes ``ebpf`` where the kernel has no VLAN devices).
        self.link_kind: LinkKind = "vlan"
        self.link_detail = ""
        self.manager: BranchManager | None = None
        self.live: Callable[[str], bool] = lambda key: True
        # Standard-mode pods are SNATed like ordinary ones: their addresses join SNAT's sources.
        self.on_change: Callable[[], None] = lambda: None
        self._saved: tuple[BranchRecord, ...] = ()
        self._in_use: dict[str, BranchRecord] = {}
        self._eks: dict[str, int] = {}  # pod key -> VLAN of an EKS branch it holds
        self._manager_ready = anyio.Event()
        self._local_rule_touched = anyio.Event()
        self.repairs = 0
        self._trunk_changed = anyio.Event()
        self.metrics.watch(self._gauges)
        # eni mode: the sets of groups, over the node's pool (the CNI service's)
        self.sets: SetPools | None = None
        if self.eni_mode and pool is not None:
            self.sets = SetPools(pool, warm=settings.set_warm_ips)
            self.metrics.watch_sets(self._set_gauges)
        self.enis: Callable[[], Sequence[Any]] = lambda: ()  # the provider's ENI records

    def __repr__(self) -> str:
        return f"<SgService {self.state} limit={self.limit} manager={self.manager!r}>"

    @property
    def mode(self) -> str:
        return self.settings.enforcing_mode

    @property
    def eni_mode(self) -> bool:
        """Whether pods share an ENI per set of groups (``mode = "eni"``), not branch ENIs."""
        return self.settings.enabled and self.settings.mode == "eni"

    @property
    def reserves_trunk_slot(self) -> bool:
        """Whether the warm pool must leave one ENI slot to the trunk."""
        return self.settings.enabled and not self.eni_mode and self.state != "unsupported"

    @property
    def agent_branches(self) -> bool:
        return self.settings.branches == "agent"

    def _gauges(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.manager.counts()) if self.manager else {}
        out["limit"] = self.limit
        out["others"] = len(self.manager.external) if self.manager else len(self._eks)
        out["trunk"] = 1.0 if self.trunk is not None else 0.0
        out[f"link:{self.link_kind}"] = 1.0
        return out

    # -- restore --------------------------------------------------------------------------------

    async def restore(
        self, allocations: Iterable[Allocation], saved: Sequence[BranchRecord]
    ) -> None:
        """Find (or make) the trunk and rebuild the branches from the checkpoint, the live
        allocations and the cloud. A trunk that cannot be had now is retried by ``run``;
        raises CloudError only when the cloud cannot be read."""
        self._saved = tuple(saved)
        for a in allocations:
            if a.sg is None:
                continue
            key = str(a.key)
            if a.sg.agent_made:
                self._in_use[key] = BranchRecord(
                    rid=a.sg.branch,
                    vlan=a.sg.vlan,
                    state=State.ASSOCIATED,
                    pod=key,
                    pod_name=_pod_name(a),
                    groups=a.sg.groups,
                    eni_id=a.sg.branch,
                    mac=a.sg.mac,
                    ip=a.ip,
                    subnet_cidr=a.sg.subnet_cidr,
                    association_id=a.sg.association,
                    since=a.created_at,
                    created_at=a.created_at,
                )
            else:
                self._eks[key] = a.sg.vlan
        if not self.settings.enabled:
            if self._in_use or self._eks:
                log.warning(
                    "security groups for pods are off, but pods with branch ENIs are wired: "
                    "they keep working; their branches are not cleaned up by this agent",
                    extra={"pods": len(self._in_use) + len(self._eks)},
                )
            return
        if self.eni_mode:
            self.state = "ready"
            self.reason = "pods share an ENI per set of security groups"
            if self._in_use or self._eks:
                log.warning(
                    "eni mode, but pods with branch ENIs are wired (an earlier branch mode): "
                    "they keep working; their branches are not cleaned up by this agent",
                    extra={"pods": len(self._in_use) + len(self._eks)},
                )
            return
        assert self.provider is not None
        itype = self.provider.instance_type
        limit = self.settings.max_branches or self.branch_limit(itype)
        if not limit:
            self.state = "unsupported"
            if limit is None:
                self.reason = (
                    f"{itype} is not known to support ENI trunking "
                    "(set security_groups.max_branches to its branch limit)"
                )
            else:
                self.reason = f"{itype} does not support ENI trunking"
            log.warning(
                "security groups for pods unavailable: %s; pods that ask for groups are "
                "refused, ordinary pods are served",
                self.reason,
            )
            self.events.publish("sg.unavailable", reason=self.reason)
            return
        self.limit = limit
        if not await self._resolve_link_kind():
            return
        strict = self.mode == "strict" and self.rules is not None
        if strict and self.rules is not None and await self.rules.move_local_rule():
            log.info("strict mode: the local rule moved from priority 0 to 20")
        await self._find_trunk(create=self.agent_branches)

    async def _resolve_link_kind(self) -> bool:
        """Probe (once, in the node's namespace) how ``vlan`` links can be made: real VLAN
        devices, else a veth tagged by eBPF. Returns False (and says why) when neither."""
        if self.rules is None:
            return True
        kind: str | None = None
        try:
            support = await self.rules.vlan_support()
        except NetlinkError as e:
            self.link_detail = f"cannot probe 802.1Q support: {e}"
        else:
            self.link_detail, kind = support.describe(), support.kind
        if kind is None:
            self.state = "unsupported"
            self.reason = self.link_detail
            log.warning(
                "security groups for pods unavailable: %s; pods that ask for groups are "
                "refused, ordinary pods are served",
                self.reason,
            )
            self.events.publish("sg.unavailable", reason=self.reason)
            return False
        self.link_kind = "vlan" if kind == "vlan" else "ebpf"
        log.info("branch links: %s", self.link_detail, extra={"kind": self.link_kind})
        return True

    def trunk_indexes(self) -> list[int]:
        """The trunk's ifindex, once known (GC brings its 802.1Q demultiplexer back)."""
        return [self.trunk.index] if self.trunk is not None else []

    async def _find_trunk(self, *, create: bool) -> bool:
        """Look for the trunk (and make it when ``create``); set up the branch manager.
        Returns whether the trunk is ready. Failures are reported, never raised, except a
        CloudError from reading the branches back (the restore's caller retries)."""
        assert self.provider is not None
        found = self.provider.trunk()
        try:
            if found is None and not create:
                found = await self.provider.find_trunk()  # EKS's controller attaches it
            if found is None and create:
                found = await self.provider.create_trunk()
                self.events.publish("trunk.created", eni=found.eni_id, device=found.device_index)
            elif found is not None:
                await self.provider.configure_trunk()
        except (CloudError, NetlinkError, TimeoutError) as e:
            self.state = "no trunk"
            self.reason = f"trunk ENI: {e}"
            log.warning("trunk ENI not ready; retrying", extra={"error": str(e)})
            self.events.publish("trunk.unavailable", reason=self.reason)
            return False
        if found is None:
            self.state = "no trunk"
            self.reason = "waiting for EKS's resource controller to attach the trunk ENI"
            return False
        assert self.link_waiter is not None
        link = await self.link_waiter.wait_link(found.mac, self.link_timeout)
        self.trunk = Trunk(
            eni_id=found.eni_id,
            mac=found.mac,
            device_index=found.device_index,
            link=link.name,
            index=link.index,
        )
        if self.agent_branches and self.branch_cloud is not None:
            manager = BranchManager(
                await self.branch_cloud(found),
                limit=self.limit,
                cooldown=self.settings.branch_cooldown,
                deadline=self.settings.branch_deadline,
                commit=self.commit,
                publish=self.events.publish,
                on_workflow=self.metrics.workflow,
                wall=self.wall,
            )
            await manager.restore(self._saved, self._in_use)
            for key, vlan in self._eks.items():
                manager.hold_external(vlan, f"EKS branch of {key}")
            self.manager = manager
            self._manager_ready.set()
        self.state = "ready"
        self.reason = f"trunk {found.eni_id} on {link.name}"
        self._trunk_changed.set()
        log.info(
            "security groups for pods ready",
            extra={"trunk": found.eni_id, "link": link.name, "limit": self.limit},
        )
        self.events.publish("trunk.ready", eni=found.eni_id, link=link.name, limit=self.limit)
        return True

    # -- running --------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Retry the trunk while it is missing, run the branch workflows and sweep orphaned
        branches, until cancelled.

        Started once ADDs can be served: with the trunk there at start, once the branch
        workflows run (an SG pod's ADD in between would find no manager); without it, at once
        (SG pods are answered 11 until the trunk comes)."""
        async with anyio.create_task_group() as tg:
            if self.state in ("disabled", "unsupported") or self.eni_mode:
                # nothing to do (eni mode: the refiller grows the sets); a service that exits
                # is dead
                task_status.started()
                await anyio.sleep_forever()
            if self.mode == "strict":
                tg.start_soon(self._keep_local_rule)
            if self.state != "ready":
                task_status.started()
                task_status = anyio.TASK_STATUS_IGNORED
            while self.state != "ready":
                await anyio.sleep(self.trunk_retry)
                try:
                    await self._find_trunk(create=self.agent_branches)
                except CloudError as e:
                    self.reason = f"trunk ENI: {e}"
            manager = self.manager
            if manager is None:  # EKS's controller makes the branches
                task_status.started()
                await anyio.sleep_forever()
                return
            await tg.start(manager.run)
            task_status.started()
            tg.start_soon(self._collect_leaked, manager)
            while True:
                await anyio.sleep(self.sweep_interval)
                if manager.sweep(self.live) and self.commit is not None:
                    await self.commit()

    async def _collect_leaked(self, manager: BranchManager) -> None:
        """Leaked branches (ours by tag, not associated, no record) go like leaked ENIs: at
        start, then every ``leak_interval`` (jittered)."""
        while True:
            try:
                await manager.collect_leaked(self.leak_grace)
            except CloudError as e:
                log.warning("leaked-branch cleanup failed", extra={"error": str(e)})
            await anyio.sleep(self.leak_interval * random.uniform(0.9, 1.1))

    def on_watch(self, item: Item) -> None:
        """Watcher callback: someone touched the node's ``lookup local`` rules (or events were
        lost): check that strict mode's shape still holds."""
        if isinstance(item, Batch) and not any(
            isinstance(e, RuleEvent) and e.table == RT_TABLE_LOCAL for e in item.events
        ):
            return
        self._local_rule_touched.set()

    async def _keep_local_rule(self) -> None:
        while True:
            await self._local_rule_touched.wait()
            self._local_rule_touched = anyio.Event()
            if self.rules is None:
                continue
            try:
                if await self.rules.move_local_rule():
                    self.repairs += 1
                    log.warning("strict mode: put the local rule back at priority 20")
                    self.events.publish("repaired", what="local rule", fixed="priority 20")
            except NetlinkError as e:
                log.warning("strict mode: cannot move the local rule", extra={"error": str(e)})

    # -- the CNI service's hook -----------------------------------------------------------------

    async def decision(self, req: CniRequest) -> Decision:
        """The pod's groups. The runtime's annotations first (no cluster needed); then the
        cluster's view of the pod (labels, service account, annotations) and the policies.
        Raises CniError: 111 for an unusable annotation, 11 while the cluster's view of the
        pod is not complete enough to decide."""
        ns, name = req.pod_namespace, req.pod_name
        annotations = request_annotations(req)
        try:
            first = decide(PodIdentity(namespace=ns, name=name, annotations=annotations))
            if first.source is not Source.NONE:
                return first
            facts = await self.identities.facts(ns, name, req.args.get("K8S_POD_UID", ""))
            if facts.pending:
                raise CniError(
                    TRY_AGAIN_LATER,
                    "the pod's security groups cannot be decided yet",
                    facts.pending,
                )
            pod = PodIdentity(
                namespace=ns,
                name=name,
                labels=facts.labels,
                service_account_labels=facts.service_account_labels,
                annotations={**facts.annotations, **annotations},
            )
            return decide(pod, self.policies.policies(ns))
        except AnnotationError as e:
            raise CniError(INVALID_SG_REQUEST, "invalid security groups request", str(e)) from None

    async def lease(self, req: CniRequest) -> tuple[Lease, SgAttachment | SetMembership] | None:
        """Return the pod's branch address and attachment (eni mode: its set's address and
        membership), or None for an ordinary pod.

        Raises CniError: 111 for a request that cannot be served as it is (bad annotation,
        unknown group), 112 when this node cannot give groups at all, 11 (try again later)
        while the trunk or the branch is not ready, or the trunk is full.
        """
        decision = await self.decision(req)
        if decision.source is Source.NONE:
            return None
        self.metrics.add(decision.source.value)
        what = decision.describe()
        if not self.settings.enabled:
            raise CniError(
                SG_UNAVAILABLE, "security groups for pods are not enabled on this node", what
            )
        if self.state == "unsupported":
            raise CniError(SG_UNAVAILABLE, "security groups for pods unavailable", self.reason)
        if self.eni_mode:
            return await self._set_lease(req, decision)
        if self.trunk is None:
            raise CniError(TRY_AGAIN_LATER, "trunk ENI not ready", self.reason)
        key = str(req.key)
        if decision.source is Source.EKS:
            eni = decision.branch
            assert eni is not None
            att = SgAttachment(
                source="eks",
                branch=eni.eni_id,
                vlan=eni.vlan,
                mac=eni.mac,
                subnet_cidr=eni.subnet_cidr,
                mode=self.settings.enforcing_mode,
                association=eni.association_id,
            )
            self._eks[key] = eni.vlan
            if self.manager is not None:
                self.manager.hold_external(eni.vlan, f"EKS branch of {key}")
            return self._lease(eni.ip, att), att
        if not self.agent_branches:
            raise CniError(
                SG_UNAVAILABLE,
                "this node wires only branch ENIs EKS's controller made",
                f"{what}; security_groups.branches = controller (needs {ANNOTATIONS[0]})",
            )
        if self.manager is None:
            raise CniError(TRY_AGAIN_LATER, "branch ENIs not ready", self.reason)
        if not self.manager.running:
            raise CniError(TRY_AGAIN_LATER, "branch ENIs not ready", "the branch workflows start")
        pod_name = f"{req.pod_namespace}/{req.pod_name}" if req.pod_name else ""
        try:
            rec = await self.manager.acquire(
                key, groups=decision.groups, pod_name=pod_name, wait=self.settings.branch_wait
            )
        except BranchLimitReached as e:
            raise CniError(TRY_AGAIN_LATER, "no branch ENI available", str(e)) from None
        except BranchPending as e:
            raise CniError(TRY_AGAIN_LATER, "branch ENI not ready yet", str(e)) from None
        except BranchFailed as e:
            raise _failed(e, what) from None
        assert rec.ip is not None and rec.subnet_cidr is not None
        att = SgAttachment(
            source=decision.source.value,
            branch=rec.eni_id,
            vlan=rec.vlan,
            mac=rec.mac,
            subnet_cidr=rec.subnet_cidr,
            mode=self.settings.enforcing_mode,
            groups=decision.groups,
            policies=decision.policies,
            association=rec.association_id,
        )
        return self._lease(rec.ip, att), att

    async def _set_lease(self, req: CniRequest, decision: Decision) -> tuple[Lease, SetMembership]:
        """eni mode: an address of the pod's set. Raises CniError (see ``lease``)."""
        what = decision.describe()
        if decision.source is Source.EKS:
            raise CniError(
                SG_UNAVAILABLE,
                "this node gives pods their groups by ENI, not by EKS's branch ENIs",
                f'{what}; security_groups.mode = "eni" (EKS\'s branches need "branch")',
            )
        if req.requested_ip is not None:
            raise CniError(
                INVALID_CONFIG,
                "a pod with security groups gets an address of its set's ENI",
                f"asked for {req.requested_ip}",
            )
        if self.sets is None:
            raise CniError(TRY_AGAIN_LATER, "security groups for pods not ready", self.reason)
        try:
            lease = await self.sets.acquire(
                req.key, decision.groups, wait=self.settings.branch_wait
            )
        except SetRefused as e:
            self.metrics.refused("eni_slots")
            raise CniError(
                TRY_AGAIN_LATER, "no ENI for the pod's security groups", f"{what}: {e.reason}"
            ) from None
        except SetFailed as e:
            raise _cloud_failed(e.cause, what, "the ENI of the pod's security groups") from None
        except SetPending as e:
            raise CniError(
                TRY_AGAIN_LATER, "the ENI of the pod's security groups is not ready yet", str(e)
            ) from None
        member = SetMembership(
            source=decision.source.value, groups=decision.groups, policies=decision.policies
        )
        return lease, member

    def _lease(self, ip: Any, att: SgAttachment) -> Lease:
        # Standard mode routes by the branch's table (rules 512/1536); strict by iif rules.
        if not att.strict:
            self.on_change()
        return Lease(ip=ip, owner=att.branch, table=None if att.strict else table_of(att.vlan))

    def settled(self) -> None:
        """The CNI service's ADD answered: eni mode tops up a set's margin it took."""
        if self.sets is not None:
            self.sets.settled()

    def release(self, alloc: Allocation) -> None:
        """The pod is gone: its agent-made branch cools down (the caller commits)."""
        att = alloc.sg
        if att is None:
            return
        key = str(alloc.key)
        if not att.strict:
            self.on_change()
        if not att.agent_made:
            held = self._eks.pop(key, None) is not None
            if held and self.manager is not None and att.vlan not in self._eks.values():
                self.manager.drop_external(att.vlan)
            return
        if self.manager is not None:
            self.manager.release(key)
        else:
            log.warning(
                "branch of a deleted pod left in the cloud: no branch manager on this node",
                extra={"branch": att.branch},
            )

    def branch_link(self, alloc: Allocation) -> BranchLink | None:
        """How the pod's datapath reaches its branch (None for an ordinary pod)."""
        att = alloc.sg
        if att is None:
            return None
        return BranchLink(
            vlan=att.vlan,
            trunk_index=self.trunk.index if self.trunk is not None else 0,
            mac=att.mac,
            gateway=att.gateway,
            strict=att.strict,
            kind=self.link_kind,
        )

    def records(self) -> list[BranchRecord]:
        """The branch records to checkpoint (the saved ones until the manager took over)."""
        if self.manager is not None:
            return self.manager.records()
        return list(self._saved)

    # -- views ----------------------------------------------------------------------------------

    def _set_gauges(self) -> list[dict[str, Any]]:
        return self.sets.rows(self.enis(), {}) if self.sets is not None else []

    def status(self) -> dict[str, Any]:
        counts = self.manager.counts() if self.manager else {}
        if self.eni_mode:
            return self._eni_status()
        return {
            "enabled": self.settings.enabled,
            "state": self.state,
            "reason": self.reason,
            "mode": self.settings.enforcing_mode,
            "branches": self.settings.branches,
            "link": self.link_kind,
            "link_detail": self.link_detail,
            "limit": self.limit,
            "trunk": attrs.asdict(self.trunk) if self.trunk else None,
            "counts": counts,
            "held_by_others": len(self.manager.external) if self.manager else len(self._eks),
            "cooldown_s": self.settings.branch_cooldown,
        }

    def _eni_status(self) -> dict[str, Any]:
        rows = self.sets.rows(self.enis(), {}) if self.sets is not None else []
        return {
            "enabled": True,
            "eni_mode": True,
            "state": self.state,
            "reason": self.reason,
            # what strict mode would change: not available here
            "same_node": "pod-to-pod traffic on the node stays on the node (no EC2 groups)",
            "sets": len(rows),
            "enis": sum(len(r["enis"]) for r in rows),
            "assigned": sum(r["assigned"] for r in rows),
            "free": sum(r["free"] for r in rows),
            "refused": dict(self.sets.refused()) if self.sets is not None else {},
            "warm_ips": self.settings.set_warm_ips,
            "set_cooldown_s": self.settings.set_cooldown,
            "shared_reserve": self.settings.shared_reserve,
            "refusals": self.sets.refusals if self.sets is not None else 0,
        }

    def sets_view(self, allocations: Iterable[Allocation]) -> dict[str, Any]:
        """``agentctl sets``: eni mode's sets, each with its ENIs, addresses and pods."""
        if not self.eni_mode:
            return {**self.status(), "rows": []}
        pods: dict[str, list[str]] = {}
        for a in allocations:
            if a.sg_set is not None:
                pods.setdefault(a.sg_set.key, []).append(_pod_name(a) or str(a.key))
        rows = self.sets.rows(self.enis(), pods) if self.sets is not None else []
        return {**self.status(), "rows": rows}

    def view(self, allocations: Iterable[Allocation]) -> dict[str, Any]:
        """``agentctl branches``: the trunk and every branch with its VLAN, state and pod."""
        now = self.wall()
        rows: list[dict[str, Any]] = []
        by_branch = {a.sg.branch: a for a in allocations if a.sg is not None}
        for r in self.records():
            a = by_branch.get(r.eni_id)
            left = None
            if r.state is State.COOLING:
                left = round(max(0.0, r.since + self.settings.branch_cooldown - now), 1)
            rows.append(
                {
                    "branch": r.eni_id or "(creating)",
                    "vlan": r.vlan,
                    "state": r.state.value,
                    "pod": r.pod_name or r.pod,
                    "ip": str(r.ip) if r.ip else "",
                    "groups": list(r.groups),
                    "source": a.sg.source if a is not None and a.sg is not None else "agent",
                    "cooldown_left_s": left,
                    "error": r.error,
                }
            )
        for a in allocations:
            if a.sg is not None and not a.sg.agent_made:
                rows.append(
                    {
                        "branch": a.sg.branch,
                        "vlan": a.sg.vlan,
                        "state": "associated",
                        "pod": _pod_name(a) or str(a.key),
                        "ip": str(a.ip),
                        "groups": [],
                        "source": "eks",
                        "cooldown_left_s": None,
                        "error": "",
                    }
                )
        rows.sort(key=lambda row: row["vlan"])
        return {**self.status(), "rows": rows}


def snat_sources(allocations: Iterable[Allocation]) -> list[IPv4Network]:
    """The standard-mode pods' addresses: SNATed like ordinary pods' when they leave the VPC
    (strict-mode pods never are: their traffic all leaves by the branch)."""
    return [IPv4Network(a.ip) for a in allocations if a.sg is not None and not a.sg.strict]


def _pod_name(a: Allocation) -> str:
    return f"{a.pod_namespace}/{a.pod_name}" if a.pod_name else ""


def _failed(e: BranchFailed, what: str) -> CniError:
    return _cloud_failed(e.cause, what, "branch ENI", str(e))


def _cloud_failed(cause: BaseException, what: str, made: str, detail: str = "") -> CniError:
    """The CNI error for an ENI the pod's groups needed that EC2 would not make."""
    if isinstance(cause, NotFound) and cause.code == "InvalidSecurityGroupID.NotFound":
        return CniError(INVALID_SG_REQUEST, "security group does not exist", f"{what}: {cause}")
    if isinstance(cause, LimitExceeded) and cause.what == "SecurityGroupsPerInterfaceLimitExceeded":
        return CniError(INVALID_SG_REQUEST, "too many security groups for one ENI", f"{what}")
    return CniError(TRY_AGAIN_LATER, f"{made} could not be made", detail or f"{what}: {cause}")


def remove_node_state() -> list[str]:
    """Undo strict mode's node-wide changes (``podwire-agent uninstall``): the local rule back
    at priority 0 and the strict-mode ingress chains gone. Return what was removed."""
    from netlink.nftables import Nft, NftError
    from netlink.veth import Datapath
    from netlink.vlan import NFT_FAMILY, NFT_TABLE

    removed = []
    dp = Datapath()
    try:
        if dp.restore_local_rule():
            removed.append("strict mode's local rule at 20 (back at 0)")
    finally:
        dp.close()
    with Nft.open() as nft:
        try:
            if nft.list_table_json(NFT_FAMILY, NFT_TABLE) is not None:
                nft.run(f"delete table {NFT_FAMILY} {NFT_TABLE}\n")
                removed.append(f"table {NFT_FAMILY} {NFT_TABLE}")
        except NftError as e:
            log.warning("strict chains not removed", extra={"error": str(e)})
    return removed
