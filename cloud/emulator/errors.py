"""Errors of the emulator: one base, subclasses named by cause, carrying fields."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network


class EmulatorError(Exception):
    """Base of everything the emulator raises."""


class AllocatorError(EmulatorError):
    """A subnet allocator refused a request (the caller asked for something impossible)."""


class InsufficientAddresses(AllocatorError):
    def __init__(self, cidr: IPv4Network, wanted: int, free: int) -> None:
        super().__init__(f"{cidr}: {wanted} address(es) wanted, {free} free")
        self.cidr, self.wanted, self.free = cidr, wanted, free


class InsufficientPrefixes(AllocatorError):
    def __init__(self, cidr: IPv4Network, wanted: int) -> None:
        super().__init__(f"{cidr}: no room for {wanted} free /28 prefix(es)")
        self.cidr, self.wanted = cidr, wanted


class AddressOutsideSubnet(AllocatorError):
    def __init__(self, cidr: IPv4Network, what: IPv4Address | IPv4Network) -> None:
        super().__init__(f"{what} is not inside {cidr}")
        self.cidr, self.what = cidr, what


class AddressReserved(AllocatorError):
    def __init__(self, cidr: IPv4Network, what: IPv4Address | IPv4Network) -> None:
        super().__init__(f"{what} overlaps the reserved addresses of {cidr}")
        self.cidr, self.what = cidr, what


class AddressInUse(AllocatorError):
    def __init__(self, cidr: IPv4Network, what: IPv4Address | IPv4Network) -> None:
        super().__init__(f"{what} is already in use in {cidr}")
        self.cidr, self.what = cidr, what


class FabricError(EmulatorError):
    """An ``ip`` command building the VPC fabric failed."""

    def __init__(self, netns: str, commands: str, stderr: str) -> None:
        super().__init__(f"ip -n {netns} -batch failed: {stderr.strip()}\n{commands}")
        self.netns, self.commands, self.stderr = netns, commands, stderr


class NotOurNamespace(EmulatorError):
    """Refused to touch a namespace the emulator did not name (safety net for the machine's own)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refusing to touch network namespace {name!r}: not made by podwire")
        self.name = name


class FirewallError(EmulatorError):
    """nftables refused the VPC router's security-group rule set."""

    def __init__(self, netns: str, stderr: str, script_excerpt: str) -> None:
        super().__init__(f"nft in {netns} failed: {stderr.strip()}\n{script_excerpt}")
        self.netns, self.stderr, self.script_excerpt = netns, stderr, script_excerpt


class VlanError(EmulatorError):
    """Loading or attaching an 802.1Q program failed (errno, and the verifier's or kernel's
    text)."""

    def __init__(self, op: str, error: int, detail: str) -> None:
        super().__init__(f"802.1Q datapath: {op} failed: errno {error}: {detail.strip()}")
        self.op, self.error, self.detail = op, error, detail
