"""The branch ENI workflows and their cooldown, on trio's virtual clock with a fake trunk:
exact times, the limit, failures undone, restarts reconciled."""

from __future__ import annotations

from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio
import trio.testing

from agent.sg.branches import (
    Backoff,
    BranchError,
    BranchFailed,
    BranchLimitReached,
    BranchManager,
    BranchPending,
    BranchRecord,
    State,
    lowest_free_vlan,
    reconcile,
)
from cloud.errors import CloudUnavailable, NotFound, Throttled
from cloud.trunk import BranchAssociation, BranchEni
from tests.unit.fake_cloud import FakeTrunk

pytestmark = pytest.mark.trio

GROUPS = ("sg-0000app0",)
EC2 = 0.25  # every fake EC2 call takes this long (virtual)


class Env:
    def __init__(self, trunk: FakeTrunk, mgr: BranchManager, commits: list[float]) -> None:
        self.trunk = trunk
        self.mgr = mgr
        self.commits = commits


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    # Tests take autojump_clock themselves: pytest-trio passes the clock only from the test's
    # own arguments.
    yield await make_env()


async def make_env(limit: int = 9, **kw: object) -> Env:
    trunk = FakeTrunk(limit=limit)
    for op in ("create_branch", "associate", "disassociate", "delete_branch"):
        trunk.delays[op] = EC2
    commits: list[float] = []

    async def commit() -> None:
        commits.append(trio.current_time())

    settings = {"cooldown": 60.0, "deadline": 30.0, "orphan_grace": 30.0, **kw}
    mgr = BranchManager(
        trunk,
        limit=limit,
        commit=commit,
        wall=trio.current_time,
        backoff=Backoff(base=1.0, cap=8.0),
        **settings,  # type: ignore[arg-type]
    )
    return Env(trunk, mgr, commits)


def vlans(env: Env) -> dict[int, str]:
    return {r.vlan: r.state.value for r in env.mgr.records()}


async def test_a_branch_is_created_then_associated_on_the_lowest_vlan(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        t0 = trio.current_time()
        rec = await env.mgr.acquire("pod-a", groups=GROUPS, pod_name="ns/a")
        assert trio.current_time() - t0 == pytest.approx(2 * EC2)  # create, then associate
        assert (rec.state, rec.vlan, rec.pod, rec.groups) == (State.ASSOCIATED, 1, "pod-a", GROUPS)
        assert rec.eni_id in env.trunk.enis and rec.association_id in env.trunk.assocs
        (create,) = env.trunk.ops("create_branch")
        assert create.args == (1, GROUPS)
        # the same pod again (a retried ADD): the same branch, no EC2 call
        again = await env.mgr.acquire("pod-a", groups=GROUPS)
        assert again == rec and len(env.trunk.calls) == 2
        b = await env.mgr.acquire("pod-b", groups=GROUPS)
        assert b.vlan == 2
        n.cancel_scope.cancel()


async def test_delete_cools_for_the_cooldown_then_disassociates_and_deletes(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        rec = await env.mgr.acquire("pod-a", groups=GROUPS)
        released_at = trio.current_time()
        cooled = env.mgr.release("pod-a")
        assert cooled is not None and cooled.state is State.COOLING and cooled.pod == ""
        await trio.sleep(59.9)
        assert env.trunk.ops("disassociate") == [] and vlans(env) == {1: "cooling"}
        await trio.sleep(1.0)
        assert env.trunk.times("disassociate") == [pytest.approx(released_at + 60.0)]
        assert env.trunk.times("delete_branch") == [pytest.approx(released_at + 60.0 + EC2)]
        assert env.mgr.records() == [] and rec.eni_id not in env.trunk.enis
        # the VLAN is free again: the next pod gets VLAN 1
        assert (await env.mgr.acquire("pod-c", groups=GROUPS)).vlan == 1
        n.cancel_scope.cancel()


async def test_the_limit_counts_cooling_branches_and_frees_after_cooldown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    env = await make_env(limit=3)
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        for i in range(3):
            await env.mgr.acquire(f"pod-{i}", groups=GROUPS)
        env.mgr.release("pod-0")
        released_at = trio.current_time()
        with pytest.raises(BranchLimitReached) as e:
            await env.mgr.acquire("pod-3", groups=GROUPS)
        assert e.value.limit == 3
        assert str(e.value) == (
            "branch ENI limit reached: 3 per trunk; 2 in use, 1 cooling (next free in 60s)"
        )
        await trio.sleep_until(released_at + 60.0 + 2 * EC2)
        rec = await env.mgr.acquire("pod-3", groups=GROUPS)
        assert rec.vlan == 1
        assert trio.current_time() == pytest.approx(released_at + 60.0 + 4 * EC2)
        n.cancel_scope.cancel()


async def test_vlans_held_by_others_count_and_are_skipped(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.trunk.add_foreign(1)
    env.mgr.hold_external(1, "EKS branch of ns/x")
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        rec = await env.mgr.acquire("pod-a", groups=GROUPS)
        assert rec.vlan == 2
        assert env.mgr.used() == 2
        n.cancel_scope.cancel()


async def test_an_add_that_gives_up_leaves_the_workflow_running_for_its_retry(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.trunk.delays["associate"] = 10.0
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        with pytest.raises(BranchPending, match=r"VLAN 1 is still being made \(associate\)"):
            await env.mgr.acquire("pod-a", groups=GROUPS, wait=2.0)
        assert vlans(env) == {1: "creating"}
        await trio.sleep(10.0)
        rec = await env.mgr.acquire("pod-a", groups=GROUPS, wait=2.0)
        assert rec.state is State.ASSOCIATED
        assert len(env.trunk.ops("create_branch")) == 1  # nothing made twice
        n.cancel_scope.cancel()


async def test_a_retry_while_still_creating_waits_for_the_same_workflow(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.trunk.delays["create_branch"] = 5.0
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        with pytest.raises(BranchPending):
            await env.mgr.acquire("pod-a", groups=GROUPS, wait=1.0)
        rec = await env.mgr.acquire("pod-a", groups=GROUPS, wait=20.0)
        assert trio.current_time() == pytest.approx(5.0 + EC2)
        assert rec.state is State.ASSOCIATED and len(env.trunk.ops("create_branch")) == 1
        n.cancel_scope.cancel()


async def test_a_failed_association_is_undone_and_frees_the_vlan(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.trunk.inject("associate", Throttled("AssociateTrunkInterface", 6))
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        with pytest.raises(BranchFailed) as e:
            await env.mgr.acquire("pod-a", groups=GROUPS)
        assert e.value.step == "associate"
        assert env.trunk.enis == {} and env.mgr.records() == []
        (deleted,) = env.trunk.ops("delete_branch")
        assert deleted.at == pytest.approx(2 * EC2)
        assert (await env.mgr.acquire("pod-a", groups=GROUPS)).vlan == 1
        n.cancel_scope.cancel()


async def test_an_unknown_group_fails_at_create_with_nothing_to_undo(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        with pytest.raises(BranchFailed, match=r"InvalidSecurityGroupID\.NotFound") as e:
            await env.mgr.acquire("pod-a", groups=("nope",))
        assert e.value.step == "create"
        assert env.mgr.records() == [] and env.trunk.ops("delete_branch") == []
        n.cancel_scope.cancel()


async def test_an_undo_that_fails_leaves_the_branch_to_the_reaper_with_backoff(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.trunk.inject("associate", Throttled("AssociateTrunkInterface", 6))
    env.trunk.inject("delete_branch", CloudUnavailable("DeleteNetworkInterface", "503"), times=3)
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        with pytest.raises(BranchFailed):
            await env.mgr.acquire("pod-a", groups=GROUPS)
        assert vlans(env) == {1: "deleting"}
        await trio.sleep(30.0)
        # undo at 0.5 fails; the reaper tries at once (0.75 fails), then 1 s and 2 s later
        times = env.trunk.times("delete_branch")
        assert times == pytest.approx([0.5, 0.75, 2.0, 4.25])
        assert env.mgr.records() == [] and env.trunk.enis == {}
        n.cancel_scope.cancel()


async def test_a_pod_deleted_while_its_branch_is_made_gets_no_cooldown(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.trunk.delays["associate"] = 5.0
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        with pytest.raises(BranchPending):
            await env.mgr.acquire("pod-a", groups=GROUPS, wait=1.0)
        released = env.mgr.release("pod-a")
        assert released is not None and released.state is State.CREATING
        await trio.sleep(10.0)
        assert env.trunk.times("disassociate") == [pytest.approx(EC2 + 5.0)]
        assert env.mgr.records() == []
        n.cancel_scope.cancel()


async def test_orphans_cool_down_after_the_grace(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        await env.mgr.acquire("pod-a", groups=GROUPS)
        live: set[str] = set()
        assert env.mgr.sweep(live.__contains__) == []
        await trio.sleep(29.0)
        assert env.mgr.sweep(live.__contains__) == []
        # a retried ADD within the grace gets the branch back
        assert (await env.mgr.acquire("pod-a", groups=GROUPS)).state is State.ASSOCIATED
        assert env.mgr.sweep(live.__contains__) == []
        await trio.sleep(30.0)
        (moved,) = env.mgr.sweep(live.__contains__)
        assert moved.state is State.COOLING
        n.cancel_scope.cancel()


async def test_many_pods_at_once_get_distinct_vlans(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    got: dict[str, BranchRecord] = {}

    async def one(i: int) -> None:
        got[f"p{i}"] = await env.mgr.acquire(f"p{i}", groups=GROUPS)

    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        async with trio.open_nursery() as burst:
            for i in range(9):
                burst.start_soon(one, i)
        assert sorted(r.vlan for r in got.values()) == list(range(1, 10))
        assert trio.current_time() == pytest.approx(2 * EC2)
        with pytest.raises(BranchLimitReached):
            await env.mgr.acquire("p9", groups=GROUPS)
        n.cancel_scope.cancel()


async def test_restore_keeps_live_pods_and_cleans_the_rest(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    live = env.trunk.leak(1, associated=True)
    gone_pod = env.trunk.leak(2, associated=True)
    env.trunk.leak(3, associated=True)
    unrecorded_free = env.trunk.leak(4, associated=False)
    env.trunk.add_foreign(5)
    net = IPv4Network("10.0.0.0/24")

    def rec(b: BranchEni, vlan: int, state: State, pod: str = "") -> BranchRecord:
        return BranchRecord(
            rid=b.eni_id,
            vlan=vlan,
            state=state,
            pod=pod,
            eni_id=b.eni_id,
            mac=b.mac,
            ip=b.ip,
            subnet_cidr=net,
        )

    saved = [
        rec(live, 1, State.ASSOCIATED, "pod-live"),
        rec(gone_pod, 2, State.ASSOCIATED, "pod-x"),
    ]
    in_use = {"pod-live": rec(live, 1, State.ASSOCIATED, "pod-live")}
    async with trio.open_nursery() as n:
        result = await env.mgr.restore(saved, in_use)
        assert vlans(env) == {1: "associated", 2: "cooling", 3: "cooling", 4: "deleting"}
        assert dict(result.external) and 5 in result.external
        await n.start(env.mgr.run)
        await trio.sleep(1.0)
        assert unrecorded_free.eni_id not in env.trunk.enis  # deleted at once
        await trio.sleep(60.0)
        assert set(env.trunk.enis) == {live.eni_id}  # the live pod's branch never touched
        assert vlans(env) == {1: "associated"}
        assert (await env.mgr.acquire("new", groups=GROUPS)).vlan == 2  # 5 is someone else's
        n.cancel_scope.cancel()


async def test_reconcile_rows() -> None:
    net = IPv4Network("10.0.0.0/24")

    def b(eni: str, vlan: int) -> BranchEni:
        return BranchEni(
            eni_id=eni,
            mac="02:00:00:00:00:01",
            ip=IPv4Address("10.0.0.9"),
            subnet_cidr=net,
            vlan=vlan,
        )

    def r(eni: str, vlan: int, state: State, pod: str = "", assoc: str = "") -> BranchRecord:
        return BranchRecord(
            rid=eni or f"creating:{vlan}",
            vlan=vlan,
            state=state,
            pod=pod,
            eni_id=eni,
            association_id=assoc,
        )

    assocs = [BranchAssociation(association_id="a1", branch_id="eni-1", vlan=1)]
    out = reconcile(
        saved=[
            r("", 7, State.CREATING, "p7"),  # died before the create answered: the tag tells
            r("eni-2", 2, State.CREATING, "p2"),  # died before associating
            r("eni-3", 3, State.DELETING),
            r("eni-4", 4, State.COOLING),
        ],
        in_use={"p1": r("eni-1", 1, State.ASSOCIATED, "p1")},
        branches=[b("eni-1", 1), b("eni-2", 2), b("eni-7", 7)],
        associations=assocs,
        now=100.0,
    )
    got = {x.rid: (x.state, x.vlan, x.association_id) for x in out.records}
    assert got == {
        "eni-1": (State.ASSOCIATED, 1, "a1"),
        "eni-2": (State.DELETING, 2, ""),
        "eni-3": (State.DELETING, 3, ""),
        "eni-4": (State.COOLING, 4, ""),
        "eni-7": (State.DELETING, 7, ""),
    }
    assert out.external == {}


async def test_lowest_free_vlan() -> None:
    assert lowest_free_vlan([]) == 1
    assert lowest_free_vlan([1, 2, 4]) == 3
    assert lowest_free_vlan(range(1, 4095)) is None


async def test_retarget_gives_an_associated_branch_new_groups(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    # issue 12: a running pod's resolved groups changed; its branch gets them in place
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        rec = await env.mgr.acquire("pod-a", groups=GROUPS)
        commits = len(env.commits)
        new = ("sg-0ffffffffffffffff", *GROUPS)
        got = await env.mgr.retarget("pod-a", new)
        assert got.groups == new and env.trunk.enis[rec.eni_id].groups == new
        assert env.mgr.of_pod("pod-a").groups == new and len(env.commits) == commits + 1
        (call,) = env.trunk.ops("set_groups")
        assert call.args == (rec.eni_id, new)
        # the same groups again: no EC2 call
        await env.mgr.retarget("pod-a", new)
        assert len(env.trunk.ops("set_groups")) == 1
        # EC2 refuses (an unknown group): the record keeps what the branch has
        with pytest.raises(NotFound):
            await env.mgr.retarget("pod-a", ("bogus",))
        assert env.mgr.of_pod("pod-a").groups == new
        with pytest.raises(BranchError):
            await env.mgr.retarget("pod-nope", GROUPS)
        n.cancel_scope.cancel()


async def test_leak_collection_spares_a_branch_whose_workflow_is_in_flight(
    env: Env, autojump_clock: trio.testing.MockClock
) -> None:
    env.trunk.delays["create_branch"] = 2.0
    env.trunk.delays["associate"] = 5.0
    async with trio.open_nursery() as n:
        await n.start(env.mgr.run)
        n.start_soon(lambda: env.mgr.acquire("pod-a", groups=GROUPS, wait=30.0))
        await trio.sleep(0.1)
        # EC2 holds a branch on VLAN 1 that the creating workflow has no id for yet
        early = env.trunk.leak(1, associated=False)
        assert await env.mgr.collect_leaked(grace=0.0) == []
        assert early.eni_id in env.trunk.enis
        # a describe answered after the create did: the new branch is known, not a leak
        env.trunk.delays["branches"] = 3.0
        assert await env.mgr.collect_leaked(grace=0.0) == [early.eni_id]
        (rec,) = env.mgr.records()
        assert rec.eni_id in env.trunk.enis and rec.eni_id != early.eni_id
        assert env.trunk.enis[rec.eni_id].status == "available"  # its association in flight
        n.cancel_scope.cancel()
