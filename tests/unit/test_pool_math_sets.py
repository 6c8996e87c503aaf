"""Pool math for sets of security groups (eni mode): the shared pool and every set planned
together over the instance's ENI slots, as row tables, plus properties."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.pool.pool_math import (
    SHARED,
    EniState,
    InstanceLimits,
    NodePlan,
    PoolConfigError,
    PoolStateError,
    PoolTargets,
    SetState,
    SetTargets,
    plan_node,
)

NOW = 100_000.0
OLD = 3600.0

M5_LARGE = InstanceLimits(max_enis=3, ipv4_per_eni=10)  # 9 addresses per ENI
M5_XLARGE = InstanceLimits(max_enis=4, ipv4_per_eni=15)  # 14 addresses per ENI
WARM_ENI_1 = PoolTargets()


def eni(
    index: int,
    total: int = 0,
    assigned: int = 0,
    cooling: int = 0,
    *,
    age: float = OLD,
    name: str = "",
    no_manage: bool = False,
) -> EniState:
    return EniState(
        eni_id=name or f"eni-{index}",
        device_index=index,
        primary=index == 0,
        total_ips=total,
        assigned_ips=assigned,
        cooling_ips=cooling,
        created_at=NOW - age,
        no_manage=no_manage,
    )


def primary(total: int, assigned: int = 0) -> EniState:
    return eni(0, total, assigned)


def a_set(key: str, *enis: EniState, waiting: int = 0, in_use: bool = True) -> SetState:
    return SetState(key=key, enis=enis, waiting=waiting, in_use=in_use)


def node(
    shared: Sequence[EniState],
    sets: Sequence[SetState],
    limits: InstanceLimits = M5_XLARGE,
    *,
    targets: PoolTargets = WARM_ENI_1,
    reserve: int = 1,
    warm: int = 1,
    last_release: float | None = None,
) -> NodePlan:
    return plan_node(
        shared,
        sets,
        targets,
        limits,
        NOW,
        set_targets=SetTargets(warm_ips=warm, reserve_enis=reserve),
        last_release=last_release,
    )


def summary(p: NodePlan) -> dict[str, object]:
    """Each step's additions and frees, compactly: new ENIs, adds, releases, the freed ENI."""
    out: dict[str, object] = {}
    for key, step in p.steps:
        bits: list[object] = []
        if step.new_eni_ips or step.new_eni_prefixes:
            bits.append(("new", *step.new_eni_ips, *step.new_eni_prefixes))
        if step.ips_to_add:
            bits.append(("add", dict(step.ips_to_add)))
        if step.ips_to_release:
            bits.append(("release", dict(step.ips_to_release)))
        if step.eni_to_free:
            bits.append(("free", step.eni_to_free))
        out[key or "shared"] = tuple(bits)
    return out


# Rows: (shared ENIs, sets, limits, reserve, expected summary, refused keys)
ROWS = [
    pytest.param(
        [primary(14)],
        [a_set("sg-a", waiting=1), a_set("sg-b", waiting=1), a_set("sg-c", waiting=1)],
        M5_XLARGE,
        0,
        {"sg-a": (("new", 2),), "sg-b": (("new", 2),), "sg-c": (("new", 2),), "shared": ()},
        set(),
        id="three new sets take the three free slots of an m5.xlarge (reserve 0)",
    ),
    pytest.param(
        [primary(14)],
        [a_set("sg-a", waiting=1), a_set("sg-b", waiting=1), a_set("sg-c", waiting=1)],
        M5_XLARGE,
        1,
        {"sg-a": (("new", 2),), "sg-b": (("new", 2),), "sg-c": (), "shared": ()},
        {"sg-c"},
        id="reserve 1: the shared pool keeps a slot beside its primary, the third set is refused",
    ),
    pytest.param(
        [primary(14)],
        [a_set("sg-a", waiting=6)],
        M5_XLARGE,
        1,
        {"sg-a": (("new", 7),), "shared": ()},
        set(),
        id="a burst of six: one ENI with the six and the margin, in the same call",
    ),
    pytest.param(
        [primary(14)],
        [a_set("sg-a", eni(1, 2, 1, name="eni-a"))],
        M5_XLARGE,
        1,
        {"shared": (), "sg-a": ()},
        set(),
        id="margin met: nothing to do (the next pod of the set needs no EC2 call)",
    ),
    pytest.param(
        [primary(14)],
        [a_set("sg-a", eni(1, 2, 2, name="eni-a"))],
        M5_XLARGE,
        1,
        {"shared": (), "sg-a": (("add", {"eni-a": 1}),)},
        set(),
        id="margin taken by a pod: one more address on the set's ENI",
    ),
    pytest.param(
        [primary(14)],
        [a_set("sg-a", eni(1, 14, 14, name="eni-a"), waiting=1)],
        M5_XLARGE,
        1,
        {"sg-a": (("new", 2),), "shared": ()},
        set(),
        id="the set's ENI is full: a second ENI for the same set",
    ),
    pytest.param(
        [primary(14), eni(2, 14, 3)],
        [
            a_set("sg-a", eni(1, 14, 14, name="eni-a"), waiting=1),
            a_set("sg-b", eni(3, 2, 1, name="eni-b")),
        ],
        M5_XLARGE,
        0,
        {"sg-a": (), "shared": (), "sg-b": ()},
        {"sg-a"},
        id="the set's ENI is full and every slot is taken: refused",
    ),
    pytest.param(
        [primary(9, 9)],
        [a_set("sg-a", waiting=1), a_set("sg-b", waiting=1)],
        M5_LARGE,
        0,
        {"sg-a": (("new", 2),), "sg-b": (), "shared": (("new", 9),)},
        {"sg-b"},
        id="the shared pool is planned first: its growth takes a slot before the sets",
    ),
    pytest.param(
        [primary(9), eni(1, no_manage=True)],
        [a_set("sg-a", waiting=1)],
        M5_LARGE,
        1,
        {"sg-a": (), "shared": ()},
        {"sg-a"},
        id="a no-manage ENI takes a slot from the sets",
    ),
    pytest.param(
        [primary(14)],
        [a_set("sg-a", eni(1, 2, 0, name="eni-a"), in_use=False)],
        M5_XLARGE,
        1,
        {"shared": (), "sg-a": (("free", "eni-a"),)},
        set(),
        id="a set no longer in use: its ENI is freed",
    ),
    pytest.param(
        [primary(14)],
        [a_set("sg-a", eni(1, 2, 0, 1, name="eni-a"), in_use=False)],
        M5_XLARGE,
        1,
        {"shared": (), "sg-a": ()},
        set(),
        id="a set no longer in use with a cooling address: the ENI stays while it cools",
    ),
    pytest.param(
        [primary(14)],
        [a_set("sg-a", eni(1, 2, 0, age=10.0, name="eni-a"), in_use=False)],
        M5_XLARGE,
        1,
        {"shared": (), "sg-a": ()},
        set(),
        id="a set no longer in use, ENI younger than the minimum age: kept, addresses and all",
    ),
    pytest.param(
        [primary(14)],
        [a_set("sg-a", eni(1, 8, 1, name="eni-a"))],
        M5_XLARGE,
        1,
        {"shared": (), "sg-a": (("release", {"eni-a": 6}),)},
        set(),
        id="pods of a set left: addresses over the margin are released",
    ),
    pytest.param(
        [primary(14), eni(1, 14)],
        [a_set("sg-a", eni(2, 2, 0, name="eni-a"), in_use=False), a_set("sg-b", waiting=1)],
        M5_XLARGE,
        1,
        {"sg-b": (("new", 2),), "shared": (("free", "eni-1"),), "sg-a": (("free", "eni-a"),)},
        set(),
        id="a slot freed by a set is not reused in the same decision; the free one is",
    ),
]


@pytest.mark.parametrize(("shared", "sets", "limits", "reserve", "expected", "refused"), ROWS)
def test_sets_sharing_slots(
    shared: list[EniState],
    sets: list[SetState],
    limits: InstanceLimits,
    reserve: int,
    expected: dict[str, object],
    refused: set[str],
) -> None:
    p = node(shared, sets, limits, reserve=reserve)
    assert summary(p) == expected
    assert set(p.refused) == refused


def test_steps_put_waiting_sets_before_the_shared_pool() -> None:
    p = node(
        [primary(14, 14)],
        [a_set("sg-z", waiting=1), a_set("sg-b", eni(1, 2, 2, name="eni-b")), a_set("sg-a")],
        reserve=0,
    )
    assert [k for k, _ in p.steps] == ["sg-z", SHARED, "sg-a", "sg-b"]


def test_refusals_name_the_limit() -> None:
    p = node([primary(14)], [a_set("sg-a", waiting=1)], M5_LARGE, reserve=2)
    assert p.refused["sg-a"] == (
        "no ENI slot left for a new set of security groups: 3 ENI slots: the shared pool "
        "holds 1 (security_groups.shared_reserve = 2 keeps 3 for it), sets hold 0"
    )
    full = node(
        [primary(9, 9), eni(1, 9, 9)],
        [a_set("sg-a", eni(2, 9, 8, 1, name="eni-a"), waiting=2)],
        M5_LARGE,
        reserve=0,
    )
    assert full.refused["sg-a"].startswith(
        "the set's 1 ENI(s) are full (9 addresses, 8 assigned, 1 cooling) and no ENI slot is left"
    )
    assert "set sg-a: refused: the set's 1 ENI(s) are full" in full.reason


def test_max_eni_caps_the_sets_too() -> None:
    p = node(
        [primary(14)],
        [a_set("sg-a", waiting=1), a_set("sg-b", waiting=1)],
        targets=PoolTargets(max_eni=2),
        reserve=0,
    )
    assert summary(p)["sg-a"] == (("new", 2),)
    assert set(p.refused) == {"sg-b"}


def test_a_waiting_burst_is_refused_only_past_what_the_plan_adds() -> None:
    # room for 9 on a new ENI of an m5.large: 12 waiting, 9 get one, the rest are refused
    p = node([primary(9)], [a_set("sg-a", waiting=12)], M5_LARGE, reserve=1)
    assert summary(p)["sg-a"] == (("new", 9),)
    assert set(p.refused) == {"sg-a"}
    ok = node([primary(9)], [a_set("sg-a", waiting=8)], M5_LARGE, reserve=1)
    assert summary(ok)["sg-a"] == (("new", 9),) and not ok.refused


def test_warm_zero_creates_only_for_waiting_adds() -> None:
    p = node([primary(14)], [a_set("sg-a", waiting=2)], warm=0)
    assert summary(p)["sg-a"] == (("new", 2),)
    idle = node([primary(14)], [a_set("sg-a", eni(1, 2, 2, name="eni-a"))], warm=0)
    assert summary(idle)["sg-a"] == ()


def test_bad_sets_are_rejected() -> None:
    with pytest.raises(PoolStateError):
        node([primary(14)], [a_set("sg-a"), a_set("sg-a")])
    with pytest.raises(PoolStateError):
        node([primary(14)], [a_set("")])
    with pytest.raises(PoolStateError):
        node([primary(14)], [a_set("sg-a", eni(0, 2))])  # the primary is the shared pool's
    with pytest.raises(PoolStateError):
        node([primary(14), eni(1, 2)], [a_set("sg-a", eni(1, 2))])  # listed twice
    with pytest.raises(PoolConfigError, match="shared_reserve"):
        SetTargets(reserve_enis=-1)
    with pytest.raises(PoolConfigError, match="set_warm_ips"):
        SetTargets(warm_ips=-1)


# --- properties -----------------------------------------------------------------------------


@attrs.frozen
class Node:
    limits: InstanceLimits
    shared: tuple[EniState, ...]
    sets: tuple[SetState, ...]
    reserve: int
    warm: int


@st.composite
def nodes(draw: st.DrawFn) -> Node:
    max_enis = draw(st.integers(2, 8))
    per = draw(st.integers(4, 15))
    limits = InstanceLimits(max_enis=max_enis, ipv4_per_eni=per)
    slots = per - 1
    indexes = list(range(1, max_enis))
    draw(st.randoms()).shuffle(indexes)
    used = draw(st.integers(0, len(indexes)))
    taken, indexes = indexes[:used], indexes[used:]

    def state(index: int, name: str) -> EniState:
        total = draw(st.integers(0, slots))
        assigned = draw(st.integers(0, total))
        cooling = draw(st.integers(0, total - assigned))
        age = draw(st.sampled_from([1.0, OLD]))
        return eni(index, total, assigned, cooling, age=age, name=name)

    shared_count = draw(st.integers(0, len(taken)))
    shared = [primary(slots, draw(st.integers(0, slots)))]
    shared += [state(i, f"eni-{i}") for i in taken[:shared_count]]
    rest = taken[shared_count:]
    sets: list[SetState] = []
    for n in range(draw(st.integers(0, 4))):
        mine = [state(i, f"eni-s{n}-{i}") for i in rest[n::4]]
        sets.append(
            SetState(
                key=f"sg-{n}",
                enis=tuple(mine),
                waiting=draw(st.integers(0, 20)),
                in_use=draw(st.booleans()),
            )
        )
    return Node(
        limits=limits,
        shared=tuple(shared),
        sets=tuple(sets),
        reserve=draw(st.integers(0, 3)),
        warm=draw(st.integers(0, 3)),
    )


@settings(max_examples=300, deadline=None)
@given(nodes())
def test_sets_never_take_the_shared_pools_reserve_nor_pass_the_slots(n: Node) -> None:
    p = node(n.shared, n.sets, n.limits, reserve=n.reserve, warm=n.warm)
    set_enis_before = sum(len(s.enis) for s in n.sets)
    new_for_sets = sum(len(step.new_eni_ips) for k, step in p.steps if k != SHARED)
    new_shared = len(p.shared.new_eni_ips)
    total_after = len(n.shared) + set_enis_before + new_for_sets + new_shared
    assert total_after <= n.limits.max_enis
    if new_for_sets:
        # a set took a slot only where the shared pool keeps its primary plus the reserve
        shared_after = len(n.shared) + new_shared
        assert n.limits.max_enis - set_enis_before - new_for_sets >= max(
            shared_after, 1 + n.reserve
        )
    for key, step in p.steps:
        if key == SHARED:
            continue
        s = next(s for s in n.sets if s.key == key)
        owned = {e.eni_id: e for e in s.enis}
        assert set(step.ips_to_add) <= set(owned)  # a set only grows its own ENIs
        assert step.eni_to_free is None or step.eni_to_free in owned
        if step.eni_to_free is not None:
            e = owned[step.eni_to_free]
            assert e.assigned_ips == 0 and e.cooling_ips == 0
        if key in p.refused:
            assert s.waiting > 0
