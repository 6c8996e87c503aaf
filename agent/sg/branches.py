"""Branch ENIs of this node: one per pod that has security groups, on the trunk's VLANs.

Theory of operation. Every branch the agent makes is a record, in one of four states:

    creating --(created, associated)--> associated --(its pod deleted)--> cooling
        --(cooldown elapsed)--> deleting --(disassociated, deleted)--> gone

* creating: CreateNetworkInterface with the pod's groups and tags, then AssociateTrunkInterface
  on the lowest free VLAN id, both with the record's client token (a retried call returns what
  the first made) and under one deadline. The pod's ADD waits for it up to ``wait``; if it
  gives up first, the workflow goes on in the manager's task group and the runtime's retried
  ADD finds the branch ready: no EC2 call is wasted on a timeout. A failure is undone in a
  shielded scope (disassociate, delete) and frees the VLAN; if the undo fails too, the record
  goes to deleting and the reaper finishes it. A pod deleted while its branch is being made
  gets no cooldown: the branch never carried traffic.
* associated: the pod's. A record whose pod the CNI service no longer knows (its ADD failed,
  its allocation was dropped) is moved to cooling by ``sweep`` after ``orphan_grace``: until
  then a retried ADD of the same pod gets it back without EC2 calls.
* cooling: DEL moved it here; it waits ``cooldown`` seconds (peers' ARP and conntrack entries,
  and the VPC's tracked flows, age out) and counts against the limit meanwhile.
* deleting: disassociate, then delete (already gone counts as done), retried with backoff
  until done; the VLAN id is free again only once the branch is disassociated. A deletion
  never gives up (Amazon's controller forgets a branch after three failures and leaks its
  VLAN).

Capacity: records holding a VLAN of the trunk (all but deleting ones already disassociated)
plus the trunk's VLANs that are not ours (branches EKS's controller made for annotated pods,
associations the agent does not know) never exceed ``limit``. VLAN ids: the lowest id in
1..4094 that none of those holds.

Restart (``restore``): records come back from the checkpoint and are reconciled with EC2 (our
tags, the trunk's associations) and with the allocations that survived: a live pod's branch is
never touched; an associated branch no live pod holds cools down, then goes; a branch whose
workflow died mid-way, or that the cloud has with our tags and no record, is deleted (it never
carried traffic, or belongs to no pod).

Times are wall-clock seconds (``wall``), so they survive a restart in the checkpoint; tests
pass trio's virtual clock.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Final

import anyio
import anyio.abc
import attrs

from cloud.errors import CloudError, CloudRequestFailed
from cloud.trunk import BranchAssociation, BranchCloud, BranchEni

log = logging.getLogger("podwire.sg.branches")

VLAN_IDS: Final = range(1, 4095)


class State(enum.Enum):
    CREATING = "creating"
    ASSOCIATED = "associated"
    COOLING = "cooling"
    DELETING = "deleting"


@attrs.frozen(kw_only=True)
class BranchRecord:
    """One branch ENI of this node's trunk (checkpointed). ``rid`` identifies the record: the
    ENI id once known, before that ``creating:<token>``. ``since`` is the wall time the record
    entered its state."""

    rid: str
    vlan: int
    state: State
    pod: str = ""  # the pod key it is (or was) for
    pod_name: str = ""  # namespace/name, for operators
    groups: tuple[str, ...] = ()
    eni_id: str = ""
    mac: str = ""
    ip: IPv4Address | None = None
    subnet_cidr: IPv4Network | None = None
    association_id: str = ""
    token: str = ""
    since: float = 0.0
    created_at: float = 0.0
    error: str = ""  # the last failure of its workflow

    @property
    def holds_vlan(self) -> bool:
        """Whether the trunk has (or may have) this branch on its VLAN."""
        return self.state is not State.DELETING or bool(self.association_id)

    @property
    def gateway(self) -> IPv4Address | None:
        return None if self.subnet_cidr is None else self.subnet_cidr.network_address + 1


# --- errors ---------------------------------------------------------------------------------


class BranchError(Exception):
    """Base of the branch manager's errors."""


class BranchLimitReached(BranchError):
    """Every branch slot of the trunk is taken (cooling ones included)."""

    def __init__(self, *, limit: int, counts: Mapping[str, int], next_free_in: float | None):
        parts = [f"{n} {state}" for state, n in counts.items() if n]
        soon = f" (next free in {next_free_in:.0f}s)" if next_free_in is not None else ""
        super().__init__(
            f"branch ENI limit reached: {limit} per trunk; {', '.join(parts) or 'none'}{soon}"
        )
        self.limit = limit
        self.counts = dict(counts)
        self.next_free_in = next_free_in


class BranchPending(BranchError):
    """The pod's branch is still being made; the workflow goes on (ask again)."""

    def __init__(self, vlan: int, step: str) -> None:
        super().__init__(f"branch ENI on VLAN {vlan} is still being made ({step})")
        self.vlan = vlan
        self.step = step


class BranchFailed(BranchError):
    """Making the pod's branch failed at ``step``; what was done has been undone."""

    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(f"branch ENI {step} failed: {cause}")
        self.step = step
        self.cause = cause


# --- pure decisions -------------------------------------------------------------------------


def lowest_free_vlan(taken: Iterable[int]) -> int | None:
    """The lowest VLAN id in 1..4094 not in ``taken``, None when all are."""
    used = set(taken)
    return next((v for v in VLAN_IDS if v not in used), None)


@attrs.frozen(kw_only=True)
class Reconciled:
    """What ``reconcile`` decided: the records to keep, and one line per change."""

    records: tuple[BranchRecord, ...]
    external: Mapping[int, str]  # VLAN -> what holds it (not our records)
    changes: tuple[str, ...]


def reconcile(
    saved: Sequence[BranchRecord],
    in_use: Mapping[str, BranchRecord],
    branches: Sequence[BranchEni],
    associations: Sequence[BranchAssociation],
    now: float,
) -> Reconciled:
    """The records after a restart (pure). ``in_use``: pod key -> the branch a live allocation
    holds (from the allocation itself); ``branches``: our branch ENIs in the cloud; every
    association of the trunk."""
    by_branch = {a.branch_id: a for a in associations}
    cloud = {b.eni_id: b for b in branches}
    out: dict[str, BranchRecord] = {}
    changes: list[str] = []
    live_enis = {r.eni_id for r in in_use.values()}
    for key, rec in in_use.items():
        a = by_branch.get(rec.eni_id)
        out[rec.eni_id] = attrs.evolve(
            rec,
            rid=rec.eni_id,
            state=State.ASSOCIATED,
            pod=key,
            association_id=a.association_id if a else rec.association_id,
        )
    for r in saved:
        if r.eni_id in live_enis:
            continue
        a = by_branch.get(r.eni_id) if r.eni_id else None
        assoc = a.association_id if a else r.association_id
        if r.state is State.ASSOCIATED:
            changes.append(f"{r.eni_id} (vlan {r.vlan}): its pod {r.pod} is gone: cooling")
            out[r.rid] = attrs.evolve(r, state=State.COOLING, since=now, association_id=assoc)
        elif r.state is State.CREATING:
            if r.eni_id:
                changes.append(
                    f"{r.eni_id} (vlan {r.vlan}): made by a workflow that died: deleting"
                )
                out[r.rid] = attrs.evolve(r, state=State.DELETING, since=now, association_id=assoc)
            # without an ENI id the cloud's tags tell (below)
        else:
            out[r.rid] = attrs.evolve(r, association_id=assoc)
    known = {r.eni_id for r in out.values() if r.eni_id}
    for b in branches:
        if b.eni_id in known:
            continue
        a = by_branch.get(b.eni_id)
        if a is not None:
            changes.append(f"{b.eni_id} (vlan {a.vlan}): associated, no pod: cooling")
            state, vlan, assoc = State.COOLING, a.vlan, a.association_id
        else:
            changes.append(f"{b.eni_id}: not associated, no pod: deleting")
            state, vlan, assoc = State.DELETING, b.vlan, ""
        out[b.eni_id] = BranchRecord(
            rid=b.eni_id,
            vlan=vlan,
            state=state,
            pod_name=b.pod,
            groups=b.groups,
            eni_id=b.eni_id,
            mac=b.mac,
            ip=b.ip,
            subnet_cidr=b.subnet_cidr,
            association_id=assoc,
            since=now,
            created_at=b.created_at or now,
        )
    ours = {r.eni_id for r in out.values()} | set(cloud)
    external = {a.vlan: f"association {a.association_id}" for a in associations}
    for a in associations:
        if a.branch_id in ours:
            external.pop(a.vlan, None)
    return Reconciled(
        records=tuple(sorted(out.values(), key=lambda r: r.vlan)),
        external=external,
        changes=tuple(changes),
    )


# --- the manager ----------------------------------------------------------------------------

Commit = Callable[[], Awaitable[None]]
Publish = Callable[..., None]
OnWorkflow = Callable[[str, str, float], None]  # (workflow, outcome, seconds)


def _no_publish(kind: str, **fields: Any) -> None:
    return None


def _no_workflow(workflow: str, outcome: str, seconds: float) -> None:
    return None


@attrs.frozen(kw_only=True)
class Backoff:
    """Delays between deletion attempts: ``base * 2**(n-1)``, at most ``cap``, +-``jitter``."""

    base: float = 1.0
    cap: float = 60.0
    jitter: float = 0.0

    def delay(self, attempt: int) -> float:
        d = float(min(self.cap, self.base * 2.0 ** (attempt - 1)))
        return d * (1 + random.uniform(-self.jitter, self.jitter)) if self.jitter else d


class BranchManager:
    """The records, the create workflows, and the reaper (see the module docstring)."""

    def __init__(
        self,
        cloud: BranchCloud,
        *,
        limit: int,
        cooldown: float = 60.0,
        deadline: float = 120.0,
        orphan_grace: float = 30.0,
        backoff: Backoff = Backoff(jitter=0.1),
        deleters: int = 4,
        commit: Commit | None = None,
        publish: Publish = _no_publish,
        on_workflow: OnWorkflow = _no_workflow,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cloud = cloud
        self.limit = limit
        self.cooldown = cooldown
        self.deadline = deadline
        self.orphan_grace = orphan_grace
        self.backoff = backoff
        self._commit = commit
        self.publish = publish
        self.on_workflow = on_workflow
        self.wall = wall
        self._records: dict[str, BranchRecord] = {}
        self._external: dict[int, str] = {}  # VLAN -> what holds it
        self._done: dict[str, anyio.Event] = {}  # rid of a creating record -> finished
        self._outcome: dict[str, BaseException | BranchRecord] = {}  # token -> result
        self._step: dict[str, str] = {}  # rid -> step of its running workflow
        self._deleting: set[str] = set()  # rids with a deletion task running
        self._attempts: dict[str, tuple[int, float]] = {}  # rid -> (failures, next try)
        self._orphaned: dict[str, float] = {}  # rid -> when first seen without its pod
        self._limiter = anyio.CapacityLimiter(deleters)
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts().items())
        return f"<BranchManager limit={self.limit} {counts} external={len(self._external)}>"

    # -- views --------------------------------------------------------------------------------

    def records(self) -> list[BranchRecord]:
        return sorted(self._records.values(), key=lambda r: (r.vlan, r.rid))

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in State}
        for r in self._records.values():
            out[r.state.value] += 1
        return out

    def used(self) -> int:
        """Branch slots of the trunk taken now (ours holding a VLAN, and everyone else's)."""
        return sum(r.holds_vlan for r in self._records.values()) + len(self._external)

    @property
    def external(self) -> Mapping[int, str]:
        return dict(self._external)

    def of_pod(self, key: str) -> BranchRecord | None:
        for r in self._records.values():
            if r.pod == key and r.state in (State.CREATING, State.ASSOCIATED):
                return r
        return None

    def next_free_in(self) -> float | None:
        """Seconds until the earliest cooling branch starts its deletion."""
        ends = [r.since + self.cooldown for r in self._records.values() if r.state is State.COOLING]
        return max(0.0, min(ends) - self.wall()) if ends else None

    # -- live changes -------------------------------------------------------------------------

    async def retarget(self, key: str, groups: tuple[str, ...]) -> BranchRecord:
        """Give the associated branch of pod ``key`` the security groups ``groups`` (EC2
        replaces the whole set), under the workflow deadline; return its record. Raises
        BranchError when the pod has no associated branch, CloudError (or TimeoutError) when
        EC2 refuses: the record keeps the groups the branch still has."""
        rec = self.of_pod(key)
        if rec is None or rec.state is not State.ASSOCIATED or not rec.eni_id:
            raise BranchError(f"pod {key} has no associated branch ENI")
        if rec.groups == groups:
            return rec
        with anyio.fail_after(self.deadline):
            await self.cloud.set_groups(rec.eni_id, groups)
        now = self._records.get(rec.rid)
        if now is None:  # released while EC2 answered: the branch has the groups regardless
            return attrs.evolve(rec, groups=groups)
        now = attrs.evolve(now, groups=groups)
        self._records[rec.rid] = now
        self.publish("branch.retargeted", branch=rec.eni_id, vlan=rec.vlan, groups=list(groups))
        await self._save()
        return now

    # -- external VLANs (EKS-made branches on our trunk) -------------------------------------

    def hold_external(self, vlan: int, what: str) -> None:
        self._external[vlan] = what

    def drop_external(self, vlan: int) -> None:
        self._external.pop(vlan, None)

    # -- restore ------------------------------------------------------------------------------

    async def restore(
        self, saved: Sequence[BranchRecord], in_use: Mapping[str, BranchRecord]
    ) -> Reconciled:
        """Rebuild the records from the checkpoint, the live allocations and the cloud (see the
        module docstring); raises CloudError when the cloud cannot be read."""
        branches = await self.cloud.branches()
        associations = await self.cloud.associations()
        result = reconcile(saved, in_use, branches, associations, self.wall())
        self._records = {r.rid: r for r in result.records}
        self._external.update(result.external)
        for line in result.changes:
            log.warning("branch restore: %s", line)
            self.publish("branch.restored", change=line)
        self._wake.set()
        return result

    def load(self, records: Iterable[BranchRecord]) -> None:
        """Take records as they are (tests; no cloud)."""
        self._records = {r.rid: r for r in records}
        self._wake.set()

    # -- the pod side ---------------------------------------------------------------------------

    async def acquire(
        self, key: str, *, groups: Sequence[str], pod_name: str = "", wait: float = 20.0
    ) -> BranchRecord:
        """Return the pod's associated branch, making one if it has none.

        Raises BranchLimitReached (the trunk is full), BranchPending (still being made after
        ``wait`` seconds: the workflow goes on), BranchFailed (the workflow failed and was
        undone), RuntimeError when ``run`` is not running.
        """
        groups = tuple(groups)
        rec = self.of_pod(key)
        if rec is not None and rec.groups != groups:
            # The same sandbox asks for other groups: its old branch goes, a new one comes.
            self._to_cooling(rec, "groups changed")
            rec = None
        if rec is not None and rec.state is State.ASSOCIATED:
            self._orphaned.pop(rec.rid, None)
            return rec
        if rec is None:
            rec = self._start(key, groups, pod_name)
        done = self._done[rec.rid]
        token = rec.token
        with anyio.move_on_after(wait):
            await done.wait()
        outcome = self._outcome.pop(token, None)
        if isinstance(outcome, BranchRecord):
            return outcome
        if isinstance(outcome, BaseException):
            raise outcome
        now = self._records.get(rec.rid) or self._records.get(self._rid_of_token(token), rec)
        if now.state is State.ASSOCIATED and now.pod == key:
            return now
        raise BranchPending(rec.vlan, self._step.get(now.rid, now.state.value))

    @property
    def running(self) -> bool:
        """Whether ``run`` is running (workflows can start)."""
        return self._tg is not None

    def _rid_of_token(self, token: str) -> str:
        for rid, r in self._records.items():
            if r.token == token:
                return rid
        return ""

    def _start(self, key: str, groups: tuple[str, ...], pod_name: str) -> BranchRecord:
        if self._tg is None:
            raise RuntimeError("the branch manager is not running")
        if self.used() >= self.limit:
            raise BranchLimitReached(
                limit=self.limit, counts=self._limit_counts(), next_free_in=self.next_free_in()
            )
        vlan = lowest_free_vlan(
            [r.vlan for r in self._records.values() if r.holds_vlan] + list(self._external)
        )
        if vlan is None:
            raise BranchLimitReached(
                limit=self.limit, counts=self._limit_counts(), next_free_in=None
            )
        token = secrets.token_hex(16)
        now = self.wall()
        rec = BranchRecord(
            rid=f"creating:{token}",
            vlan=vlan,
            state=State.CREATING,
            pod=key,
            pod_name=pod_name,
            groups=groups,
            token=token,
            since=now,
            created_at=now,
        )
        self._records[rec.rid] = rec
        self._done[rec.rid] = anyio.Event()
        self._step[rec.rid] = "create"
        self.publish("branch.creating", vlan=vlan, pod=pod_name or key, groups=",".join(groups))
        self._tg.start_soon(self._create, rec.rid)
        return rec

    def _limit_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in State}
        for r in self._records.values():
            if r.holds_vlan:
                counts[r.state.value] += 1
        counts["held by others"] = len(self._external)
        return {("in use" if k == "associated" else k): v for k, v in counts.items()}

    def release(self, key: str) -> BranchRecord | None:
        """The pod is deleted: its branch cools down (one still being made is deleted when its
        workflow ends). Returns the record, or None when the pod had no branch. The caller
        commits the checkpoint."""
        rec = self.of_pod(key)
        if rec is None:
            return None
        if rec.state is State.CREATING:
            self._records[rec.rid] = attrs.evolve(rec, pod="")
            return self._records[rec.rid]
        return self._to_cooling(rec, "pod deleted")

    def _to_cooling(self, rec: BranchRecord, why: str) -> BranchRecord:
        cooled = attrs.evolve(rec, state=State.COOLING, pod="", since=self.wall())
        self._records[rec.rid] = cooled
        self._orphaned.pop(rec.rid, None)
        self.publish(
            "branch.cooling",
            branch=rec.eni_id,
            vlan=rec.vlan,
            pod=rec.pod_name,
            cooldown_s=self.cooldown,
            reason=why,
        )
        self._wake.set()
        return cooled

    def sweep(self, live: Callable[[str], bool]) -> list[BranchRecord]:
        """Associated branches whose pod ``live`` no longer knows, for ``orphan_grace``
        seconds, go to cooling; returns them (the caller commits)."""
        now = self.wall()
        moved = []
        for rec in list(self._records.values()):
            if rec.state is not State.ASSOCIATED or live(rec.pod):
                self._orphaned.pop(rec.rid, None)
                continue
            first = self._orphaned.setdefault(rec.rid, now)
            if now - first >= self.orphan_grace:
                moved.append(self._to_cooling(rec, "no pod holds it"))
        return moved

    async def collect_leaked(self, grace: float) -> list[str]:
        """Delete branch ENIs with our tags that no record knows, not associated, made at least
        ``grace`` seconds ago (a workflow that died before recording them); return their ids.
        Raises CloudError when the cloud cannot be read; a failed deletion is logged and left
        for the next round.

        The records are read once EC2 has answered: a branch made while the describe was in
        flight is known by then. A branch on the VLAN of a workflow still creating is spared:
        EC2 may hold it before the workflow has its id (the createdAt tag is in whole seconds,
        so a grace alone cannot tell it from a leak)."""
        found = await self.cloud.branches()
        known = {r.eni_id for r in self._records.values() if r.eni_id}
        creating = {r.vlan for r in self._records.values() if not r.eni_id}
        now = self.wall()
        deleted = []
        for b in found:
            if b.eni_id in known or b.vlan in creating or b.status != "available":
                continue
            if b.created_at is None or now - b.created_at < grace:
                continue
            try:
                await self.cloud.delete_branch(b.eni_id)
            except CloudError as e:
                log.warning(
                    "leaked branch not deleted", extra={"branch": b.eni_id, "error": str(e)}
                )
                continue
            log.info("deleted leaked branch ENI", extra={"branch": b.eni_id, "vlan": b.vlan})
            self.publish("branch.leak-deleted", branch=b.eni_id, vlan=b.vlan)
            deleted.append(b.eni_id)
        return deleted

    # -- workflows ----------------------------------------------------------------------------

    async def _save(self) -> None:
        if self._commit is not None:
            try:
                await self._commit()
            except OSError as e:
                log.error("checkpoint write failed in a branch workflow", extra={"error": str(e)})

    async def _create(self, rid: str) -> None:
        rec = self._records[rid]
        token = rec.token
        started = anyio.current_time()
        eni: BranchEni | None = None
        assoc = ""
        step = "create"
        outcome: BaseException | BranchRecord
        try:
            with anyio.fail_after(self.deadline):
                eni = await self.cloud.create_branch(
                    vlan=rec.vlan,
                    groups=rec.groups,
                    pod=rec.pod_name or rec.pod,
                    client_token=token,
                )
                rec = attrs.evolve(
                    self._records.pop(rid),
                    rid=eni.eni_id,
                    eni_id=eni.eni_id,
                    mac=eni.mac,
                    ip=eni.ip,
                    subnet_cidr=eni.subnet_cidr,
                )
                self._records[eni.eni_id] = rec
                self._step[eni.eni_id] = step = "associate"
                self._done[eni.eni_id] = self._done.pop(rid)
                rid = eni.eni_id
                self.publish("branch.created", branch=eni.eni_id, vlan=rec.vlan, ip=str(eni.ip))
                await self._save()
                assoc = await self.cloud.associate(
                    branch_id=eni.eni_id, vlan=rec.vlan, client_token=token
                )
        except Exception as e:
            cause: BaseException = e
            if isinstance(e, TimeoutError):
                cause = TimeoutError(f"no answer within {self.deadline:g}s")
            if isinstance(e, CloudRequestFailed) and step == "associate":
                await self._learn_vlans()
            with anyio.CancelScope(shield=True):
                await self._undo(rid, eni, assoc)
            outcome = BranchFailed(step, cause)
            self.on_workflow("create", type(e).__name__, anyio.current_time() - started)
            self.publish("branch.failed", vlan=rec.vlan, step=step, error=str(cause))
            log.warning(
                "branch workflow failed",
                extra={"vlan": rec.vlan, "step": step, "error": str(cause)},
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._undo(rid, eni, assoc)
            self._finish(rid, token, BranchFailed(step, RuntimeError("agent stopping")))
            raise
        else:
            rec = attrs.evolve(
                self._records[rid], state=State.ASSOCIATED, association_id=assoc, since=self.wall()
            )
            self._records[rid] = rec
            self.on_workflow("create", "ok", anyio.current_time() - started)
            self.publish(
                "branch.associated",
                branch=rec.eni_id,
                vlan=rec.vlan,
                association=assoc,
                pod=rec.pod_name or rec.pod,
            )
            if not rec.pod:  # its pod was deleted meanwhile: it never carried traffic
                rec = attrs.evolve(rec, state=State.DELETING, since=self.wall())
                self._records[rid] = rec
                self._wake.set()
            await self._save()
            outcome = rec
        self._finish(rid, token, outcome)

    def _finish(self, rid: str, token: str, outcome: BaseException | BranchRecord) -> None:
        self._step.pop(rid, None)
        self._outcome[token] = outcome
        done = self._done.pop(rid, None)
        if done is not None:
            done.set()
        # Nobody may be waiting for it (the ADD gave up): keep the outcome of a finished
        # workflow for one later acquire, but never more than a few.
        while len(self._outcome) > 64:
            self._outcome.pop(next(iter(self._outcome)))

    async def _undo(self, rid: str, eni: BranchEni | None, assoc: str) -> None:
        if eni is None:
            self._records.pop(rid, None)
            await self._save()
            return
        try:
            with anyio.fail_after(self.deadline):
                if assoc:
                    await self.cloud.disassociate(assoc)
                await self.cloud.delete_branch(eni.eni_id)
        except (CloudError, TimeoutError) as e:
            log.error(
                "undo of a failed branch incomplete; the reaper retries",
                extra={"branch": eni.eni_id, "error": str(e)},
            )
            rec = self._records.get(rid)
            if rec is not None:
                self._records[rid] = attrs.evolve(
                    rec, state=State.DELETING, association_id=assoc, since=self.wall(), pod=""
                )
            self._wake.set()
        else:
            self._records.pop(rid, None)
        await self._save()

    async def _learn_vlans(self) -> None:
        """An association was refused: learn which VLANs of the trunk others hold."""
        try:
            associations = await self.cloud.associations()
        except CloudError:
            return
        ours = {r.eni_id for r in self._records.values() if r.eni_id}
        for a in associations:
            if a.branch_id not in ours:
                self._external.setdefault(a.vlan, f"association {a.association_id}")

    async def _delete(self, rid: str) -> None:
        started = anyio.current_time()
        try:
            async with self._limiter:
                rec = self._records[rid]
                self.publish("branch.deleting", branch=rec.eni_id, vlan=rec.vlan)
                with anyio.fail_after(self.deadline):
                    assoc = rec.association_id
                    if not assoc and rec.eni_id:
                        assoc = next(
                            (
                                a.association_id
                                for a in await self.cloud.associations()
                                if a.branch_id == rec.eni_id
                            ),
                            "",
                        )
                    if assoc:
                        await self.cloud.disassociate(assoc)
                        rec = attrs.evolve(self._records[rid], association_id="")
                        self._records[rid] = rec
                        self.publish("branch.disassociated", branch=rec.eni_id, vlan=rec.vlan)
                    if rec.eni_id:
                        await self.cloud.delete_branch(rec.eni_id)
        except (CloudError, TimeoutError) as e:
            failures, _ = self._attempts.get(rid, (0, 0.0))
            failures += 1
            delay = self.backoff.delay(failures)
            self._attempts[rid] = (failures, self.wall() + delay)
            if rid in self._records:
                self._records[rid] = attrs.evolve(self._records[rid], error=str(e))
            self.on_workflow("delete", type(e).__name__, anyio.current_time() - started)
            log.warning(
                "branch deletion failed; retrying",
                extra={
                    "branch": rid,
                    "attempt": failures,
                    "retry_in_s": round(delay, 2),
                    "error": str(e),
                },
            )
        else:
            self._records.pop(rid, None)
            self._attempts.pop(rid, None)
            self.on_workflow("delete", "ok", anyio.current_time() - started)
            self.publish("branch.deleted", branch=rec.eni_id, vlan=rec.vlan)
            await self._save()
        finally:
            self._deleting.discard(rid)
            self._wake.set()

    # -- the reaper ---------------------------------------------------------------------------

    def _due(self) -> tuple[list[str], float | None]:
        """Records to delete now (cooling ones past their cooldown move to deleting), and when
        the next one is due."""
        now = self.wall()
        due: list[str] = []
        later: list[float] = []
        for rid, r in list(self._records.items()):
            if r.state is State.COOLING:
                end = r.since + self.cooldown
                if end > now:
                    later.append(end)
                    continue
                self._records[rid] = r = attrs.evolve(r, state=State.DELETING, since=now)
            if r.state is not State.DELETING or rid in self._deleting:
                continue
            _, retry_at = self._attempts.get(rid, (0, 0.0))
            if retry_at > now:
                later.append(retry_at)
                continue
            due.append(rid)
        return due, min(later, default=None)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[BranchManager] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the workflows and the reaper until cancelled; hands back this manager."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started(self)
            try:
                while True:
                    self._wake = anyio.Event()
                    due, next_at = self._due()
                    moved = False
                    for rid in due:
                        self._deleting.add(rid)
                        tg.start_soon(self._delete, rid)
                        moved = True
                    if moved:
                        await self._save()
                    wait = math.inf if next_at is None else max(0.0, next_at - self.wall())
                    with anyio.move_on_after(wait):
                        await self._wake.wait()
            finally:
                self._tg = None
