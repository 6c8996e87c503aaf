"""The refiller carries out plans for the shared pool and every set of security groups (eni
mode), against an in-memory cloud on trio's virtual clock: a set's ENI made with its groups,
its margin kept, a set no longer in use drained and freed, refusals and failures reported."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from ipaddress import IPv4Address
from typing import Any

import pytest
import trio
import trio.testing

from agent.cni.spec import PodKey
from agent.pool.pool_math import InstanceLimits, PoolTargets, SetTargets
from agent.pool.refiller import Refiller
from cloud.errors import CloudError, NotFound
from tests.unit.fake_cloud import FakeCloudProvider
from tests.unit.test_refiller import Harness

pytestmark = pytest.mark.trio

M5 = InstanceLimits(max_enis=3, ipv4_per_eni=10)  # 9 addresses per ENI
A = "sg-aaaa"
B = "sg-bbbb,sg-cccc"


class Sets:
    """A SetDemand that records what the refiller tells it."""

    def __init__(self) -> None:
        self.want: dict[str, int] = {}
        self.notified = 0
        self.verdicts: list[tuple[dict[str, str], dict[str, CloudError]]] = []

    def waiting(self) -> Mapping[str, int]:
        return self.want

    def notify(self) -> None:
        self.notified += 1

    def planned(self, refused: Mapping[str, str], failed: Mapping[str, CloudError]) -> None:
        self.verdicts.append((dict(refused), dict(failed)))


@pytest.fixture
async def nursery_() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


class SetHarness(Harness):
    async def fill(self) -> None:
        for block in await self.cloud.inventory():
            self.pool.add_block(block.owner, block.ips, table=block.table, group=block.group)

    def take(self, group: str) -> IPv4Address:
        self.pods += 1
        key = PodKey(network="net", container_id=f"c{self.pods}", ifname="eth0")
        return self.pool.assign(key, trio.current_time(), group=group).ip


async def start(h: SetHarness, nursery: trio.Nursery, sets: Sets | None, **kw: Any) -> Refiller:
    await h.fill()
    args: dict[str, Any] = {
        "min_eni_age": 60.0,
        "set_cooldown": 20.0,
        "set_targets": SetTargets(warm_ips=1, reserve_enis=0),
        **kw,
    }
    refiller = Refiller(
        h.pool,
        h.cloud,
        PoolTargets(warm_ip=1),
        M5,
        cni_notify=h.notify,
        demand=h.demand.take,
        sets=sets,
        **args,
    )
    started: Refiller = await nursery.start(refiller.run)
    return started


async def test_a_waiting_add_gets_a_new_eni_made_with_its_groups(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h, sets = SetHarness(FakeCloudProvider(M5)), Sets()
    sets.want = {B: 1}
    await start(h, nursery_, sets)
    await trio.sleep(1)
    create = h.cloud.ops("create_eni")
    assert [c.args for c in create] == [(2, 0, "sg-bbbb", "sg-cccc")]  # the pod + the margin
    eni = h.cloud.enis()[1]
    assert eni.pod_groups == ("sg-bbbb", "sg-cccc")
    assert h.pool.available(trio.current_time(), group=B) == 2
    assert h.pool.available(trio.current_time()) == 1  # the shared pool's own margin
    assert sets.notified >= 1 and sets.verdicts[0] == ({}, {})
    # the waiting ADD took its address: the margin is still there, no EC2 call
    sets.want = {}
    h.take(B)
    await trio.sleep(5)
    assert len(h.cloud.ops("create_eni", "assign_ips")) == 2  # (the shared pool's one assign)
    # the second pod of the set takes the margin: the next tick tops it up on the same ENI
    h.take(B)
    await trio.sleep(5)
    (top_up,) = [c for c in h.cloud.ops("assign_ips") if c.args[0] == eni.eni_id]
    assert top_up.args == (eni.eni_id, 1)


async def test_a_set_with_no_pods_is_freed_after_the_cooldown_and_the_minimum_age(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h, sets = SetHarness(FakeCloudProvider(M5), cooldown=5.0), Sets()
    sets.want = {A: 1}
    t0 = trio.current_time()
    await start(h, nursery_, sets)
    await trio.sleep(1)
    sets.want = {}
    ip = h.take(A)
    await trio.sleep(100)  # in use: kept, margin and all
    assert h.cloud.ops("free_eni") == []
    h.pool.release(ip, trio.current_time())  # the last pod leaves at t0 + 101
    await trio.sleep(60)
    (free,) = h.cloud.ops("free_eni")
    # cooling until +106, in use until +121 (set cooldown 20 s): the tick at t0 + 125 frees it
    assert free.at == t0 + 125
    assert h.pool.groups() == [""]
    assert len(h.cloud.enis()) == 1


async def test_a_set_that_gets_no_slot_is_refused_with_the_limit(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h, sets = SetHarness(FakeCloudProvider(M5)), Sets()
    h.cloud.add_eni(device_index=1, ips=2, pod_groups=[A])
    sets.want = {B: 1}
    await start(h, nursery_, sets, set_targets=SetTargets(warm_ips=1, reserve_enis=1))
    await trio.sleep(1)
    refused, failed = sets.verdicts[0]
    assert list(refused) == [B] and not failed
    assert refused[B].startswith("no ENI slot left for a new set of security groups: 3 ENI")
    assert h.cloud.ops("create_eni") == []


async def test_a_failed_creation_is_reported_for_the_set(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h, sets = SetHarness(FakeCloudProvider(M5)), Sets()
    h.cloud.inject(
        "create_eni", NotFound("CreateNetworkInterface", "InvalidSecurityGroupID.NotFound")
    )
    sets.want = {A: 1}
    await start(h, nursery_, sets)
    await trio.sleep(1)
    refused, failed = sets.verdicts[0]
    assert not refused and isinstance(failed[A], NotFound)
    await trio.sleep(5)  # the next tick tries again (the ADD is still waiting)
    assert len(h.cloud.ops("create_eni")) == 2
    assert h.pool.available(trio.current_time(), group=A) == 2


async def test_without_sets_an_earlier_runs_set_enis_drain(
    autojump_clock: trio.testing.MockClock, nursery_: trio.Nursery
) -> None:
    h = SetHarness(FakeCloudProvider(M5))
    busy = h.cloud.add_eni(device_index=1, ips=3, pod_groups=[A])
    idle = h.cloud.add_eni(device_index=2, ips=2, pod_groups=[B])
    await h.fill()
    h.take(A)  # a pod still runs on A's ENI
    t0 = trio.current_time()
    await start(h, nursery_, None, set_targets=None)  # eni mode is off now: no margins
    await trio.sleep(70)
    assert [(c.op, c.args[0]) for c in h.cloud.ops("release_ips", "free_eni")] == [
        ("release_ips", busy.eni_id),  # a pod on it: its two free addresses go at once
        ("free_eni", idle.eni_id),  # no pod: freed once 60 s old, addresses and all
    ]
    assert h.cloud.ops("free_eni")[0].at == t0 + 60
    assert h.pool.available(trio.current_time(), group=A) == 0
