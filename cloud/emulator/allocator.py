"""Per-subnet address allocator: what EC2 does when it picks an address, without moto's dice.

Theory of operation: a subnet's usable space is its CIDR minus the five addresses AWS keeps
(network, router ``.1``, DNS ``.2``, future ``.3`` and broadcast). Secondary IPs and /28
prefixes share that space: an IP is never handed out inside a delegated prefix, and a prefix is
carved only from an aligned /28 that holds no IP, no other prefix and no reserved address.
Allocation is lowest-first, so results are deterministic and tests can predict them. Requests are
all-or-nothing: a request that cannot be served whole changes nothing.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import attrs

from cloud.emulator.errors import (
    AddressInUse,
    AddressOutsideSubnet,
    AddressReserved,
    InsufficientAddresses,
    InsufficientPrefixes,
)

PREFIX_LEN = 28
PREFIX_SIZE = 1 << (32 - PREFIX_LEN)
RESERVED_AT_START = 4


def reserved_addresses(cidr: IPv4Network) -> frozenset[int]:
    """Return the addresses AWS never hands out in ``cidr`` (as integers)."""
    base = int(cidr.network_address)
    return frozenset([*range(base, base + RESERVED_AT_START), int(cidr.broadcast_address)])


@attrs.define(repr=False)
class SubnetAllocator:
    """The addresses and /28 prefixes in use in one subnet."""

    cidr: IPv4Network
    _ips: set[int] = attrs.field(factory=set)
    _prefixes: set[int] = attrs.field(factory=set)
    _reserved: frozenset[int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._reserved = reserved_addresses(self.cidr)

    @property
    def free_count(self) -> int:
        """Addresses that can still be handed out one by one."""
        usable = self.cidr.num_addresses - len(self._reserved)
        return max(usable - len(self._ips) - PREFIX_SIZE * len(self._prefixes), 0)

    def allocate_ips(self, count: int) -> list[IPv4Address]:
        """Take the ``count`` lowest free addresses and return them.

        Raises InsufficientAddresses (and takes nothing) when fewer are free.
        """
        if count <= 0:
            return []
        if count > self.free_count:
            raise InsufficientAddresses(self.cidr, count, self.free_count)
        found: list[int] = []
        address = int(self.cidr.network_address)
        end = int(self.cidr.broadcast_address)
        while len(found) < count and address <= end:
            block = address & ~(PREFIX_SIZE - 1)
            if block in self._prefixes:
                address = block + PREFIX_SIZE
                continue
            if address not in self._ips and address not in self._reserved:
                found.append(address)
            address += 1
        self._ips.update(found)
        return [IPv4Address(a) for a in found]

    def claim_ip(self, ip: IPv4Address) -> None:
        """Take one given address.

        Raises AddressOutsideSubnet, AddressReserved or AddressInUse (inside a prefix too).
        """
        value = int(ip)
        if ip not in self.cidr:
            raise AddressOutsideSubnet(self.cidr, ip)
        if value in self._reserved:
            raise AddressReserved(self.cidr, ip)
        if value in self._ips or (value & ~(PREFIX_SIZE - 1)) in self._prefixes:
            raise AddressInUse(self.cidr, ip)
        self._ips.add(value)

    def release_ip(self, ip: IPv4Address) -> bool:
        """Give an address back; return whether it was taken (releasing twice is harmless)."""
        value = int(ip)
        if value in self._ips:
            self._ips.remove(value)
            return True
        return False

    def allocate_prefixes(self, count: int) -> list[IPv4Network]:
        """Carve the ``count`` lowest free aligned /28 prefixes and return them.

        Raises InsufficientPrefixes (and takes nothing) when the free space is too fragmented or
        too small.
        """
        if count <= 0:
            return []
        found = self._free_blocks(count)
        if len(found) < count:
            raise InsufficientPrefixes(self.cidr, count)
        self._prefixes.update(found)
        return [IPv4Network((b, PREFIX_LEN)) for b in found]

    def claim_prefix(self, prefix: IPv4Network) -> None:
        """Take one given /28.

        Raises AddressOutsideSubnet (also for a wrong length or alignment), AddressReserved or
        AddressInUse.
        """
        if prefix.prefixlen != PREFIX_LEN or not prefix.subnet_of(self.cidr):
            raise AddressOutsideSubnet(self.cidr, prefix)
        block = int(prefix.network_address)
        if self._overlaps_reserved(block):
            raise AddressReserved(self.cidr, prefix)
        if block in self._prefixes or self._holds_ip(block):
            raise AddressInUse(self.cidr, prefix)
        self._prefixes.add(block)

    def release_prefix(self, prefix: IPv4Network) -> bool:
        """Give a /28 back; return whether it was taken."""
        block = int(prefix.network_address)
        if block in self._prefixes:
            self._prefixes.remove(block)
            return True
        return False

    def _free_blocks(self, count: int) -> list[int]:
        if self.cidr.prefixlen > PREFIX_LEN:
            return []
        blocks_with_ips = {ip & ~(PREFIX_SIZE - 1) for ip in self._ips}
        found: list[int] = []
        start = int(self.cidr.network_address)
        for block in range(start, start + self.cidr.num_addresses, PREFIX_SIZE):
            if (
                block not in self._prefixes
                and block not in blocks_with_ips
                and not self._overlaps_reserved(block)
            ):
                found.append(block)
                if len(found) == count:
                    break
        return found

    def _overlaps_reserved(self, block: int) -> bool:
        return any(block <= r < block + PREFIX_SIZE for r in self._reserved)

    def _holds_ip(self, block: int) -> bool:
        return any(block <= ip < block + PREFIX_SIZE for ip in self._ips)

    def __repr__(self) -> str:
        return (
            f"SubnetAllocator({self.cidr}, ips={len(self._ips)}, "
            f"prefixes={len(self._prefixes)}, free={self.free_count})"
        )
