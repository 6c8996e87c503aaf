"""The shared veth deletions (agent.cni.deleter) over a fake kernel, on trio's virtual clock."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import trio
import trio.testing

from agent.cni.deleter import LinkDeleter
from netlink.errors import NetlinkError, RequestFailed
from netlink.veth import DELETE_GROUP
from netlink.watcher import LinkEvent

pytestmark = pytest.mark.trio

UNLIST = 0.002  # the kernel's locked phase: links unlisted, RTM_DELLINK broadcast
RCU = 0.018  # then the wait before the acknowledgement


class FakeKernel:
    """Links by name; a group deletion broadcasts after UNLIST and acknowledges after RCU.

    ``broadcast`` is the watcher's callback (None: no watcher)."""

    def __init__(self, names: list[str]) -> None:
        self.links = {name: 100 + i for i, name in enumerate(names)}
        self.parked: dict[int, list[str]] = {}
        self.rounds: list[tuple[int, list[str], float]] = []
        self.broadcast: LinkDeleter | None = None
        self.fail_delete: Exception | None = None
        self.refuse: dict[str, Exception] = {}

    async def park_links(
        self, names: list[str], group: int
    ) -> tuple[dict[str, int], Mapping[str, Exception]]:
        assert not self.parked.get(group), "a group is used by one round at a time"
        refused = {n: self.refuse[n] for n in names if n in self.refuse}
        parked = {n: self.links[n] for n in names if n in self.links and n not in refused}
        self.parked[group] = list(parked)
        return parked, refused

    async def delete_parked(self, names: list[str], group: int) -> None:
        assert sorted(names) == sorted(self.parked[group])
        self.rounds.append((group, list(names), trio.current_time()))
        await trio.sleep(UNLIST)
        if self.fail_delete is not None:
            self.parked[group] = []
            raise self.fail_delete
        gone = [
            LinkEvent(kind="del", index=self.links.pop(n), name=n, mac="", up=False) for n in names
        ]
        self.parked[group] = []
        if self.broadcast is not None:
            self.broadcast.on_events(gone)
        await trio.sleep(RCU)

    async def link_exists(self, name: str) -> bool:
        return name in self.links


async def test_a_delete_returns_on_the_broadcast_not_the_acknowledgement(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kernel = FakeKernel(["a"])
    deleter = LinkDeleter(kernel)
    kernel.broadcast = deleter
    async with trio.open_nursery() as n:
        await n.start(deleter.run)
        start = trio.current_time()
        await deleter.delete(["a"])
        assert trio.current_time() - start == pytest.approx(UNLIST)  # no window, no RCU wait
        assert "a" not in kernel.links
        n.cancel_scope.cancel()


async def test_without_a_watcher_the_acknowledgement_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kernel = FakeKernel(["a"])
    deleter = LinkDeleter(kernel)
    async with trio.open_nursery() as n:
        await n.start(deleter.run)
        start = trio.current_time()
        await deleter.delete(["a"])
        assert trio.current_time() - start == pytest.approx(UNLIST + RCU)
        n.cancel_scope.cancel()


async def test_deletions_in_flight_share_the_next_round_and_rounds_overlap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    names = [f"v{i}" for i in range(40)]
    kernel = FakeKernel(names)
    deleter = LinkDeleter(kernel)
    kernel.broadcast = deleter
    async with trio.open_nursery() as n:
        await n.start(deleter.run)
        async with trio.open_nursery() as callers:
            callers.start_soon(deleter.delete, names[:1])
            await trio.sleep(0.001)  # the first round is unlisting
            for name in names[1:]:
                callers.start_soon(deleter.delete, [name])
        assert not kernel.links
        assert [len(r[1]) for r in kernel.rounds] == [1, 39]
        (g1, _, t1), (g2, _, t2) = kernel.rounds
        # the second round started while the first waited for RCU, in another group
        assert g1 != g2 and {g1, g2} <= set(range(DELETE_GROUP + 1, DELETE_GROUP + 5))
        assert t2 - t1 == pytest.approx(UNLIST)
        n.cancel_scope.cancel()


async def test_a_missing_link_is_gone_at_once(autojump_clock: trio.testing.MockClock) -> None:
    kernel = FakeKernel([])
    deleter = LinkDeleter(kernel)
    async with trio.open_nursery() as n:
        await n.start(deleter.run)
        start = trio.current_time()
        await deleter.delete(["nothere"])
        assert trio.current_time() == start and kernel.rounds == []
        n.cancel_scope.cancel()


async def test_wait_for_holds_an_add_until_the_old_link_is_parked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kernel = FakeKernel(["a"])
    deleter = LinkDeleter(kernel)
    kernel.broadcast = deleter
    async with trio.open_nursery() as n:
        n.start_soon(deleter.delete, ["a"])
        await trio.testing.wait_all_tasks_blocked()  # the round is in the kernel
        await deleter.wait_for("a")
        assert "a" not in kernel.links
        await deleter.wait_for("a")  # nothing in flight: returns at once
        n.cancel_scope.cancel()


async def test_a_failed_round_fails_only_the_links_still_there(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kernel = FakeKernel(["a", "b"])
    kernel.fail_delete = RequestFailed("delete link group", 95, "")
    kernel.refuse = {"b": RequestFailed("delete b", 1, "")}
    deleter = LinkDeleter(kernel)
    async with trio.open_nursery() as n:
        await n.start(deleter.run)
        with pytest.raises(NetlinkError, match="delete link group"):
            await deleter.delete(["a"])
        with pytest.raises(NetlinkError, match="delete b"):
            await deleter.delete(["b"])
        kernel.fail_delete = None
        del kernel.links["b"]  # gone meanwhile: the next try succeeds whatever the kernel says
        await deleter.delete(["a", "b"])
        assert not kernel.links
        n.cancel_scope.cancel()


async def test_without_the_loop_a_delete_runs_its_own_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kernel = FakeKernel(["a"])
    deleter = LinkDeleter(kernel)
    await deleter.delete(["a"])
    assert not kernel.links and len(kernel.rounds) == 1


async def test_a_round_pokes_the_watcher_and_wants_events_only_while_it_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kernel = FakeKernel(["a"])
    deleter = LinkDeleter(kernel)
    kernel.broadcast = deleter
    pokes: list[bool] = []
    deleter.poke = lambda: pokes.append(deleter.wanted())
    assert not deleter.wanted()
    async with trio.open_nursery() as n:
        await n.start(deleter.run)
        await deleter.delete(["a"])
        assert pokes == [True]  # poked once the round waits for its broadcast
        assert not deleter.wanted()
        n.cancel_scope.cancel()
