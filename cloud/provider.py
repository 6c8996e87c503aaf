"""What the agent needs from a cloud: the addresses this node may give to pods.

A provider reports *blocks*: addresses owned by one cloud object (a static CIDR, an ENI's
secondary IPs or prefixes) and the route table that traffic from them must use (None: main).
Providers that can grow the pool (aws) also take demand signals from the agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

import attrs


@attrs.frozen(kw_only=True)
class AddressBlock:
    owner: str
    ips: tuple[IPv4Address, ...]
    table: int | None = None
    # "" for the shared pool; an ENI made for a set of security groups: the set's key
    group: str = ""


def group_key(groups: Iterable[str]) -> str:
    """The key of a set of security groups: its ids, sorted, comma-joined. It names the set's
    addresses in the pool and is the value of the tag on the ENIs made with exactly that set."""
    return ",".join(sorted(set(groups)))


def groups_of_key(key: str) -> tuple[str, ...]:
    """The security groups of a set's key (``group_key``'s inverse)."""
    return tuple(g for g in key.split(",") if g)


@attrs.frozen(kw_only=True)
class NodeFacts:
    """What SNAT and the datapath need to know about the node's own network."""

    primary_ip: IPv4Address | None
    vpc_cidrs: tuple[IPv4Network, ...]
    pod_cidrs: tuple[IPv4Network, ...]


class Provider(Protocol):
    name: str
    can_grow: bool

    async def inventory(self) -> Sequence[AddressBlock]:
        """Return every block this node owns now (rebuilt from the cloud, never from disk)."""
        ...

    def facts(self) -> NodeFacts:
        """Return the node's network facts known after ``inventory``."""
        ...
