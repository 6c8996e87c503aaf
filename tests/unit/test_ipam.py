from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from agent.cni.spec import PodKey
from agent.pool.ipam import AddressTaken, AddressUnknown, IpPool, PoolExhausted
from cloud.static import usable_hosts


def key(n: int) -> PodKey:
    return PodKey(network="podwire", container_id=f"c{n}", ifname="eth0")


def pool_of(cidr: str, cooldown: float = 30.0) -> IpPool:
    pool = IpPool(cooldown=cooldown)
    pool.add_block(cidr, usable_hosts(IPv4Network(cidr)))
    return pool


def test_usable_hosts_skip_network_broadcast_and_reserved() -> None:
    hosts = usable_hosts(IPv4Network("10.0.1.0/29"), [IPv4Address("10.0.1.1")])
    assert [str(h) for h in hosts] == ["10.0.1.2", "10.0.1.3", "10.0.1.4", "10.0.1.5", "10.0.1.6"]
    assert len(usable_hosts(IPv4Network("10.0.1.0/24"))) == 254
    assert len(usable_hosts(IPv4Network("10.0.1.8/31"))) == 2


def test_assign_until_exhausted_then_reason() -> None:
    pool = pool_of("10.0.1.0/30")  # .1 and .2
    ips = {pool.assign(key(i), 0.0).ip for i in range(2)}
    assert ips == {IPv4Address("10.0.1.1"), IPv4Address("10.0.1.2")}
    with pytest.raises(PoolExhausted) as e:
        pool.assign(key(3), 0.0)
    assert e.value.reason == "all 2 addresses in use"


def test_cooldown_blocks_reuse_until_it_elapses() -> None:
    pool = pool_of("10.0.1.0/30", cooldown=30.0)
    a = pool.assign(key(1), 0.0)
    pool.assign(key(2), 0.0)
    assert pool.release(a.ip, now=10.0)
    with pytest.raises(PoolExhausted) as e:
        pool.assign(key(3), 39.9)
    assert e.value.cooling == 1 and e.value.next_free_in == pytest.approx(0.1)
    assert pool.assign(key(3), 40.0).ip == a.ip


def test_cooling_items_at_a_time_leave_out_the_ended_cooldowns() -> None:
    # what the checkpoint writes: a DEL burst must not re-encode every ended cooldown
    pool = pool_of("10.0.1.0/29", cooldown=30.0)
    a, b = (pool.assign(key(i), 0.0).ip for i in (1, 2))
    pool.release(a, 10.0)
    pool.release(b, 20.0)
    assert pool.cooling_items() == [(a, 10.0), (b, 20.0)]
    assert pool.cooling_items(39.9) == [(a, 10.0), (b, 20.0)]
    assert pool.cooling_items(40.0) == [(b, 20.0)]
    assert pool.cooling == 1 and pool.available(40.0) == 5  # a is free again, b still cools


def test_fifo_reuse_prefers_the_longest_free() -> None:
    pool = pool_of("10.0.1.0/29", cooldown=0.0)
    first = pool.assign(key(1), 0.0).ip
    pool.release(first, 0.0)
    assert pool.assign(key(2), 1.0).ip != first  # other never-used addresses come first


def test_release_twice_is_harmless_and_counts_are_per_owner() -> None:
    pool = pool_of("10.0.1.0/29")
    pool.add_block("eni-2", [IPv4Address("10.0.2.10")], table=3)
    lease = pool.assign(key(1), 0.0)
    assert pool.release(lease.ip, 1.0) and not pool.release(lease.ip, 2.0)
    counts = {c.owner: (c.total, c.assigned, c.cooling) for c in pool.owner_counts(5.0)}
    assert counts == {"10.0.1.0/29": (6, 0, 1), "eni-2": (1, 0, 0)}
    assert "cooling=1" in repr(pool)


def test_claim_restores_and_detects_conflicts() -> None:
    pool = pool_of("10.0.1.0/29")
    ip = IPv4Address("10.0.1.3")
    assert pool.claim(ip, key(1)).owner == "10.0.1.0/29"
    assert pool.claim(ip, key(1)).ip == ip  # same holder again is fine
    with pytest.raises(AddressTaken):
        pool.claim(ip, key(2))
    with pytest.raises(AddressUnknown):
        pool.claim(IPv4Address("192.0.2.1"), key(3))
    assert all(pool.assign(key(10 + i), 0.0).ip != ip for i in range(5))


def test_remove_free_never_removes_assigned() -> None:
    pool = IpPool(cooldown=30)
    ips = [IPv4Address(f"10.0.2.{i}") for i in (10, 11, 12)]
    pool.add_block("eni-1", ips, table=2)
    held = pool.assign(key(1), 0.0)
    removed = pool.remove_free(ips)
    assert held.ip not in removed and len(removed) == 2
    assert not pool.drop_owner_if_empty("eni-1")
    pool.release(held.ip, 0.0)
    pool.remove_free([held.ip])
    assert pool.drop_owner_if_empty("eni-1") and pool.total == 0
    with pytest.raises(PoolExhausted, match="holds no addresses"):
        pool.assign(key(2), 0.0)


def test_assign_requested_takes_free_or_cooling_and_refuses_the_rest() -> None:
    pool = IpPool(cooldown=30.0)
    ips = [IPv4Address(f"10.0.0.{i}") for i in range(1, 5)]
    pool.add_block("b", ips)
    a, b = key(1), key(2)
    assert pool.assign_requested(ips[2], a, 0.0).ip == ips[2]  # not the FIFO's first
    assert pool.assign_requested(ips[2], a, 0.0).ip == ips[2]  # same key: fine
    with pytest.raises(AddressTaken):
        pool.assign_requested(ips[2], b, 0.0)
    pool.release(ips[2], 1.0)
    assert pool.assign_requested(ips[2], b, 2.0).ip == ips[2]  # cooling: skips the cooldown
    assert pool.cooling == 0 and pool.holder(ips[2]) == b
    with pytest.raises(AddressUnknown):
        pool.assign_requested(IPv4Address("10.9.9.9"), a, 2.0)
    assert [pool.assign(a, 3.0).ip for _ in range(3)] == [ips[0], ips[1], ips[3]]
