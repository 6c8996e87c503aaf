"""What the agent needs from a cloud: the addresses this node may give to pods.

A provider reports *blocks*: addresses owned by one cloud object (a static CIDR, an ENI's
secondary IPs or prefixes) and the route table that traffic from them must use (None: main).
Providers that can grow the pool (aws) also take demand signals from the agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

import attrs


@attrs.frozen(kw_only=True)
class AddressBlock:
    owner: str
    ips: tuple[IPv4Address, ...]
    table: int | None = None


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
