"""IpPool groups: a set of security groups (eni mode) keeps its ENIs' addresses in a group of
its own; ordinary pods only ever get the shared pool's, and a set's pod only its set's."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from agent.cni.spec import PodKey
from agent.pool.ipam import IpPool, PoolExhausted


def key(n: int) -> PodKey:
    return PodKey(network="net", container_id=f"c{n}", ifname="eth0")


def ips(*last: int) -> list[IPv4Address]:
    return [IPv4Address(f"10.0.0.{n}") for n in last]


def pool() -> IpPool:
    p = IpPool(cooldown=30.0)
    p.add_block("eni-shared", ips(1, 2), table=None)
    p.add_block("eni-a", ips(11, 12), table=3, group="sg-a")
    p.add_block("eni-b", ips(21), table=4, group="sg-b,sg-c")
    return p


def test_each_pod_gets_an_address_of_its_own_group() -> None:
    p = pool()
    assert p.assign(key(1), 0.0).ip in ips(1, 2)
    lease = p.assign(key(2), 0.0, group="sg-a")
    assert lease.ip in ips(11, 12) and lease.owner == "eni-a" and lease.table == 3
    assert p.assign(key(3), 0.0, group="sg-b,sg-c").ip == ips(21)[0]
    with pytest.raises(PoolExhausted) as e:
        p.assign(key(4), 0.0, group="sg-b,sg-c")
    assert e.value.total == 1
    with pytest.raises(PoolExhausted) as none:
        p.assign(key(5), 0.0, group="sg-unknown")
    assert none.value.reason == "the pool holds no addresses"


def test_the_shared_counts_leave_the_sets_out() -> None:
    p = pool()
    p.assign(key(1), 0.0, group="sg-a")
    assert (p.total, p.assigned, p.cooling, p.available(0.0)) == (2, 0, 0, 2)
    assert p.available(0.0, group="sg-a") == 1
    counts = {c.owner: c for c in p.owner_counts(0.0)}
    assert counts["eni-a"].group == "sg-a" and counts["eni-a"].assigned == 1
    assert counts["eni-shared"].group == ""
    assert p.groups() == ["", "sg-a", "sg-b,sg-c"]


def test_release_cools_in_its_group_and_remembers_when() -> None:
    p = pool()
    a = p.assign(key(1), 0.0, group="sg-a").ip
    assert p.last_release("sg-a") is None
    assert p.release(a, 5.0)
    assert p.last_release("sg-a") == 5.0 and p.last_release("") is None
    assert p.next_free_in(10.0, group="sg-a") == 25.0
    assert p.next_free_in(10.0) is None  # the shared pool has nothing cooling
    assert p.cooling == 0 and p.available(10.0, group="sg-a") == 1
    # past the cooldown it is the set's again, never the shared pool's
    assert p.available(40.0, group="sg-a") == 2
    assert p.available(40.0) == 2
    # a restored checkpoint's cooling entry counts as a release too
    p.cool(ips(12)[0], 50.0)
    assert p.last_release("sg-a") == 50.0


def test_claim_and_remove_work_by_address_across_groups() -> None:
    p = pool()
    p.claim(ips(12)[0], key(1))
    assert p.holder(ips(12)[0]) == key(1)
    assert p.assign(key(2), 0.0, group="sg-a").ip == ips(11)[0]
    assert p.remove_free(ips(11, 12, 21)) == ips(21)
    assert p.drop_owner_if_empty("eni-b")
    assert p.groups() == ["", "sg-a"]
    assert p.group_of("eni-b") == ""  # forgotten


def test_an_owner_keeps_its_group() -> None:
    p = pool()
    p.add_block("eni-a", ips(13), table=3)  # a top-up: the group is the owner's
    assert p.available(0.0, group="sg-a") == 3
    assert "groups=2" in repr(p)
