"""What the VPC fabric must look like for a given cloud state: a pure function of moto's objects.

A ``Wiring`` lists one cable per ENI attached (not still ``attaching``) to a simulated node, one
branch per ENI associated with a trunk that is cabled (it rides the trunk's cable on its VLAN),
the router's route for every address and prefix assigned to those ENIs and for the pod CIDRs of
static-provider nodes, and the gateway addresses (subnet base + 1) the router answers for.
``fabric.Fabric.apply`` makes the kernel match it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import attrs

from cloud.emulator import backend_state, rules


@attrs.frozen(kw_only=True)
class Cable:
    """An attached ENI as a veth: ``ifname`` with the ENI's MAC inside the node namespace."""

    eni_id: str
    netns: str
    ifname: str
    mac: str
    # Only the primary ENI (eth0) is configured by the fabric; the agent configures the others.
    address: IPv4Interface | None = None
    gateway: IPv4Address | None = None
    # A trunk's cable carries its branches' frames, tagged with their VLAN ids.
    trunk: bool = False


@attrs.frozen(kw_only=True)
class Branch:
    """A branch ENI on the wire: its frames cross its trunk's cable tagged ``vlan_id``, sent
    from and to the branch's own MAC."""

    eni_id: str
    trunk_eni_id: str
    vlan_id: int
    mac: str


@attrs.frozen(kw_only=True)
class Wiring:
    cables: Mapping[str, Cable] = attrs.field(factory=dict)
    branches: Mapping[str, Branch] = attrs.field(factory=dict)
    routes: Mapping[IPv4Network, str] = attrs.field(factory=dict)
    gateways: frozenset[IPv4Address] = frozenset()


@attrs.frozen(kw_only=True)
class NodeSpec:
    """A simulated node as the fabric sees it: its instance, namespace and static pod CIDRs."""

    instance_id: str
    netns: str
    pod_cidrs: tuple[IPv4Network, ...] = ()


def gateway_of(cidr: IPv4Network) -> IPv4Address:
    """The VPC router's address in a subnet: base + 1."""
    return cidr.network_address + 1


def desired_wiring(backend: Any, vpc_id: str, nodes: Iterable[NodeSpec]) -> Wiring:
    """Return the wiring the cloud state in ``backend`` calls for."""
    cables: dict[str, Cable] = {}
    branches: dict[str, Branch] = {}
    routes: dict[IPv4Network, str] = {}
    trunks = backend_state.extras(backend).trunks
    for node in nodes:
        instance = backend.get_instance(node.instance_id)
        if instance.state not in ("pending", "running"):
            continue
        for index, eni in instance.nics.items():
            if backend_state.is_attaching(eni):
                continue
            cidr = IPv4Network(eni.subnet.cidr_block)
            primary = index == 0
            cables[eni.id] = Cable(
                eni_id=eni.id,
                netns=node.netns,
                ifname=f"eth{index}",
                mac=eni.mac_address,
                address=IPv4Interface(f"{eni.private_ip_address}/{cidr.prefixlen}")
                if primary
                else None,
                gateway=gateway_of(cidr) if primary else None,
                trunk=eni.interface_type == "trunk",
            )
            _route_addresses(eni, routes)
            for assoc in trunks.of_trunk(eni.id):
                branch = backend.get_network_interface(assoc.branch_interface_id)
                branches[branch.id] = Branch(
                    eni_id=branch.id,
                    trunk_eni_id=eni.id,
                    vlan_id=assoc.vlan_id,
                    mac=branch.mac_address,
                )
                _route_addresses(branch, routes)
            if primary:
                for cidr_ in node.pod_cidrs:
                    routes[cidr_] = eni.id
    gateways = frozenset(
        gateway_of(IPv4Network(s.cidr_block))
        for s in backend.describe_subnets(filters={"vpc-id": [vpc_id]})
    )
    return Wiring(cables=cables, branches=branches, routes=routes, gateways=gateways)


def _route_addresses(eni: Any, routes: dict[IPv4Network, str]) -> None:
    for ip in rules.private_ips_of(eni):
        routes[IPv4Network(ip)] = eni.id
    for prefix in rules.prefixes_of(eni):
        routes[prefix] = eni.id
