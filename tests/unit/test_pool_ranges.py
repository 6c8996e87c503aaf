"""Following a node's pod ranges: the pure plan, and the follower applying it to the pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network

import anyio
import pytest

from agent.cni.spec import PodKey
from agent.events import EventBus
from agent.pool.ipam import IpPool
from agent.pool.ranges import InvalidRanges, RangeFollower, plan_ranges, range_addresses


def nets(*texts: str) -> tuple[IPv4Network, ...]:
    return tuple(IPv4Network(t) for t in texts)


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def key(n: int) -> PodKey:
    return PodKey(network="podwire", container_id=f"c{n}", ifname="eth0")


def owned(*ranges: str, reserved: tuple[str, ...] = ()) -> dict[IPv4Address, str]:
    return range_addresses(nets(*ranges), [ip(r) for r in reserved])


@pytest.mark.parametrize(
    ("old", "new", "joined", "moved", "left"),
    [
        # same ranges: nothing to do
        (("10.4.1.0/24",), ("10.4.1.0/24",), {}, {}, 0),
        # a range is added: its usable addresses join, owned by it
        (("10.4.1.0/28",), ("10.4.1.0/28", "10.4.9.0/29"), {"10.4.9.0/29": 6}, {}, 0),
        # a /24 shrinks to its first /25: .1-.126 stay (new owner), .127 (the /25's broadcast)
        # and .128-.254 leave
        (("10.4.1.0/24",), ("10.4.1.0/25",), {}, {"10.4.1.0/25": 126}, 128),
        # to its second /25: .128 becomes a network address and leaves too
        (("10.4.1.0/24",), ("10.4.1.128/25",), {}, {"10.4.1.128/25": 126}, 128),
        # a /25 grows to the /24: .127 and .128 were never usable addresses and now join
        (("10.4.1.0/25",), ("10.4.1.0/24",), {"10.4.1.0/24": 128}, {"10.4.1.0/24": 126}, 0),
        # replaced by a disjoint range
        (("10.4.1.0/29",), ("10.4.2.0/29",), {"10.4.2.0/29": 6}, {}, 6),
        # every range gone
        (("10.4.1.0/29",), (), {}, {}, 6),
    ],
)
def test_plan_rows(
    old: tuple[str, ...],
    new: tuple[str, ...],
    joined: dict[str, int],
    moved: dict[str, int],
    left: int,
) -> None:
    plan = plan_ranges(owned(*old), nets(*old), nets(*new))
    assert {o: len(v) for o, v in plan.join.items()} == joined
    assert {o: len(v) for o, v in plan.move.items()} == moved
    assert len(plan.leave) == left
    assert plan.ranges_added == tuple(r for r in nets(*new) if r not in nets(*old))
    assert plan.ranges_removed == tuple(r for r in nets(*old) if r not in nets(*new))
    assert plan.empty == (old == new)


def test_shrink_leaves_the_new_broadcast_and_never_hands_out_network_addresses() -> None:
    plan = plan_ranges(owned("10.4.1.0/24"), nets("10.4.1.0/24"), nets("10.4.1.0/25"))
    assert ip("10.4.1.127") in plan.leave and ip("10.4.1.126") not in plan.leave
    kept = set(plan.move["10.4.1.0/25"])
    assert ip("10.4.1.0") not in kept and ip("10.4.1.127") not in kept


def test_reserved_addresses_never_join() -> None:
    plan = plan_ranges({}, (), nets("10.0.1.0/29"), [ip("10.0.1.1"), ip("10.0.1.4")])
    assert [str(i) for i in plan.join["10.0.1.0/29"]] == [
        "10.0.1.2",
        "10.0.1.3",
        "10.0.1.5",
        "10.0.1.6",
    ]


def test_overlapping_ranges_are_refused() -> None:
    with pytest.raises(InvalidRanges, match="overlaps"):
        plan_ranges({}, (), nets("10.4.1.0/24", "10.4.1.128/25"))


# --- the follower ------------------------------------------------------------------------------


class FakeSource:
    def __init__(self, ranges: tuple[IPv4Network, ...], reserved: tuple[IPv4Address, ...] = ()):
        self.ranges = ranges
        self.reserved = reserved
        self.send, self.recv = anyio.create_memory_object_stream[tuple[IPv4Network, ...]](10)

    async def watch_ranges(self) -> AsyncIterator[tuple[IPv4Network, ...]]:
        async for ranges in self.recv:
            self.ranges = ranges
            yield ranges


def follower_on(*ranges: str) -> tuple[RangeFollower, IpPool, FakeSource, list[int], EventBus]:
    pool = IpPool(cooldown=0.0)
    for owner, ips in _by_owner(owned(*ranges)).items():
        pool.add_block(owner, ips)
    source = FakeSource(nets(*ranges))
    notified: list[int] = []
    events = EventBus()
    f = RangeFollower(pool, source, on_change=lambda: notified.append(1), events=events)
    return f, pool, source, notified, events


def _by_owner(addresses: dict[IPv4Address, str]) -> dict[str, list[IPv4Address]]:
    out: dict[str, list[IPv4Address]] = {}
    for a, o in addresses.items():
        out.setdefault(o, []).append(a)
    return out


def test_a_shrink_withdraws_what_pods_hold_and_reports_it() -> None:
    f, pool, _, notified, events = follower_on("10.4.1.0/24")
    held = [pool.assign(key(i), 0.0).ip for i in range(3)]  # .1 .2 .3
    plan = f.apply(nets("10.4.1.128/25"))
    assert plan is not None and notified == [1]
    assert set(pool.withdrawn_in_use()) == set(held)
    assert pool.owners() == ["10.4.1.128/25"] and pool.total == 126
    kinds = [e["kind"] for e in events.recent()]
    assert kinds == ["pool.ranges_changed"] + ["pool.withdrawn_in_use"] * 3
    assert events.recent()[0]["withdrawn_in_use"] == 3
    # every pod goes; none of their addresses ever comes back
    for a in held:
        pool.release(a, 0.0)
    got = {pool.assign(key(10 + i), 1.0).ip for i in range(126)}
    assert not got & set(held) and all(a in IPv4Network("10.4.1.128/25") for a in got)
    assert f.status()["ranges"] == ["10.4.1.128/25"] and f.changes == 1


def test_unchanged_ranges_do_nothing_and_overlaps_keep_the_old_ranges() -> None:
    f, pool, _, notified, events = follower_on("10.4.1.0/28")
    assert f.apply(nets("10.4.1.0/28")) is not None and notified == []
    assert f.apply(nets("10.4.1.0/28", "10.4.1.8/29")) is None
    assert f.ranges == nets("10.4.1.0/28") and pool.total == 14 and notified == []
    assert "overlaps" in f.status()["last_error"]
    assert events.recent()[-1]["kind"] == "pool.ranges_refused"


@pytest.mark.anyio
async def test_run_follows_the_source() -> None:
    f, pool, source, notified, _ = follower_on("10.4.1.0/29")
    async with anyio.create_task_group() as tg:
        assert await tg.start(f.run) is f
        await source.send.send(nets("10.4.1.0/29", "10.4.2.0/30"))
        await source.send.send(nets("10.4.2.0/30"))
        source.send.close()
    assert pool.owners() == ["10.4.2.0/30"] and pool.total == 2 and len(notified) == 2
