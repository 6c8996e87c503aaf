"""The warm-pool refiller: keeps the node's pool at target by asking the cloud for more
addresses, or giving back what is over.

Theory of operation. One long-lived task. Every ``interval`` seconds, and at once when a CNI
ADD finds the pool empty (its demand event), it takes a snapshot -- per ENI the pool's counts
(``IpPool.owner_counts``) and the provider's facts (device index, primary, no-manage,
prefixes) -- asks ``pool_math.plan`` what to do, and does it:

* growth: one assign call with a count per existing ENI, then new ENIs created with their
  addresses in the same call; every new address goes into the pool at once and ``cni_notify``
  wakes the ADDs waiting for one;
* shrink: addresses past their cooldown are taken out of the pool first (so no ADD can get
  them), then unassigned in the cloud; a refused call puts them back (an ambiguous failure --
  no answer -- re-reads the ENI and puts back only what it still holds); at most one ENI is
  freed per tick, and only one first seen at least ``min_eni_age`` ago.

Security groups for pods in eni mode: ENIs made for a set of groups (``EniView.group``) hold
that set's addresses (a pool group of its own). Each tick plans the shared pool and every set
together (``pool_math.plan_node``): sets with ADDs waiting (``SetDemand.waiting``) are served
first, then the shared pool, then the other sets' margins and shrinks; a set's new ENI is made
with exactly its groups. A set is in use while it has pods or waiting ADDs, or released an
address less than ``set_cooldown`` ago; after each tick ``SetDemand.planned`` learns which sets
cannot grow (a limit, in words) and which failed (the cloud's error).

Subnet exhaustion (SubnetExhausted) stops growth for ``exhaustion_pause`` seconds. In prefix
mode, running out of aligned /28s (or of addresses) first falls back to single secondary IPs
for that long (VPC CNI has no such fallback; Cilium does), and only if those fail too does
growth pause. While an ENI holds /32s in prefix mode the pool is *mixed*, which the pure
planner does not model: ``plan_mixed`` decides then, counting real ENI slots, and drains free
/32s first when the pool is over target, so the node returns to pure prefixes.

PrivateIpAddressLimitExceeded means our view of an ENI is stale: it is re-read from the cloud.
Throttling is absorbed by the cloud client's retries; whatever still fails is logged and
retried on the next tick. Nothing here ends the loop but cancellation.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

import anyio
import attrs
from anyio.abc import TaskStatus

from agent.pool.ipam import IpPool
from agent.pool.pool_math import (
    IPS_PER_PREFIX,
    SHARED,
    EniState,
    InstanceLimits,
    NodePlan,
    Policy,
    PoolPlan,
    PoolStats,
    PoolTargets,
    SetState,
    SetTargets,
    plan_node,
    pool_stats,
    shortfall,
)
from cloud.errors import CloudError, CloudUnavailable, LimitExceeded, NotFound, SubnetExhausted
from cloud.provider import AddressBlock, groups_of_key

log = logging.getLogger("podwire.refiller")


class EniView(Protocol):
    """What the refiller reads about one ENI (``cloud.aws.provider.EniInfo`` has it)."""

    @property
    def eni_id(self) -> str: ...
    @property
    def device_index(self) -> int: ...
    @property
    def primary(self) -> bool: ...
    @property
    def no_manage(self) -> bool: ...
    @property
    def table(self) -> int | None: ...
    @property
    def ips(self) -> tuple[IPv4Address, ...]: ...
    @property
    def prefixes(self) -> tuple[IPv4Network, ...]: ...
    @property
    def pool_ips(self) -> tuple[IPv4Address, ...]: ...
    @property
    def group(self) -> str: ...


class SetDemand(Protocol):
    """What the refiller needs of eni mode's sets of security groups (``agent.sg.sets``)."""

    def waiting(self) -> Mapping[str, int]:
        """ADDs waiting for an address now, by set key."""
        ...

    def notify(self) -> None:
        """Addresses of a set joined the pool."""
        ...

    def planned(self, refused: Mapping[str, str], failed: Mapping[str, CloudError]) -> None:
        """A tick is done: the sets that cannot grow (why) and whose growth failed (how)."""
        ...


class PoolCloud(Protocol):
    """The cloud side the refiller executes plans with (``AwsProvider``, or a fake)."""

    def enis(self) -> Sequence[EniView]: ...
    async def assign_ips(self, eni_id: str, count: int) -> AddressBlock: ...
    async def assign_prefixes(self, eni_id: str, count: int) -> AddressBlock: ...
    async def create_eni(
        self, *, ip_count: int = 0, prefix_count: int = 0, pod_groups: Sequence[str] = ()
    ) -> AddressBlock: ...
    async def release_ips(self, eni_id: str, ips: Sequence[IPv4Address]) -> None: ...
    async def release_prefixes(self, eni_id: str, prefixes: Sequence[IPv4Network]) -> None: ...
    async def free_eni(self, eni_id: str) -> None: ...
    async def resync_eni(self, eni_id: str) -> AddressBlock: ...
    async def inventory(self) -> Sequence[AddressBlock]: ...


@attrs.frozen(kw_only=True)
class Fallback:
    """Prefix mode is handing out single /32s: since when, until when, and why."""

    since: float
    until: float
    code: str


@attrs.frozen(kw_only=True)
class RefillerStatus:
    """What ``agentctl pool`` shows about the refiller (times on the refiller's clock)."""

    prefix_mode: bool
    ticks: int
    last_plan: str
    last_error: str | None
    growth_paused_until: float | None
    fallback: Fallback | None
    mixed: bool
    refused: Mapping[str, str] = attrs.field(factory=dict)  # sets that cannot grow: why


# --- the mixed-mode planner (pure) ----------------------------------------------------------


def _ips_short(
    stats: PoolStats, targets: PoolTargets, limits: InstanceLimits, pod_limit: int | None
) -> int:
    # The shortfall in single addresses, whatever the unit of the mode.
    if targets.policy is Policy.WARM_IP:
        return shortfall(
            stats, attrs.evolve(targets, prefix_mode=False), limits, pod_limit=pod_limit
        )
    short = shortfall(stats, targets, limits, pod_limit=pod_limit)
    if short == 0:
        return 0
    if targets.policy is Policy.WARM_PREFIX:
        return max(IPS_PER_PREFIX * targets.warm_prefix - stats.available, 1)
    return short


def plan_mixed(
    enis: Sequence[EniState],
    slots_used: Mapping[str, int],
    free_singles: Mapping[str, int],
    targets: PoolTargets,
    limits: InstanceLimits,
    *,
    singles: bool,
    now: float,
    last_release: float | None,
    release_interval: float,
    pod_limit: int | None = None,
) -> PoolPlan:
    """Plan for a prefix-mode pool that holds single /32s too, or must add them (``singles``:
    the /32 fallback is active). ``slots_used`` counts each ENI's secondary IPs plus prefixes;
    ``free_singles`` its /32s neither assigned nor cooling.

    Short: fill free slots lowest device first, then new ENIs, with /32s (``singles``) or
    prefixes. Not short: release free /32s, highest device first, while the pool stays at
    target (at most once per ``release_interval``). Never frees ENIs.
    """
    managed = sorted((e for e in enis if e.managed), key=lambda e: (e.device_index, e.eni_id))
    stats = pool_stats(managed)
    slots = limits.slots_per_eni
    if singles:
        need = _ips_short(stats, targets, limits, pod_limit)
        unit = 1
    else:
        need = shortfall(stats, targets, limits, pod_limit=pod_limit)
        unit = IPS_PER_PREFIX
    if pod_limit is not None:
        need = min(need, math.ceil(max(pod_limit - stats.total, 0) / unit))
    if need > 0:
        adds: dict[str, int] = {}
        for e in managed:
            give = min(max(slots - slots_used.get(e.eni_id, 0), 0), need)
            if give > 0:
                adds[e.eni_id] = give
                need -= give
        cap = limits.max_enis if targets.max_eni is None else min(limits.max_enis, targets.max_eni)
        new: list[int] = []
        while need > 0 and len(enis) + len(new) < cap:
            new.append(min(slots, need))
            need -= new[-1]
        noun = "IPs (prefix fallback)" if singles else "prefixes"
        reason = f"mixed pool short: add {sum(adds.values()) + sum(new)} {noun}"
        if singles:
            return PoolPlan(ips_to_add=adds, new_eni_ips=tuple(new), reason=reason)
        return PoolPlan(prefixes_to_add=adds, new_eni_prefixes=tuple(new), reason=reason)

    if last_release is not None and now - last_release <= release_interval:
        return PoolPlan(reason="mixed pool at target; released recently")
    released: dict[str, int] = {}
    current = stats
    for e in reversed(managed):
        give = 0
        for _ in range(free_singles.get(e.eni_id, 0)):
            after = attrs.evolve(current, total=current.total - 1)
            if shortfall(after, targets, limits, pod_limit=pod_limit) > 0:
                break
            current = after
            give += 1
        if give:
            released[e.eni_id] = give
    if released:
        return PoolPlan(
            ips_to_release=released,
            reason=f"mixed pool above target: release {sum(released.values())} single IPs",
        )
    return PoolPlan(reason="mixed pool at target")


# --- the service ---------------------------------------------------------------------------


class Refiller:
    """The refiller's state and one tick of work; ``serve`` runs it (see the module docstring)."""

    def __init__(
        self,
        pool: IpPool,
        provider: PoolCloud,
        targets: PoolTargets,
        limits: InstanceLimits,
        *,
        cni_notify: Callable[[], None],
        demand: Callable[[], anyio.Event],
        interval: float = 5.0,
        min_eni_age: float = 60.0,
        release_interval: float = 30.0,
        exhaustion_pause: float = 120.0,
        pod_limit: int | None = None,
        reconcile_interval: float | None = None,
        clock: Callable[[], float] = anyio.current_time,
        sets: SetDemand | None = None,
        set_targets: SetTargets | None = None,
        set_cooldown: float = 60.0,
    ) -> None:
        self.reconcile_interval = reconcile_interval
        self._reconciled_at: float | None = None
        self.drift: dict[str, int] = {"joined": 0, "left": 0, "lost_assigned": 0}
        self.pool = pool
        self.provider = provider
        self.targets = targets
        self.limits = limits
        self.cni_notify = cni_notify
        self.demand = demand
        self.interval = interval
        self.min_eni_age = min_eni_age
        self.release_interval = release_interval
        self.exhaustion_pause = exhaustion_pause
        self.pod_limit = pod_limit
        self.clock = clock
        self.ticks = 0
        self.last_plan = ""
        self.last_error: str | None = None
        self.last_release: float | None = None
        self.growth_paused_until: float | None = None
        self.fallback: Fallback | None = None
        self.sets = sets
        # Without a SetDemand (eni mode off), ENIs of sets left by an earlier run drain.
        self.set_targets = set_targets or SetTargets(warm_ips=0, reserve_enis=0)
        self.set_cooldown = set_cooldown
        self.refused: Mapping[str, str] = {}
        self._set_released: dict[str, float] = {}
        self._first_seen: dict[str, float] = {}
        self._consumed: anyio.Event | None = None

    def __repr__(self) -> str:
        return (
            f"<Refiller ticks={self.ticks} paused_until={self.growth_paused_until} "
            f"fallback={self.fallback is not None} {self.pool!r}>"
        )

    def status(self) -> RefillerStatus:
        return RefillerStatus(
            prefix_mode=self.targets.prefix_mode,
            ticks=self.ticks,
            last_plan=self.last_plan,
            last_error=self.last_error,
            growth_paused_until=self.growth_paused_until,
            fallback=self.fallback,
            mixed=self._mixed(self.provider.enis()),
            refused=dict(self.refused),
        )

    # -- loop -----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[Refiller] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started`` hands back this Refiller (for
        ``agentctl pool``: ``status()``). The first tick runs at once."""
        task_status.started(self)
        while True:
            await self.tick()
            await self.wait_next()

    async def wait_next(self) -> None:
        """Sleep ``interval``, or less if an ADD signals demand. A demand event already acted
        on is not waited on again (the getter should hand out a fresh one once it is set)."""
        event = self.demand()
        with anyio.move_on_after(self.interval):
            if event is self._consumed:
                await anyio.sleep_forever()
            await event.wait()
            self._consumed = event
            # Ask again at once: the getter puts a fresh event in place of the one set, so a
            # demand made during the coming tick wakes the next one instead of being lost.
            self.demand()

    async def tick(self) -> None:
        """Plan once and carry the plan out; failures are logged and left to the next tick."""
        self.ticks += 1
        try:
            await self._tick()
        except CloudError as e:
            self._error(e)
        except Exception as e:  # the loop must survive a bug in one tick
            log.exception("refiller tick failed")
            self._error(e)

    def _error(self, e: BaseException) -> None:
        self.last_error = repr(e)
        log.warning("refiller: %r", e)

    # -- snapshot and plan ------------------------------------------------------------------

    def _mixed(self, enis: Sequence[EniView]) -> bool:
        return self.targets.prefix_mode and any(
            e.ips for e in enis if not e.no_manage and not e.group
        )

    def _busy(self, ip: IPv4Address, cooling: set[IPv4Address]) -> bool:
        return self.pool.holder(ip) is not None or ip in cooling

    def _snapshot(self, enis: Sequence[EniView], now: float) -> list[EniState]:
        counts = {c.owner: c for c in self.pool.owner_counts(now)}
        cooling = {ip for ip, _ in self.pool.cooling_items()}
        out = []
        for e in enis:
            seen = self._first_seen.setdefault(e.eni_id, now)
            c = counts.get(e.eni_id)
            free_prefixes = sum(
                1 for p in e.prefixes if not any(self._busy(ip, cooling) for ip in p)
            )
            out.append(
                EniState(
                    eni_id=e.eni_id,
                    device_index=e.device_index,
                    primary=e.primary,
                    total_ips=c.total if c and not e.no_manage else 0,
                    assigned_ips=c.assigned if c and not e.no_manage else 0,
                    cooling_ips=c.cooling if c and not e.no_manage else 0,
                    prefixes=len(e.prefixes) if not e.no_manage else 0,
                    free_prefixes=free_prefixes if not e.no_manage else 0,
                    created_at=seen,
                    no_manage=e.no_manage,
                )
            )
        return out

    async def _reconcile(self) -> None:
        """Re-read the node's ENIs from the cloud and bring the pool in line with them.

        Runs inside this loop, between workflows, so it never sees one half done. Addresses the
        cloud has and the pool lacks join (``_sync_pool``); free or cooling ones it no longer
        has leave; assigned ones it no longer has are reported: their pods lost their address
        (someone unassigned it behind the agent's back) and only DEL or GC can end that.
        """
        await self.provider.inventory()
        cloud = {ip for e in self.provider.enis() if not e.no_manage for ip in e.pool_ips}
        gone = [ip for ip in self.pool.addresses() if ip not in cloud]
        left = self.pool.remove_free(gone)
        lost = [ip for ip in gone if self.pool.holder(ip) is not None]
        for owner in self.pool.owners():
            self.pool.drop_owner_if_empty(owner)
        before = self.pool.total
        self._sync_pool(self.provider.enis())
        joined = self.pool.total - before
        self.drift["joined"] += joined
        self.drift["left"] += len(left)
        self.drift["lost_assigned"] += len(lost)
        if joined or left or lost:
            log.warning(
                "refiller: pool drifted from the cloud: %d joined, %d left, %d assigned lost (%s)",
                joined,
                len(left),
                len(lost),
                ", ".join(map(str, lost)) or "-",
            )

    def _sync_pool(self, enis: Sequence[EniView]) -> None:
        # The provider may know addresses the pool does not (a resync, an adopted ENI).
        added = 0
        for e in enis:
            if not e.no_manage:
                added += self.pool.add_block(e.eni_id, e.pool_ips, table=e.table, group=e.group)
        if added:
            self.cni_notify()
            if self.sets is not None:
                self.sets.notify()

    def _in_use(self, key: str, waiting: int, assigned: int, now: float) -> bool:
        released = self.pool.last_release(key)
        recent = released is not None and now - released < self.set_cooldown
        return waiting > 0 or assigned > 0 or recent

    def _plan(self, enis: Sequence[EniView], now: float) -> NodePlan:
        states = self._snapshot(enis, now)
        shared = [st for st, e in zip(states, enis, strict=True) if not e.group]
        by_set: dict[str, list[EniState]] = {}
        for st, e in zip(states, enis, strict=True):
            if e.group:
                by_set.setdefault(e.group, []).append(st)
        waiting = dict(self.sets.waiting()) if self.sets is not None else {}
        sets = [
            SetState(
                key=key,
                enis=tuple(by_set.get(key, ())),
                waiting=waiting.get(key, 0),
                in_use=self._in_use(
                    key,
                    waiting.get(key, 0),
                    sum(st.assigned_ips for st in by_set.get(key, ())),
                    now,
                ),
                last_release=self._set_released.get(key),
            )
            for key in sorted(set(by_set) | {k for k, n in waiting.items() if n > 0})
        ]
        shared_plan = None
        singles = self.fallback is not None
        if self.targets.prefix_mode and (singles or self._mixed(enis)):
            cooling = {ip for ip, _ in self.pool.cooling_items()}
            taken = [
                EniState(eni_id=st.eni_id, device_index=st.device_index, no_manage=True)
                for group in by_set.values()
                for st in group
            ]
            mine = [e for e in enis if not e.group]
            shared_plan = plan_mixed(
                [*shared, *taken],
                {e.eni_id: len(e.ips) + len(e.prefixes) for e in mine},
                {e.eni_id: sum(not self._busy(ip, cooling) for ip in e.ips) for e in mine},
                self.targets,
                self.limits,
                singles=singles,
                now=now,
                last_release=self.last_release,
                release_interval=self.release_interval,
                pod_limit=self.pod_limit,
            )
        return plan_node(
            shared,
            sets,
            self.targets,
            self.limits,
            now,
            set_targets=self.set_targets,
            min_eni_age=self.min_eni_age,
            last_release=self.last_release,
            release_interval=self.release_interval,
            pod_limit=self.pod_limit,
            shared_plan=shared_plan,
        )

    async def _tick(self) -> None:
        now = self.clock()
        self.last_error = None
        if self.growth_paused_until is not None and now >= self.growth_paused_until:
            log.info("refiller: growth resumes")
            self.growth_paused_until = None
        if self.fallback is not None and now >= self.fallback.until:
            log.info("refiller: trying /28 prefixes again")
            self.fallback = None
        if self.reconcile_interval is not None and (
            self._reconciled_at is None or now - self._reconciled_at >= self.reconcile_interval
        ):
            self._reconciled_at = now
            await self._reconcile()
        enis = self.provider.enis()
        self._sync_pool(enis)
        decision = self._plan(enis, now)
        self.last_plan = decision.reason
        refused = dict(decision.refused)
        failed: dict[str, CloudError] = {}
        for key, step in decision.steps:
            if not step.grows:
                continue
            if self.growth_paused_until is not None:
                paused = f"growth paused for {self.growth_paused_until - self.clock():.0f}s"
                if key == SHARED:
                    self.last_plan += f" ({paused})"
                else:
                    refused.setdefault(key, f"ENI {paused} ({self.last_error})")
                continue
            retry, error = await self._grow(step, key)
            if error is not None and key != SHARED:
                failed[key] = error
            if retry:  # prefixes ran out: the /32 fallback gets its turn at once
                again = self._plan(self.provider.enis(), self.clock()).shared
                self.last_plan = again.reason
                if again.grows:
                    await self._grow(again, SHARED)
        for key, step in decision.steps:
            if step.shrinks:
                await self._shrink(step, key)
        self.refused = refused
        if self.sets is not None:
            self.sets.planned(refused, failed)

    # -- growth -----------------------------------------------------------------------------

    async def _grow(self, p: PoolPlan, key: str) -> tuple[bool, CloudError | None]:
        """Carry out the growth of ``p`` for the shared pool or the set ``key``; return whether
        prefix growth fell back to /32s, and the cloud's error that stopped it (None: done)."""
        cloud = self.provider
        steps: list[tuple[str | None, bool, Callable[[], Awaitable[AddressBlock]]]] = []
        create = cloud.create_eni
        if key != SHARED:  # a set's ENI is made with exactly its groups
            create = functools.partial(cloud.create_eni, pod_groups=groups_of_key(key))
        for eni_id, n in p.ips_to_add.items():
            steps.append((eni_id, False, functools.partial(cloud.assign_ips, eni_id, n)))
        for eni_id, n in p.prefixes_to_add.items():
            steps.append((eni_id, True, functools.partial(cloud.assign_prefixes, eni_id, n)))
        for n in p.new_eni_ips:
            steps.append((None, False, functools.partial(create, ip_count=n)))
        for n in p.new_eni_prefixes:
            steps.append((None, True, functools.partial(create, prefix_count=n)))
        for target, prefixes, call in steps:
            try:
                block = await call()
            except SubnetExhausted as e:
                return self._exhausted(e, prefixes), e
            except LimitExceeded as e:
                if e.what == "PrivateIpAddressLimitExceeded" and target is not None:
                    await self._resync(target)
                else:
                    self._error(e)
                return False, e
            except CloudError as e:
                self._error(e)
                return False, e
            if block.owner not in self._first_seen:
                self._first_seen[block.owner] = self.clock()
            self._add(block)
        return False, None

    def _add(self, block: AddressBlock) -> None:
        if self.pool.add_block(block.owner, block.ips, table=block.table, group=block.group):
            self.cni_notify()
            if block.group and self.sets is not None:
                self.sets.notify()

    def _exhausted(self, e: SubnetExhausted, prefixes: bool) -> bool:
        now = self.clock()
        until = now + self.exhaustion_pause
        self._error(e)
        if prefixes and self.fallback is None:
            self.fallback = Fallback(since=now, until=until, code=e.code)
            log.warning(
                "refiller: %s: falling back to single IPs for %gs", e.code, self.exhaustion_pause
            )
            return True
        self.growth_paused_until = until
        log.warning("refiller: %s: growth paused for %gs", e.code, self.exhaustion_pause)
        return False

    async def _resync(self, eni_id: str) -> None:
        try:
            self._add(await self.provider.resync_eni(eni_id))
        except NotFound:
            self._forget(eni_id)
        except CloudError as e:
            self._error(e)

    def _forget(self, eni_id: str) -> None:
        view = next((e for e in self.provider.enis() if e.eni_id == eni_id), None)
        if view is not None:
            self.pool.remove_free(view.pool_ips)
        self.pool.drop_owner_if_empty(eni_id)
        self._first_seen.pop(eni_id, None)

    # -- shrink -----------------------------------------------------------------------------

    async def _shrink(self, p: PoolPlan, key: str = SHARED) -> None:
        views = {e.eni_id: e for e in self.provider.enis()}
        released = False
        for eni_id, n in p.ips_to_release.items():
            view = views.get(eni_id)
            if view is None:
                continue
            released |= await self._release_ips(view, n)
        for eni_id, n in p.prefixes_to_release.items():
            view = views.get(eni_id)
            if view is None:
                continue
            released |= await self._release_prefixes(view, n)
        if released and key == SHARED:
            self.last_release = self.clock()
        elif released:
            self._set_released[key] = self.clock()
        if p.eni_to_free is not None and p.eni_to_free in views:
            await self._free(views[p.eni_to_free])

    async def _release_ips(self, view: EniView, n: int) -> bool:
        cooling = {ip for ip, _ in self.pool.cooling_items()}
        pick = [ip for ip in reversed(view.ips) if not self._busy(ip, cooling)][:n]
        # Out of the pool before the cloud call (no await in between): no ADD can take them.
        taken = self.pool.remove_free(pick)
        if not taken:
            return False
        try:
            await self.provider.release_ips(view.eni_id, taken)
        except CloudError as e:
            await self._put_back(view, taken, e)
            return False
        return True

    async def _release_prefixes(self, view: EniView, n: int) -> bool:
        cooling = {ip for ip, _ in self.pool.cooling_items()}
        pick = [p for p in reversed(view.prefixes) if not any(self._busy(ip, cooling) for ip in p)][
            :n
        ]
        taken = self.pool.remove_free([ip for p in pick for ip in p])
        if not taken:
            return False
        try:
            await self.provider.release_prefixes(view.eni_id, pick)
        except CloudError as e:
            await self._put_back(view, taken, e)
            return False
        return True

    async def _put_back(self, view: EniView, taken: list[IPv4Address], e: CloudError) -> None:
        self._error(e)
        if isinstance(e, CloudUnavailable):
            # No answer: the cloud may have done it. Put back only what the ENI still holds.
            try:
                block = await self.provider.resync_eni(view.eni_id)
            except CloudError as again:
                self._error(again)
                return
            still = set(block.ips)
            taken = [ip for ip in taken if ip in still]
        self._add(
            AddressBlock(owner=view.eni_id, ips=tuple(taken), table=view.table, group=view.group)
        )

    async def _free(self, view: EniView) -> None:
        ips = view.pool_ips
        taken = self.pool.remove_free(ips)
        back = AddressBlock(owner=view.eni_id, ips=tuple(taken), table=view.table, group=view.group)
        if len(taken) != len(ips):  # an ADD took one since the plan: keep the ENI
            self._add(back)
            return
        try:
            await self.provider.free_eni(view.eni_id)
        except CloudError as e:
            self._error(e)
            self._add(back)
            return
        self.pool.drop_owner_if_empty(view.eni_id)
        self._first_seen.pop(view.eni_id, None)
