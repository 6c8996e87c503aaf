"""The refiller against an in-memory cloud, on trio's virtual clock: exact times for the tick,
demand, retries, cooldown, ENI age, one ENI per tick, the exhaustion pause and the /32
fallback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from typing import Any

import anyio
import attrs
import pytest
import trio
import trio.testing

from agent.cni.spec import PodKey
from agent.pool.ipam import IpPool
from agent.pool.pool_math import EniState, InstanceLimits, PoolTargets
from agent.pool.refiller import Refiller, plan_mixed
from cloud.errors import CloudRequestFailed, CloudUnavailable, LimitExceeded, Throttled
from tests.unit.fake_cloud import FakeCloudProvider

pytestmark = pytest.mark.trio

M5 = InstanceLimits(max_enis=3, ipv4_per_eni=10)  # 9 slots per ENI
SMALL = InstanceLimits(max_enis=3, ipv4_per_eni=4)  # 3 slots per ENI


class Demand:
    """What the daemon's getter does with CniService.demand: hand out the event and, once it
    is set, put a fresh one in its place."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    def take(self) -> anyio.Event:
        event = self.event
        if event.is_set():
            self.event = anyio.Event()
        return event

    def signal(self) -> None:
        self.event.set()


class Harness:
    def __init__(self, cloud: FakeCloudProvider, cooldown: float = 30.0) -> None:
        self.cloud = cloud
        self.pool = IpPool(cooldown=cooldown)
        self.demand = Demand()
        self.notified: list[float] = []
        self.pods = 0

    def notify(self) -> None:
        self.notified.append(trio.current_time())

    def assign(self, n: int) -> list[IPv4Address]:
        out = []
        for _ in range(n):
            self.pods += 1
            out.append(
                self.pool.assign(
                    PodKey(network="net", container_id=f"c{self.pods}", ifname="eth0"),
                    trio.current_time(),
                ).ip
            )
        return out

    def release(self, ips: list[IPv4Address]) -> None:
        for ip in ips:
            self.pool.release(ip, trio.current_time())

    async def fill(self) -> None:
        for block in await self.cloud.inventory():
            self.pool.add_block(block.owner, block.ips, table=block.table)


@pytest.fixture
async def nursery_() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def start(
    h: Harness, nursery: trio.Nursery, targets: PoolTargets, limits: InstanceLimits, **kw: Any
) -> Refiller:
    await h.fill()
    run = Refiller(
        h.pool, h.cloud, targets, limits, cni_notify=h.notify, demand=h.demand.take, **kw
    ).run
    refiller: Refiller = await nursery.start(run)
    return refiller


async def test_first_tick_at_once_then_every_interval(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5))
    t0 = trio.current_time()
    await start(h, nursery_, PoolTargets(warm_ip=4), M5)
    await trio.sleep(1)
    # One call with a count on the primary ENI; the ADDs waiting were woken.
    assert [(c.op, c.args[1]) for c in h.cloud.ops()] == [("assign_ips", 4)]
    assert h.cloud.times() == [t0] and h.notified == [t0]
    h.assign(2)  # pods took two: short again, but nobody waits, so the next tick grows
    await trio.sleep(10)
    assert h.cloud.times("assign_ips") == [t0, t0 + 5]
    assert h.pool.total == 6 and h.pool.available(trio.current_time()) == 4


async def test_demand_refills_at_once_not_at_the_next_tick(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5))
    t0 = trio.current_time()
    await start(h, nursery_, PoolTargets(warm_ip=2), M5)
    await trio.sleep(1.5)
    h.assign(2)
    h.demand.signal()  # an ADD found the pool empty
    await trio.sleep(0.1)
    assert h.cloud.times("assign_ips") == [t0, t0 + 1.5]
    assert h.notified == [t0, t0 + 1.5]
    # The tick after a demand comes a full interval later, and a consumed event is not re-run.
    await trio.sleep(10)
    assert len(h.cloud.ops("assign_ips")) == 2


async def test_failed_growth_is_retried_next_tick(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5))
    h.cloud.inject("assign_ips", Throttled("AssignPrivateIpAddresses", 6))
    h.cloud.inject("assign_ips", CloudUnavailable("AssignPrivateIpAddresses", "503"))
    t0 = trio.current_time()
    refiller = await start(h, nursery_, PoolTargets(warm_ip=3), M5)
    await trio.sleep(4)
    assert "Throttled" in (refiller.status().last_error or "")
    await trio.sleep(8)
    assert h.cloud.times("assign_ips") == [t0, t0 + 5, t0 + 10]
    assert h.pool.total == 3
    assert refiller.status().last_error is None


async def test_shrink_waits_for_the_cooldown(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5), cooldown=30)
    h.cloud.add_eni(device_index=1, ips=4)
    await h.fill()
    t0 = trio.current_time()
    pods = h.assign(4)
    await start(h, nursery_, PoolTargets(warm_ip=2), M5)
    await trio.sleep(2)
    assert h.cloud.times("assign_ips") == [t0]  # 2 more on the primary
    h.release(pods)  # cooling until t0 + 32
    await trio.sleep(40)
    releases = h.cloud.ops("release_ips")
    # Ticks at t0+5, ..., t0+30 see 2 available and 4 cooling: at target. At t0+35 the four
    # have cooled: 6 available, 4 over target, released from the highest device first.
    assert [c.at for c in releases] == [t0 + 35]
    assert releases[0].args[0] == h.cloud.enis()[1].eni_id
    assert len(releases[0].args[1]) == 4
    assert h.pool.total == 2 and h.pool.cooling == 0


async def test_failed_release_puts_the_addresses_back(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5))
    h.cloud.add_eni(device_index=1, ips=5)
    h.cloud.inject("release_ips", CloudRequestFailed("UnassignPrivateIpAddresses", "Oops"))
    t0 = trio.current_time()
    await start(h, nursery_, PoolTargets(warm_ip=2), M5)
    await trio.sleep(1)
    assert h.cloud.times("release_ips") == [t0]
    assert h.pool.total == 5 and h.pool.available(trio.current_time()) == 5
    # Released less than release_interval ago? No: the failed one did not count.
    await trio.sleep(5)
    assert h.cloud.times("release_ips") == [t0, t0 + 5]
    assert h.pool.total == 2


async def test_ambiguous_release_puts_back_only_what_the_eni_still_holds(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5))
    h.cloud.add_eni(device_index=1, ips=5)
    h.cloud.inject("release_ips", CloudUnavailable("UnassignPrivateIpAddresses", "timeout"))
    await start(h, nursery_, PoolTargets(warm_ip=2), M5)
    await trio.sleep(1)
    # The fake failed before changing anything: the resync finds all five, all go back.
    assert [c.op for c in h.cloud.ops("release_ips", "resync_eni")] == ["release_ips", "resync_eni"]
    assert h.pool.total == 5


async def test_eni_freed_only_once_old_enough_and_one_per_tick(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(SMALL))
    cloud = h.cloud
    cloud.view.clear()
    cloud.cloud.clear()
    primary = cloud.add_eni(device_index=0, primary=True, ips=3)
    first = cloud.add_eni(device_index=1, ips=3)
    second = cloud.add_eni(device_index=2, ips=3)
    t0 = trio.current_time()
    await start(h, nursery_, PoolTargets(warm_eni=1), SMALL, min_eni_age=60)
    await trio.sleep(59)
    assert cloud.ops("free_eni") == []
    await trio.sleep(20)
    frees = cloud.ops("free_eni")
    # WARM_ENI=1 with 3 slots: either secondary could go, but one per tick, highest first.
    assert [(c.at, c.args[0]) for c in frees] == [
        (t0 + 60, second.eni_id),
        (t0 + 65, first.eni_id),
    ]
    assert h.pool.owners() == [primary.eni_id] and h.pool.total == 3


async def test_new_eni_only_when_existing_ones_are_full(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5))
    await start(h, nursery_, PoolTargets(warm_ip=12), M5)
    await trio.sleep(1)
    ops = [(c.op, c.args) for c in h.cloud.ops()]
    # 9 on the primary, then one ENI created with the other 3 in the same call.
    assert ops == [("assign_ips", ("eni-0000", 9)), ("create_eni", (3, 0))]
    blocks = {o: h.pool.table_of(o) for o in h.pool.owners()}
    assert blocks == {"eni-0000": None, "eni-0001": 2}
    assert h.pool.total == 12


async def test_ip_limit_exceeded_resyncs_that_eni(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5))
    primary = h.cloud.enis()[0]
    h.cloud.inject("assign_ips", LimitExceeded("PrivateIpAddressLimitExceeded"))
    # Something outside the agent added two IPs the provider's view does not know yet.
    real = h.cloud.cloud[primary.eni_id]
    h.cloud.cloud[primary.eni_id] = type(real)(
        eni_id=real.eni_id,
        device_index=0,
        primary=True,
        ips=(IPv4Address("10.0.9.1"), IPv4Address("10.0.9.2")),
    )
    await start(h, nursery_, PoolTargets(warm_ip=4), M5)
    await trio.sleep(1)
    assert [c.op for c in h.cloud.ops()] == ["assign_ips", "resync_eni"]
    assert h.pool.total == 2  # the resync brought the two in
    await trio.sleep(5)
    assert h.pool.total == 4


async def test_subnet_exhaustion_pauses_growth_for_exactly_120s(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5, ips_left=0))
    t0 = trio.current_time()
    refiller = await start(h, nursery_, PoolTargets(warm_ip=2), M5)
    await trio.sleep(50)
    h.demand.signal()  # demand during the pause does not call the cloud either
    await trio.sleep(1)
    assert h.cloud.times("assign_ips") == [t0]
    status = refiller.status()
    assert status.growth_paused_until == t0 + 120 and status.fallback is None
    h.cloud.ips_left = 100
    await trio.sleep(80)
    assert h.cloud.times("assign_ips") == [t0, t0 + 120]
    assert h.pool.total == 2 and refiller.status().growth_paused_until is None


async def test_prefix_exhaustion_falls_back_to_single_ips(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5, prefixes_left=0))
    t0 = trio.current_time()
    refiller = await start(h, nursery_, PoolTargets(warm_prefix=1, prefix_mode=True), M5)
    await trio.sleep(1)
    ops = [(c.op, c.at, c.args) for c in h.cloud.ops()]
    # The /28 fails, and in the same tick the pool gets 16 addresses as /32s: 9 fit on the
    # primary ENI, a new ENI carries the other 7.
    assert ops == [
        ("assign_prefixes", t0, ("eni-0000", 1)),
        ("assign_ips", t0, ("eni-0000", 9)),
        ("create_eni", t0, (7, 0)),
    ]
    assert h.pool.total == 16
    status = refiller.status()
    assert status.fallback is not None
    assert (status.fallback.since, status.fallback.until, status.fallback.code) == (
        t0,
        t0 + 120,
        "InsufficientCidrBlocks",
    )
    assert status.mixed  # /32s in prefix mode
    assert status.growth_paused_until is None
    # Prefixes come back; at t0+120 the fallback ends and new growth uses /28s again.
    h.cloud.prefixes_left = 10
    await trio.sleep(118)
    h.assign(16)  # at t0+119; nobody signals demand, so the tick at t0+120 grows
    await trio.sleep(2)
    assert refiller.status().fallback is None
    assert [(c.op, c.at) for c in h.cloud.ops("assign_prefixes")] == [
        ("assign_prefixes", t0),
        ("assign_prefixes", t0 + 120),
    ]


async def test_fallback_singles_also_exhausted_pauses_all_growth(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5, prefixes_left=0, ips_left=0))
    t0 = trio.current_time()
    refiller = await start(h, nursery_, PoolTargets(warm_prefix=1, prefix_mode=True), M5)
    await trio.sleep(60)
    assert [c.op for c in h.cloud.ops()] == ["assign_prefixes", "assign_ips"]
    status = refiller.status()
    assert status.growth_paused_until == t0 + 120 and status.fallback is not None


async def test_a_tick_that_raises_does_not_end_the_loop(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5))
    h.cloud.inject("assign_ips", RuntimeError("bug"))
    t0 = trio.current_time()
    await start(h, nursery_, PoolTargets(warm_ip=1), M5)
    await trio.sleep(6)
    assert h.cloud.times("assign_ips") == [t0, t0 + 5]
    assert h.pool.total == 1


async def test_plan_mixed_drains_free_singles_first() -> None:
    targets = PoolTargets(warm_prefix=1, prefix_mode=True)
    enis = [
        EniState(
            eni_id="a", device_index=0, primary=True, total_ips=16 + 3, prefixes=1, free_prefixes=1
        ),
        EniState(eni_id="b", device_index=1, total_ips=4, assigned_ips=1),
    ]
    p = plan_mixed(
        enis,
        {"a": 4, "b": 4},
        {"a": 3, "b": 3},
        targets,
        M5,
        singles=False,
        now=100.0,
        last_release=None,
        release_interval=30.0,
    )
    # 22 available, 16 must stay: six /32s go, highest device first.
    assert dict(p.ips_to_release) == {"b": 3, "a": 3}
    assert not p.grows


async def test_periodic_reconcile_catches_drift_between_workflows(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = Harness(FakeCloudProvider(M5))
    t0 = trio.current_time()
    # a steady pool (4 held, 1 spare wanted): no growth tick re-reads the ENI before 60 s
    targets = PoolTargets(warm_ip=1, minimum_ip=4)
    refiller = await start(h, nursery_, targets, M5, reconcile_interval=60.0)
    await trio.sleep(1)
    (held,) = h.assign(1)
    primary = h.cloud.enis()[0]
    free = next(ip for ip in primary.ips if h.pool.holder(ip) is None)
    extra = IPv4Address("10.0.250.9")
    # behind the agent's back: a free and the assigned address unassigned, another assigned
    h.cloud.cloud[primary.eni_id] = attrs.evolve(
        primary, ips=(*(ip for ip in primary.ips if ip not in (free, held)), extra)
    )
    await trio.sleep_until(t0 + 59.9)
    assert free in h.pool.addresses() and extra not in h.pool.addresses()
    await trio.sleep_until(t0 + 60.1)  # the tick at 60 s re-reads the cloud
    assert free not in h.pool.addresses() and extra in h.pool.addresses()
    assert h.pool.holder(held) is not None  # the pod keeps its record until DEL or GC
    assert refiller.drift == {"joined": 1, "left": 1, "lost_assigned": 1}
