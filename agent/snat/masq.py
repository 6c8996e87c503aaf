"""SNAT as GKE's ip-masq-agent decides it: which destinations keep the pod's address.

ip-masq-agent masquerades pod traffic to every destination outside ``nonMasqueradeCIDRs``
(default: the RFC 1918 ranges) and, unless ``masqLinkLocal`` is set, keeps link-local
(169.254.0.0/16) unmasqueraded too. podwire renders that with its own SNAT state
(``agent.snat.rules``): the non-masquerade set is what the rules call the VPC CIDRs, the
destinations reached without NAT. Unlike ip-masq-agent, a configured list adds to the defaults
instead of replacing them, and the node's own subnet and pod ranges are always in the set, so
pod-to-pod traffic keeps its address even when the ranges are not RFC 1918 (privately used
public addresses); other nodes' non-RFC 1918 ranges must be configured.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, collapse_addresses
from typing import Final

import attrs

from cloud.provider import NodeFacts

RFC1918: Final = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)
LINK_LOCAL: Final = IPv4Network("169.254.0.0/16")


@attrs.frozen(kw_only=True)
class IpMasqPolicy:
    """ip-masq-agent's settings as podwire takes them (``[gce]`` in the config)."""

    non_masquerade_cidrs: tuple[IPv4Network, ...] = ()  # added to the defaults
    masq_link_local: bool = False


def non_masquerade_cidrs(
    policy: IpMasqPolicy, node_cidrs: Iterable[IPv4Network] = ()
) -> tuple[IPv4Network, ...]:
    """Destinations pod traffic reaches with its own address, collapsed and sorted: RFC 1918,
    link-local unless ``masq_link_local``, the configured CIDRs and ``node_cidrs``."""
    nets = [*RFC1918, *policy.non_masquerade_cidrs, *node_cidrs]
    if not policy.masq_link_local:
        nets.append(LINK_LOCAL)
    return tuple(sorted(collapse_addresses(nets)))


def ip_masq_facts(facts: NodeFacts, policy: IpMasqPolicy) -> NodeFacts:
    """``facts`` as the SNAT reconciler must see them under ip-masq-agent's rules: its VPC
    CIDRs (destinations reached without NAT) become the non-masquerade set."""
    return attrs.evolve(
        facts, vpc_cidrs=non_masquerade_cidrs(policy, (*facts.vpc_cidrs, *facts.pod_cidrs))
    )
