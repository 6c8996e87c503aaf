"""IpPool.withdraw and move: a block leaving the node while some of its addresses are in use."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from agent.cni.spec import PodKey
from agent.pool.ipam import AddressUnknown, IpPool, PoolExhausted
from cloud.static import usable_hosts


def key(n: int) -> PodKey:
    return PodKey(network="podwire", container_id=f"c{n}", ifname="eth0")


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def pool_of(cidr: str, cooldown: float = 0.0) -> IpPool:
    pool = IpPool(cooldown=cooldown)
    pool.add_block(cidr, usable_hosts(IPv4Network(cidr)))
    return pool


def test_withdraw_removes_free_and_cooling_at_once_and_reports_assigned() -> None:
    pool = pool_of("10.4.1.0/29", cooldown=30.0)  # .1 - .6
    held = pool.assign(key(1), 0.0).ip  # .1
    cooling = pool.assign(key(2), 0.0).ip  # .2
    pool.release(cooling, 0.0)
    removed, in_use = pool.withdraw([ip("10.4.1.1"), ip("10.4.1.2"), ip("10.4.1.3")])
    assert removed == [ip("10.4.1.2"), ip("10.4.1.3")] and in_use == [held]
    assert pool.withdrawn_in_use() == {held: key(1)}
    assert pool.total == 3 and pool.assigned == 1 and pool.cooling == 0
    assert pool.holder(held) == key(1)  # the pod keeps its address until its DEL
    assert pool.owner_of(held) is None
    assert {c.owner: c.total for c in pool.owner_counts(0.0)} == {"10.4.1.0/29": 3}
    # unknown and already withdrawn addresses are ignored
    assert pool.withdraw([ip("192.0.2.1"), held]) == ([], [])


def test_a_withdrawn_address_leaves_on_release_and_is_never_handed_out_again() -> None:
    pool = pool_of("10.4.1.0/30")  # .1 and .2, no cooldown: a reuse would be immediate
    held = pool.assign(key(1), 0.0).ip
    pool.withdraw([held])
    assert pool.release(held, 0.0)  # the DEL succeeds
    assert pool.withdrawn_in_use() == {} and pool.cooling == 0 and pool.total == 1
    got = pool.assign(key(2), 1.0).ip
    assert got != held
    with pytest.raises(PoolExhausted):
        pool.assign(key(3), 100.0)
    with pytest.raises(AddressUnknown):  # a restart cannot claim it back either
        pool.claim(held, key(1))


def test_a_block_bringing_back_a_withdrawn_address_keeps_it_assigned() -> None:
    pool = pool_of("10.4.1.0/30")
    held = pool.assign(key(1), 0.0).ip
    pool.withdraw([held])
    assert pool.add_block("10.4.1.0/30", [held]) == 1
    assert pool.withdrawn_in_use() == {} and pool.holder(held) == key(1)
    assert pool.available(0.0) == 1  # only the other address: the held one is not free
    assert pool.assign(key(2), 0.0).ip != held
    pool.release(held, 0.0)
    assert pool.available(0.0) == 1 and pool.cooling == 0  # back in the pool as usual


def test_move_changes_the_owner_not_the_state() -> None:
    pool = pool_of("10.4.1.0/29", cooldown=30.0)
    a = pool.assign(key(1), 0.0).ip
    b = pool.assign(key(2), 0.0).ip
    pool.release(b, 0.0)
    assert pool.move([a, b, ip("192.0.2.1")], "10.4.1.0/30") == 2
    assert pool.move([a], "10.4.1.0/30") == 0
    counts = {c.owner: (c.total, c.assigned, c.cooling) for c in pool.owner_counts(1.0)}
    assert counts == {"10.4.1.0/29": (4, 0, 0), "10.4.1.0/30": (2, 1, 1)}
    assert pool.holder(a) == key(1)
