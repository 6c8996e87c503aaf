"""The static provider: the node owns fixed pod CIDRs (GKE routes-based / alias-range style).

No cloud calls: the CIDRs come from configuration and something outside the node (the VPC's
route table, GKE's routes) sends their traffic to this node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network

from cloud.provider import AddressBlock, NodeFacts


def usable_hosts(
    cidr: IPv4Network, reserved: Iterable[IPv4Address] = ()
) -> tuple[IPv4Address, ...]:
    """Addresses of ``cidr`` a pod may get: never the network or broadcast address (for
    prefixes shorter than /31) nor anything ``reserved``."""
    skip = set(reserved)
    hosts = cidr.hosts() if cidr.prefixlen < 31 else iter(cidr)
    return tuple(ip for ip in hosts if ip not in skip)


def first_overlap(cidrs: Sequence[IPv4Network]) -> tuple[IPv4Network, IPv4Network] | None:
    """The first two of ``cidrs`` that overlap (a repeat included), or None."""
    for i, a in enumerate(cidrs):
        for b in cidrs[i + 1 :]:
            if a.overlaps(b):
                return a, b
    return None


class StaticProvider:
    name = "static"
    can_grow = False

    def __init__(self, cidrs: Sequence[IPv4Network], reserved: Sequence[IPv4Address] = ()) -> None:
        self.cidrs = tuple(cidrs)
        self.reserved = tuple(reserved)

    def __repr__(self) -> str:
        return f"StaticProvider({', '.join(map(str, self.cidrs))})"

    async def inventory(self) -> Sequence[AddressBlock]:
        return [AddressBlock(owner=str(c), ips=usable_hosts(c, self.reserved)) for c in self.cidrs]

    def facts(self) -> NodeFacts:
        return NodeFacts(primary_ip=None, vpc_cidrs=(), pod_cidrs=self.cidrs)
