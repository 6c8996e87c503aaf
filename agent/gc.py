"""Garbage collection of leaked pod attachments: a pure planner and a thin executor.

Theory of operation.

- Look, plan, act. ``observe`` reads the kernel and /proc (host veths with our prefix, policy
  rules at our priorities, and for each allocation's namespace path whether it exists and
  whether a process is in it). ``plan`` is a pure function of the allocations, that
  observation, the keys with an operation in flight, the time, the policy and the *sightings*
  of earlier looks; it returns what to collect, why, and the sightings to carry forward.
  ``collect`` does it.
- Two looks, a grace apart. Nothing is collected on one look: each suspect is remembered with
  the time it was first seen suspect, and collected only when a later look still finds it so
  and the grace has passed (``now - first_seen >= grace``). A suspect that looks healthy again,
  whose key has an operation in flight, or that is planned for collection, is forgotten (a
  collection that fails starts its grace over).
  (a) An allocation whose namespace path is gone or whose host veth is gone: grace
      ``missing_grace`` (10 s: a DEL may be in flight). Released: host route and rules removed,
      address to cooldown, checkpoint written, veth deleted in the background.
  (b) An allocation whose namespace exists but no process is in it (its sandbox died and no
      DEL came): grace ``orphan_grace`` (60 s; None disables). Released like (a); its bind
      mount is detached and removed only with ``own_netns_mounts`` and only inside
      ``netns_dirs``.
  (c) A host veth with our prefix that no allocation names, and a rule at one of our
      priorities, in the shape we make, whose address no allocation holds: grace
      ``missing_grace``. Nothing else is ever planned: other names, other priorities, other
      rule shapes are someone else's.
- Acting re-checks. GC never waits for a busy key: a key with an operation in flight is
  skipped, and every release re-checks under the key's lock that the allocation is the one
  planned and still missing / unheld. Stray veths are handed to the CNI service's background
  deleter after a synchronous re-check, so an ADD that takes the name afterwards waits for the
  deletion; a stray rule's address is put into cooldown first, so no ADD is handed it while its
  old rule is being removed.
- ``GcService.serve`` runs a look on a jittered timer, when poked (the watcher saw a host veth
  go), and exactly when the earliest suspect's grace ends, replaying the DEL spool each time.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Literal, Protocol

import anyio
import anyio.abc
import attrs

from agent.checkpoint import Allocation
from agent.cni import spool
from agent.cni.service import CniService
from agent.cni.spec import PodKey
from agent.netns_holders import NetnsFact, probe, remove_netns_mount, under
from netlink.errors import NetlinkError
from netlink.names import HOST_VETH_PREFIXES, host_veth_name
from netlink.requests import RT_TABLE_MAIN
from netlink.veth import RULE_FROM_PRIORITY, RULE_TO_PRIORITY, PodNet
from netlink.watcher import Batch, Item, RuleEvent

log = logging.getLogger("podwire.gc")

Probe = Callable[[Sequence[str]], Awaitable[Mapping[str, NetnsFact]]]
Cause = Literal["netns gone", "veth gone", "netns unheld"]


@attrs.frozen(kw_only=True)
class GcPolicy:
    missing_grace: float = 10.0
    orphan_grace: float | None = 60.0
    own_netns_mounts: bool = False
    netns_dirs: tuple[str, ...] = ("/run/netns",)
    veth_prefix: tuple[str, ...] = HOST_VETH_PREFIXES
    rule_priorities: frozenset[int] = frozenset({RULE_TO_PRIORITY, RULE_FROM_PRIORITY})


@attrs.frozen(kw_only=True)
class PolicyRule:
    """A rule in a shape the datapath makes: ``from ip lookup table`` at 1536, or
    ``to ip lookup main`` at 512."""

    priority: int
    ip: IPv4Address
    table: int

    def __str__(self) -> str:
        way = "from" if self.priority == RULE_FROM_PRIORITY else "to"
        return f"rule {self.priority}: {way} {self.ip} lookup {self.table}"


def policy_rule(rule: RuleEvent) -> PolicyRule | None:
    """Return ``rule`` as a PolicyRule if the datapath could have made it, else None."""
    plain = rule.fwmark is None and not rule.iifname and rule.action == 1
    if not plain:
        return None
    if (
        rule.priority == RULE_FROM_PRIORITY
        and rule.src is not None
        and rule.src_len == 32
        and rule.dst_len == 0
    ):
        return PolicyRule(priority=rule.priority, ip=rule.src, table=rule.table)
    if (
        rule.priority == RULE_TO_PRIORITY
        and rule.dst is not None
        and rule.dst_len == 32
        and rule.src_len == 0
        and rule.table == RT_TABLE_MAIN
    ):
        return PolicyRule(priority=rule.priority, ip=rule.dst, table=rule.table)
    return None


@attrs.frozen(kw_only=True)
class Observations:
    """One look. A namespace path absent from ``netns`` is unknown, and never acted on."""

    netns: Mapping[str, NetnsFact] = attrs.field(factory=dict)
    host_veths: frozenset[str] = frozenset()
    rules: tuple[PolicyRule, ...] = ()


@attrs.frozen(kw_only=True)
class Sightings:
    """When each suspect was first seen suspect, by earlier looks (monotonic seconds)."""

    missing: Mapping[PodKey, float] = attrs.field(factory=dict)
    unheld: Mapping[PodKey, float] = attrs.field(factory=dict)
    veths: Mapping[str, float] = attrs.field(factory=dict)
    rules: Mapping[PolicyRule, float] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Release:
    alloc: Allocation
    cause: Cause
    reason: str
    unmount: bool = False

    @property
    def key(self) -> PodKey:
        return self.alloc.key


@attrs.frozen(kw_only=True)
class GcPlan:
    at: float  # the time of the look (monotonic seconds)
    releases: tuple[Release, ...] = ()
    veths: Mapping[str, str] = attrs.field(factory=dict)  # name -> reason
    rules: Mapping[PolicyRule, str] = attrs.field(factory=dict)  # rule -> reason
    in_flight: tuple[PodKey, ...] = ()
    sightings: Sightings = Sightings()
    next_due: float | None = None  # when the earliest remembered suspect's grace ends

    @property
    def release(self) -> tuple[PodKey, ...]:
        return tuple(r.key for r in self.releases)

    @property
    def delete_veths(self) -> tuple[str, ...]:
        return tuple(self.veths)

    @property
    def delete_rules(self) -> tuple[PolicyRule, ...]:
        return tuple(self.rules)

    @property
    def unmount(self) -> tuple[str, ...]:
        return tuple(r.alloc.netns for r in self.releases if r.unmount)

    def describe(self) -> list[str]:
        """One line per planned action, with its reason (``agentctl gc --dry-run``)."""
        lines = [f"release {r.key} ({r.alloc.ip}): {r.reason}" for r in self.releases]
        lines += [f"unmount {path}: namespace of a released pod" for path in self.unmount]
        lines += [f"delete veth {name}: {why}" for name, why in self.veths.items()]
        lines += [f"delete {rule}: {why}" for rule, why in self.rules.items()]
        return lines


def plan(
    allocations: Iterable[Allocation],
    observations: Observations,
    in_flight: Callable[[PodKey], bool] | frozenset[PodKey],
    now: float,
    policy: GcPolicy,
    sightings: Sightings = Sightings(),
) -> GcPlan:
    """Decide what to collect now; pure. See the module's theory for the rules."""
    busy = in_flight.__contains__ if isinstance(in_flight, frozenset) else in_flight
    allocs = list(allocations)
    missing: dict[PodKey, float] = {}
    unheld: dict[PodKey, float] = {}
    releases: list[Release] = []
    skipped: list[PodKey] = []
    dues: list[float] = []

    def ripe(first: float, grace: float) -> bool:
        if now - first >= grace:
            return True
        dues.append(first + grace)
        return False

    for a in allocs:
        if busy(a.key):
            skipped.append(a.key)
            continue
        fact = observations.netns.get(a.netns)
        cause: Cause | None = None
        if fact is not None and not fact.exists:
            cause, what = "netns gone", f"pod netns {a.netns} is gone"
        elif a.host_veth not in observations.host_veths:
            cause, what = "veth gone", f"host veth {a.host_veth} is gone"
        if cause is not None:
            first = sightings.missing.get(a.key, now)
            if not ripe(first, policy.missing_grace):
                missing[a.key] = first
                continue
            releases.append(Release(alloc=a, cause=cause, reason=f"{what} (for {now - first:g} s)"))
            continue
        if fact is not None and not fact.held and policy.orphan_grace is not None:
            first = sightings.unheld.get(a.key, now)
            if not ripe(first, policy.orphan_grace):
                unheld[a.key] = first
            else:
                releases.append(
                    Release(
                        alloc=a,
                        cause="netns unheld",
                        reason=f"no process in pod netns {a.netns} (for {now - first:g} s)",
                        unmount=policy.own_netns_mounts and under(a.netns, policy.netns_dirs),
                    )
                )

    owned_veths = {a.host_veth for a in allocs}
    stray_veths: dict[str, float] = {}
    veths: dict[str, str] = {}
    for name in sorted(observations.host_veths):
        if not name.startswith(policy.veth_prefix) or name in owned_veths:
            continue
        first = sightings.veths.get(name, now)
        if ripe(first, policy.missing_grace):
            veths[name] = f"no allocation names it (for {now - first:g} s)"
        else:
            stray_veths[name] = first

    owned_ips = {a.ip for a in allocs}
    stray_rules: dict[PolicyRule, float] = {}
    rules: dict[PolicyRule, str] = {}
    for rule in observations.rules:
        if rule.priority not in policy.rule_priorities or rule.ip in owned_ips:
            continue
        first = sightings.rules.get(rule, now)
        if ripe(first, policy.missing_grace):
            rules[rule] = f"no allocation holds {rule.ip} (for {now - first:g} s)"
        else:
            stray_rules[rule] = first

    return GcPlan(
        at=now,
        releases=tuple(releases),
        veths=veths,
        rules=rules,
        in_flight=tuple(skipped),
        sightings=Sightings(missing=missing, unheld=unheld, veths=stray_veths, rules=stray_rules),
        next_due=min(dues, default=None),
    )


# --- the shell ------------------------------------------------------------------------------


class GcKernel(Protocol):
    """What GC needs of the kernel beyond the CNI service's datapath."""

    async def host_veths(self) -> dict[str, int]: ...
    async def link_exists(self, name: str) -> bool: ...
    async def policy_rules(self) -> Sequence[RuleEvent]: ...
    async def delete_rules(self, rules: Sequence[PolicyRule]) -> None: ...


class KernelGc:
    """GcKernel over the CNI datapath (links, rule deletion) and the watcher (rule dumps)."""

    def __init__(
        self, datapath: _Datapath, rules: Callable[[], Awaitable[Sequence[RuleEvent]]]
    ) -> None:
        self._dp = datapath
        self._rules = rules

    async def host_veths(self) -> dict[str, int]:
        return await self._dp.host_veths()

    async def link_exists(self, name: str) -> bool:
        return await self._dp.link_exists(name)

    async def policy_rules(self) -> Sequence[RuleEvent]:
        return await self._rules()

    async def delete_rules(self, rules: Sequence[PolicyRule]) -> None:
        """Delete the rules of each address; unwire_host removes both rules of an address and
        finds "already gone" fine. The host veth name given is one no link has."""
        tables: dict[IPv4Address, int] = {}
        for r in rules:
            if r.priority == RULE_FROM_PRIORITY or r.ip not in tables:
                tables[r.ip] = r.table
        for ip, table in tables.items():
            await self._dp.unwire_host(
                PodNet(
                    netns="",
                    ifname="",
                    host_veth=host_veth_name("podwire-gc", str(ip), "-"),
                    ip=ip,
                    mtu=0,
                    table=table,
                )
            )


class _Datapath(Protocol):
    async def host_veths(self) -> dict[str, int]: ...
    async def link_exists(self, name: str) -> bool: ...
    async def unwire_host(self, pod: PodNet) -> None: ...


async def probe_in_thread(paths: Sequence[str]) -> Mapping[str, NetnsFact]:
    """The default Probe: scan /proc and stat the paths in a worker thread."""
    return await anyio.to_thread.run_sync(probe, paths)


async def observe(
    allocations: Iterable[Allocation], kernel: GcKernel, *, probe_netns: Probe = probe_in_thread
) -> Observations:
    """Look at the kernel and /proc. Raises NetlinkError when the kernel cannot be read."""
    paths = sorted({a.netns for a in allocations})
    veths = await kernel.host_veths()
    raw_rules = await kernel.policy_rules()
    facts = await probe_netns(paths)
    rules = tuple(r for r in map(policy_rule, raw_rules) if r is not None)
    return Observations(netns=dict(facts), host_veths=frozenset(veths), rules=rules)


@attrs.frozen(kw_only=True)
class GcReport:
    """What one collection did (or, with ``dry_run``, would do)."""

    dry_run: bool
    at: float  # the time of the look the plan came from
    released: int = 0
    veths: int = 0
    rules: int = 0
    unmounted: int = 0
    skipped_busy: int = 0  # in flight at planning or at acting
    changed: int = 0  # looked fine again on the re-check
    errors: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()  # the plan, described
    branch_objects: int = 0  # VLAN links, iif rules, strict chains (agent.sg.gc)

    @property
    def collected(self) -> int:
        return self.released + self.veths + self.rules + self.unmounted + self.branch_objects


async def collect(
    cni: CniService,
    kernel: GcKernel,
    gc_plan: GcPlan,
    *,
    dry_run: bool = False,
    policy: GcPolicy = GcPolicy(),
    probe_netns: Probe = probe_in_thread,
) -> GcReport:
    """Carry out ``gc_plan``, re-checking each item; return what was done. Never raises for
    one item's failure: errors are counted and reported."""
    lines = tuple(gc_plan.describe())
    if dry_run:
        return GcReport(
            dry_run=True,
            at=gc_plan.at,
            released=len(gc_plan.releases),
            veths=len(gc_plan.veths),
            rules=len(gc_plan.rules),
            unmounted=len(gc_plan.unmount),
            skipped_busy=len(gc_plan.in_flight),
            lines=lines,
        )
    released = unmounted = changed = 0
    skipped = len(gc_plan.in_flight)
    errors: list[str] = []
    facts: Mapping[str, NetnsFact] = {}
    if gc_plan.releases:
        facts = await probe_netns(sorted({r.alloc.netns for r in gc_plan.releases}))
    for r in gc_plan.releases:
        if cni.locks.busy(r.key):
            skipped += 1
            continue
        try:
            async with cni.locks.hold(r.key):
                if cni.allocations.get(r.key) != r.alloc or not await _still(r, kernel, facts):
                    changed += 1
                    continue
                await cni._release(r.key)
            released += 1
            log.info(
                "gc released", extra={"key": str(r.key), "ip": str(r.alloc.ip), "reason": r.reason}
            )
        except (NetlinkError, OSError) as e:
            errors.append(f"release {r.key}: {e}")
            continue
        if r.unmount:
            try:
                if await anyio.to_thread.run_sync(
                    remove_netns_mount, r.alloc.netns, policy.netns_dirs
                ):
                    unmounted += 1
                    log.info("gc unmounted netns", extra={"path": r.alloc.netns})
            except Exception as e:
                errors.append(f"unmount {r.alloc.netns}: {e}")

    # Re-check and hand over with no await in between (``delete`` queues the names before its
    # first await): an ADD recording one of these names after this point waits for it.
    owned = {a.host_veth for a in cni.allocations.values()}
    veths = [name for name in gc_plan.veths if name not in owned]
    changed += len(gc_plan.veths) - len(veths)
    if veths:
        log.info("gc deleting stray veths", extra={"veths": len(veths)})
        try:
            await cni.deleter.delete(veths)
        except (NetlinkError, OSError) as e:
            errors.append(f"delete veths: {e}")

    held = {a.ip for a in cni.allocations.values()}
    rules = [r for r in gc_plan.rules if r.ip not in held and cni.pool.holder(r.ip) is None]
    changed += len(gc_plan.rules) - len(rules)
    cooling = dict(cni.pool.cooling_items())
    for rule in rules:
        if rule.ip not in cooling:
            cni.pool.cool(rule.ip, cni.clock())  # a no-op for addresses the pool does not own
    if rules:
        try:
            await kernel.delete_rules(rules)
            log.info("gc deleted stray rules", extra={"rules": len(rules)})
        except NetlinkError as e:
            errors.append(f"delete rules: {e}")
            rules = []
    return GcReport(
        dry_run=False,
        at=gc_plan.at,
        released=released,
        veths=len(veths),
        rules=len(rules),
        unmounted=unmounted,
        skipped_busy=skipped,
        changed=changed,
        errors=tuple(errors),
        lines=lines,
    )


async def _still(r: Release, kernel: GcKernel, facts: Mapping[str, NetnsFact]) -> bool:
    fact = facts.get(r.alloc.netns)
    if r.cause == "netns gone":
        return fact is not None and not fact.exists
    if r.cause == "veth gone":
        return not await kernel.link_exists(r.alloc.host_veth)
    return fact is not None and fact.exists and not fact.held


@attrs.define
class GcTotals:
    runs: int = 0
    released: int = 0
    veths: int = 0
    rules: int = 0
    unmounted: int = 0
    errors: int = 0


class ExtraReport(Protocol):
    @property
    def collected(self) -> int: ...
    @property
    def lines(self) -> tuple[str, ...]: ...
    @property
    def errors(self) -> tuple[str, ...]: ...


class ExtraGc(Protocol):
    """More to collect on each look (``agent.sg.gc.SgGc``)."""

    async def run_once(self, *, dry_run: bool = False) -> ExtraReport: ...


class GcService:
    """Runs GC on a jittered timer, when poked, and when a suspect's grace ends."""

    def __init__(
        self,
        cni: CniService,
        kernel: GcKernel,
        *,
        policy: GcPolicy = GcPolicy(),
        interval: float = 60.0,
        jitter: float = 0.1,
        spool_dir: Path | None = None,
        probe_netns: Probe = probe_in_thread,
        rng: random.Random | None = None,
        extra: ExtraGc | None = None,
    ) -> None:
        self.extra = extra  # security groups for pods: the branch datapath's own collection
        self.cni = cni
        self.kernel = kernel
        self.policy = policy
        self.interval = interval
        self.jitter = jitter
        self.spool_dir = spool_dir
        self.probe_netns = probe_netns
        self.rng = rng or random.Random()
        self.sightings = Sightings()
        self.totals = GcTotals()
        self.last: GcReport | None = None
        self._poked = anyio.Event()
        self._next_due: float | None = None

    def __repr__(self) -> str:
        t = self.totals
        return (
            f"<GcService runs={t.runs} released={t.released} veths={t.veths} rules={t.rules}"
            f" unmounted={t.unmounted} suspects={self.suspects}>"
        )

    @property
    def suspects(self) -> int:
        s = self.sightings
        return len(s.missing) + len(s.unheld) + len(s.veths) + len(s.rules)

    def poke(self) -> None:
        """Run a look soon (without waiting for the timer)."""
        self._poked.set()

    def on_watch(self, item: Item) -> None:
        """Watcher callback: poke when the host veth of a live allocation went away, or after a
        resync. The veths DEL and GC delete are not news (a look per DEL would cost more CPU
        than the DEL itself): their allocations are gone by the time the batch arrives."""
        if not isinstance(item, Batch):
            self.poke()
            return
        gone = {e.name for e in item.links_gone(self.policy.veth_prefix)}
        if gone and any(a.host_veth in gone for a in self.cni.allocations.values()):
            self.poke()

    async def run_once(self, *, dry_run: bool = False) -> GcReport:
        """Replay the DEL spool, look, plan and collect; return the report.

        A dry run neither replays, acts, nor remembers its sightings. Raises NetlinkError /
        OSError when the look itself fails.
        """
        if self.spool_dir is not None and not dry_run:
            await spool.replay(self.spool_dir, self.cni.delete)
        obs = await observe(
            list(self.cni.allocations.values()), self.kernel, probe_netns=self.probe_netns
        )
        # Planned against the allocations as they are after the look: one made meanwhile has an
        # unknown namespace (never acted on) and at worst a sighting that the next look clears.
        now = self.cni.clock()
        the_plan = plan(
            list(self.cni.allocations.values()),
            obs,
            self.cni.locks.busy,
            now,
            self.policy,
            self.sightings,
        )
        report = await collect(
            self.cni,
            self.kernel,
            the_plan,
            dry_run=dry_run,
            policy=self.policy,
            probe_netns=self.probe_netns,
        )
        if self.extra is not None:
            try:
                more = await self.extra.run_once(dry_run=dry_run)
            except (NetlinkError, OSError) as e:
                report = attrs.evolve(report, errors=(*report.errors, f"branch datapath: {e}"))
            else:
                report = attrs.evolve(
                    report,
                    lines=report.lines + more.lines,
                    errors=report.errors + more.errors,
                    branch_objects=more.collected,
                )
        if dry_run:
            return report
        self.sightings = the_plan.sightings
        self._next_due = the_plan.next_due
        t = self.totals
        t.runs += 1
        t.released += report.released
        t.veths += report.veths
        t.rules += report.rules
        t.unmounted += report.unmounted
        t.errors += len(report.errors)
        self.last = report
        if report.collected or report.errors:
            log.info(
                "gc collected",
                extra={
                    "released": report.released,
                    "veths": report.veths,
                    "rules": report.rules,
                    "unmounted": report.unmounted,
                    "errors": list(report.errors),
                },
            )
        return report

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run looks until cancelled: now, then at every jittered interval, when poked, and
        when the earliest suspect's grace ends. A failed look is logged and retried later."""
        task_status.started()
        while True:
            self._poked = anyio.Event()
            try:
                await self.run_once()
            except (NetlinkError, OSError) as e:
                log.error("gc look failed", extra={"error": str(e)})
            wait = self.interval * (1 + self.jitter * (2 * self.rng.random() - 1))
            if self._next_due is not None:
                wait = min(wait, max(0.0, self._next_due - self.cni.clock()))
            with anyio.move_on_after(wait if math.isfinite(wait) else None):
                await self._poked.wait()
