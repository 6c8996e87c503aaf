"""The enforcement policy the cloud state calls for: a function of moto's objects and of where
each ENI meets the router (the fabric's ports)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Network
from typing import Any

from cloud.emulator import rules as ec2_rules
from cloud.emulator.firewall.model import ALL, Eni, Group, Policy, Port, Rule, TrunkCable
from cloud.emulator.wiring import NodeSpec


# Every API call rebuilds the policy from moto's objects: parsing and building the same
# values again dominated that cost at a thousand ENIs, so both are memoised by value.
@functools.lru_cache(maxsize=65536)
def _net(text: str) -> IPv4Network:
    return IPv4Network(text, strict=False)


@functools.lru_cache(maxsize=65536)
def _rule_of(
    protocol: str, low: int | None, high: int | None, cidr: str | None, group: str | None
) -> Rule:
    return Rule(
        protocol=protocol,
        low=-1 if low is None else int(low),
        high=-1 if high is None else int(high),
        cidr=_net(cidr) if cidr else None,
        group=group,
    )


def _rule(moto_rule: Any) -> Rule:
    return _rule_of(
        str(moto_rule.ip_protocol or ALL),
        moto_rule.from_port,
        moto_rule.to_port,
        (moto_rule.ip_range or {}).get("CidrIp"),
        (moto_rule.source_group or {}).get("GroupId"),
    )


def group_of(moto_group: Any) -> Group:
    """A moto SecurityGroup as the renderer sees it."""
    return Group(
        id=moto_group.id,
        inbound=tuple(_rule(r) for r in moto_group.ingress_rules),
        outbound=tuple(_rule(r) for r in moto_group.egress_rules),
    )


def desired_policy(
    backend: Any,
    vpc_id: str,
    nodes: Iterable[NodeSpec],
    ports: Mapping[str, str],
    trunks: Iterable[TrunkCable] = (),
) -> Policy:
    """Return the policy for VPC ``vpc_id``: every ENI with every address it holds (primary,
    secondaries, /28 prefixes; a static-provider node's pod CIDRs count as its primary ENI's)
    and its groups, every group's rules, and ``ports`` (ENI id -> the router interface its
    packets use)."""
    static: dict[str, tuple[IPv4Network, ...]] = {}
    for node in nodes:
        if node.pod_cidrs:
            instance = backend.get_instance(node.instance_id)
            primary = instance.nics.get(0)
            if primary is not None:
                static[primary.id] = node.pod_cidrs
    enis = {}
    for eni in backend.enis.values():
        if eni.subnet.vpc_id != vpc_id:
            continue
        addresses = [_net(ip) for ip in ec2_rules.private_ips_of(eni)]
        addresses += ec2_rules.prefixes_of(eni)
        addresses += static.get(eni.id, ())
        enis[eni.id] = Eni(
            id=eni.id,
            addresses=tuple(addresses),
            groups=tuple(g.id for g in eni.group_set),
        )
    groups = {g.id: group_of(g) for g in backend.groups.get(vpc_id, {}).values()}
    return Policy(
        enis=enis,
        groups=groups,
        ports=tuple(Port(eni_id=e, ifname=i) for e, i in ports.items()),
        trunks=tuple(trunks),
    )
