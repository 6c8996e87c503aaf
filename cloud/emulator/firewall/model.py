"""What the VPC router enforces, as plain values: ENIs with their addresses and groups, the
groups' rules, and where each ENI meets the router (its port: the interface its packets come in
by and leave by). ``build`` makes one from moto's state; ``render`` turns it into nftables."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Network

import attrs

# Protocols a rule can name besides numbers: EC2's names (``groups.normalize_protocol``).
ALL = "-1"


@attrs.frozen(kw_only=True)
class Rule:
    """One rule of a group, in one direction, with one peer (a CIDR or a referenced group).

    ``protocol`` is ``tcp``/``udp``/``icmp``/``icmpv6``, ``-1`` (all) or a number; for TCP and
    UDP ``low``..``high`` is the destination port range, for ICMP ``low`` is the type and
    ``high`` the code (-1: any); other protocols carry no ports.
    """

    protocol: str
    low: int = -1
    high: int = -1
    cidr: IPv4Network | None = None
    group: str | None = None


@attrs.frozen(kw_only=True)
class Group:
    id: str
    inbound: tuple[Rule, ...] = ()
    outbound: tuple[Rule, ...] = ()


@attrs.frozen(kw_only=True)
class Eni:
    """An ENI as the groups see it: every address it holds, and its groups (in order)."""

    id: str
    addresses: tuple[IPv4Network, ...] = ()
    groups: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Port:
    """Where an ENI's packets enter and leave the router: one interface of the router."""

    eni_id: str
    ifname: str


@attrs.frozen(kw_only=True)
class TrunkCable:
    """A trunk ENI's cable, router end: only the trunk's own untagged frames and the tagged
    frames of its associated branches (taken off before nftables sees them) may arrive."""

    eni_id: str
    ifname: str
    mac: str


@attrs.frozen(kw_only=True)
class Policy:
    """Everything the router's rule set is a function of."""

    enis: Mapping[str, Eni] = attrs.field(factory=dict)
    groups: Mapping[str, Group] = attrs.field(factory=dict)
    ports: tuple[Port, ...] = ()
    trunks: tuple[TrunkCable, ...] = ()
