"""The emulator's per-subnet allocator: lowest-first, no collisions, reserved addresses kept,
IPs and /28 prefixes sharing the space, all-or-nothing requests."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud.emulator.allocator import SubnetAllocator
from cloud.emulator.errors import (
    AddressInUse,
    AddressOutsideSubnet,
    AddressReserved,
    InsufficientAddresses,
    InsufficientPrefixes,
)


def alloc(cidr: str = "10.0.1.0/24") -> SubnetAllocator:
    return SubnetAllocator(IPv4Network(cidr))


def test_lowest_first_after_the_reserved_four() -> None:
    a = alloc()
    assert [str(ip) for ip in a.allocate_ips(3)] == ["10.0.1.4", "10.0.1.5", "10.0.1.6"]
    assert a.free_count == 256 - 5 - 3


@pytest.mark.parametrize("ip", ["10.0.1.0", "10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.255"])
def test_reserved_addresses_cannot_be_claimed(ip: str) -> None:
    with pytest.raises(AddressReserved):
        alloc().claim_ip(IPv4Address(ip))


def test_claims_collide_and_stay_inside() -> None:
    a = alloc()
    a.claim_ip(IPv4Address("10.0.1.9"))
    with pytest.raises(AddressInUse):
        a.claim_ip(IPv4Address("10.0.1.9"))
    with pytest.raises(AddressOutsideSubnet):
        a.claim_ip(IPv4Address("10.0.2.9"))
    assert IPv4Address("10.0.1.9") not in a.allocate_ips(10)


def test_exhaustion_is_all_or_nothing() -> None:
    a = alloc("10.0.1.0/28")
    assert a.free_count == 11
    with pytest.raises(InsufficientAddresses):
        a.allocate_ips(12)
    assert a.free_count == 11
    assert len(a.allocate_ips(11)) == 11
    with pytest.raises(InsufficientAddresses):
        a.allocate_ips(1)


def test_release_makes_room_and_is_idempotent() -> None:
    a = alloc("10.0.1.0/28")
    ips = a.allocate_ips(11)
    assert a.release_ip(ips[3]) is True
    assert a.release_ip(ips[3]) is False
    assert a.allocate_ips(1) == [ips[3]]


def test_prefixes_skip_reserved_blocks_and_blocks_with_ips() -> None:
    a = alloc("10.0.1.0/26")
    a.claim_ip(IPv4Address("10.0.1.20"))
    # .0/28 holds the reserved four, .16/28 holds .20, .48/28 holds the broadcast.
    assert a.allocate_prefixes(1) == [IPv4Network("10.0.1.32/28")]
    with pytest.raises(InsufficientPrefixes):
        a.allocate_prefixes(1)


def test_ips_are_never_handed_out_inside_a_prefix() -> None:
    a = alloc("10.0.1.0/26")
    (prefix,) = a.allocate_prefixes(1)
    assert prefix == IPv4Network("10.0.1.16/28")
    ips = a.allocate_ips(a.free_count)
    assert not any(ip in prefix for ip in ips)
    with pytest.raises(AddressInUse):
        a.claim_ip(IPv4Address("10.0.1.17"))
    a.release_prefix(prefix)
    assert a.allocate_ips(1) == [IPv4Address("10.0.1.16")]


def test_claim_prefix_rules() -> None:
    a = alloc()
    with pytest.raises(AddressReserved):
        a.claim_prefix(IPv4Network("10.0.1.0/28"))
    with pytest.raises(AddressOutsideSubnet):
        a.claim_prefix(IPv4Network("10.0.1.16/29"))
    a.claim_prefix(IPv4Network("10.0.1.16/28"))
    with pytest.raises(AddressInUse):
        a.claim_prefix(IPv4Network("10.0.1.16/28"))


def test_a_subnet_smaller_than_a_prefix_has_none() -> None:
    with pytest.raises(InsufficientPrefixes):
        alloc("10.0.1.0/28").allocate_prefixes(1)


def test_repr_shows_counts() -> None:
    a = alloc("10.0.1.0/28")
    a.allocate_ips(2)
    assert repr(a) == "SubnetAllocator(10.0.1.0/28, ips=2, prefixes=0, free=9)"


@given(
    st.lists(
        st.tuples(st.sampled_from(["ip", "prefix", "release"]), st.integers(1, 6)), max_size=40
    )
)
def test_nothing_is_ever_handed_out_twice(ops: list[tuple[str, int]]) -> None:
    a = alloc("10.0.1.0/25")
    ips: list[IPv4Address] = []
    prefixes: list[IPv4Network] = []
    for op, n in ops:
        try:
            if op == "ip":
                ips += a.allocate_ips(n)
            elif op == "prefix":
                prefixes += a.allocate_prefixes(min(n, 2))
            elif ips:
                a.release_ip(ips.pop(n % len(ips)))
        except (InsufficientAddresses, InsufficientPrefixes):
            pass
        assert len(set(ips)) == len(ips)
        assert not any(ip in p for ip in ips for p in prefixes)
        assert all(int(ip) & 0x7F not in (0, 1, 2, 3, 127) for ip in ips)
        assert a.free_count == 128 - 5 - len(ips) - 16 * len(prefixes)
