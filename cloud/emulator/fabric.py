"""The VPC fabric in network namespaces: a router, an internet, one cable per attached ENI.

Theory of operation: the ``vpc`` namespace is the VPC router. Every attached ENI is a veth pair
created inside the router with its far end placed straight into the node's namespace, named
``eth<device index>`` and carrying the ENI's MAC. The router reaches an ENI the way the VPC does,
by MAC and not by ARP: each cable gets a private next hop (169.254.0.0/17) with a permanent
neighbour entry pointing at the ENI's MAC, and every address, /28 prefix or static pod CIDR owned
by that ENI is routed ``via <next hop> dev <cable> onlink``. Gateways (subnet base + 1) and the
metadata address live on the router's ``lo``; proxy ARP on the cables lets a node reach the rest
of its subnet through the router. The ``internet`` namespace hangs off the router at 203.0.113.10.

A trunk's cable also carries its branches, 802.1Q-tagged. Each associated branch gets a link of
its own in the router (``<cable>.<vlan id>``, a veth end) with its own next hop pointing at the
branch's MAC; an eBPF program on the cable's ingress pops the tag of a frame with a branch's VLAN
id and source MAC and delivers it on that link, and one on the link's egress pushes the tag and
sends the frame out of the cable (``netlink.dot1q``: this kernel has no VLAN devices). Untagged
frames stay the trunk's own. The router's forwarding and security groups then see a branch as an
ENI like any other, at its own link.
``apply`` diffs the wanted ``Wiring`` against what it built before and issues one ``ip -batch``
per namespace touched. Nothing here runs outside namespaces the emulator made.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import attrs
import orjson

from cloud.emulator.errors import VlanError
from cloud.emulator.netns import Namespace
from cloud.emulator.wiring import Branch, Cable, Wiring
from netlink.dot1q import kernel, programs
from netlink.errors import NetlinkError
from netlink.rtnl import Rtnl, opened_in

METADATA_IP = IPv4Address("169.254.169.254")
INTERNET_NET = IPv4Network("203.0.113.0/24")
ROUTER_INTERNET_IP = IPv4Interface("203.0.113.1/24")
INTERNET_IP = IPv4Interface("203.0.113.10/24")
_NEXT_HOPS = IPv4Network("169.254.0.0/17")

_ROUTER_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    # Inherited by every cable created afterwards.
    "net.ipv4.conf.default.proxy_arp": "1",
    # The VPC is IPv4 only here: no router solicitations or ND on the cables.
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}


@attrs.frozen
class _Plugged:
    cable: Cable
    router_if: str
    next_hop: IPv4Address


@attrs.frozen
class _PluggedBranch:
    branch: Branch
    router_if: str  # the branch's L3 link in the router (a veth end; its peer idles)
    peer_if: str
    next_hop: IPv4Address


class Fabric:
    """The router and internet namespaces and the cables, branches and routes built so far."""

    def __init__(self, router: Namespace, internet: Namespace) -> None:
        self.router = router
        self.internet = internet
        self._plugged: dict[str, _Plugged] = {}
        self._branches: dict[str, _PluggedBranch] = {}
        self._routes: dict[IPv4Network, str] = {}
        self._gateways: set[IPv4Address] = set()
        self._seq = itertools.count(1)

    @classmethod
    def create(cls) -> Fabric:
        """Make the router and internet namespaces, cabled together; return the fabric."""
        router = Namespace.create("vpc")
        internet = None
        try:
            internet = Namespace.create("inet")
            router.sysctls(_ROUTER_SYSCTLS)
            router.ip_batch(
                [
                    f"link add inet type veth peer name eth0 netns {internet.name}",
                    "link set inet up",
                    f"addr add {ROUTER_INTERNET_IP} dev inet",
                    f"addr add {METADATA_IP}/32 dev lo",
                ]
            )
            internet.ip_batch(
                [
                    f"addr add {INTERNET_IP} dev eth0",
                    "link set eth0 up",
                    f"route add default via {ROUTER_INTERNET_IP.ip}",
                ]
            )
        except BaseException:
            router.delete()
            if internet is not None:
                internet.delete()
            raise
        return cls(router, internet)

    def apply(self, wiring: Wiring) -> None:
        """Make the kernel match ``wiring``. Raises FabricError if an ``ip`` command fails and
        VlanError if a trunk's 802.1Q programs cannot be set."""
        router: list[str] = []
        nodes: dict[str, list[str]] = defaultdict(list)
        # Trunks whose demultiplexer must be set again, branches whose tagger must be set.
        retag: set[str] = set()
        tag: list[str] = []

        for eni_id, pb in list(self._branches.items()):
            trunk = self._plugged.get(pb.branch.trunk_eni_id)
            if (
                wiring.branches.get(eni_id) != pb.branch
                or trunk is None
                or wiring.cables.get(pb.branch.trunk_eni_id) != trunk.cable
            ):
                router.append(f"link del {pb.router_if}")
                del self._branches[eni_id]
                self._forget_routes(eni_id)
                retag.add(pb.branch.trunk_eni_id)

        for eni_id, plugged in list(self._plugged.items()):
            if wiring.cables.get(eni_id) != plugged.cable:
                # Deleting one end removes the pair and every route through it.
                router.append(f"link del {plugged.router_if}")
                del self._plugged[eni_id]
                self._forget_routes(eni_id)
                retag.discard(eni_id)

        for gateway in sorted(self._gateways - wiring.gateways):
            router.append(f"addr del {gateway}/32 dev lo")
        for gateway in sorted(wiring.gateways - self._gateways):
            router.append(f"addr add {gateway}/32 dev lo")
        self._gateways = set(wiring.gateways)

        for eni_id, cable in wiring.cables.items():
            if eni_id in self._plugged:
                continue
            seq = next(self._seq)
            plugged = _Plugged(cable, f"r{seq}", _NEXT_HOPS.network_address + seq)
            router += [
                f"link add {plugged.router_if} type veth peer name {cable.ifname} "
                f"address {cable.mac} netns {cable.netns}",
                f"link set {plugged.router_if} up",
                # Answer proxy ARP at once (the default waits up to 0.8 s).
                f"ntable change name arp_cache dev {plugged.router_if} proxy_delay 0",
                f"neigh replace {plugged.next_hop} lladdr {cable.mac} "
                f"dev {plugged.router_if} nud permanent",
            ]
            if cable.address is not None:
                nodes[cable.netns] += [
                    f"addr add {cable.address} dev {cable.ifname}",
                    f"link set {cable.ifname} up",
                    f"route replace default via {cable.gateway} dev {cable.ifname}",
                ]
            self._plugged[eni_id] = plugged

        for eni_id, branch in wiring.branches.items():
            trunk = self._plugged.get(branch.trunk_eni_id)
            if eni_id in self._branches or trunk is None:
                continue
            seq = next(self._seq)
            name = f"{trunk.router_if}.{branch.vlan_id}"
            pb = _PluggedBranch(branch, name, f"{name}p", _NEXT_HOPS.network_address + seq)
            router += [
                f"link add {pb.router_if} type veth peer name {pb.peer_if}",
                f"link set {pb.peer_if} up",
                f"link set {pb.router_if} up",
                f"ntable change name arp_cache dev {pb.router_if} proxy_delay 0",
                f"neigh replace {pb.next_hop} lladdr {branch.mac} dev {pb.router_if} nud permanent",
            ]
            self._branches[eni_id] = pb
            retag.add(branch.trunk_eni_id)
            tag.append(eni_id)

        for net in [n for n in self._routes if n not in wiring.routes]:
            router.append(f"route del {net}")
            del self._routes[net]
        for net, eni_id in wiring.routes.items():
            target = self._target(eni_id)
            if self._routes.get(net) == eni_id or target is None:
                continue
            next_hop, dev = target
            router.append(f"route replace {net} via {next_hop} dev {dev} onlink")
            self._routes[net] = eni_id

        self.router.ip_batch(router)
        for name, commands in nodes.items():
            Namespace(name).ip_batch(commands)
        if retag or tag:
            self._set_vlans(retag, tag)

    def _set_vlans(self, trunks: set[str], branches: list[str]) -> None:
        try:
            with opened_in(self.router.path) as rtnl:
                self._attach_programs(rtnl, trunks, branches)
        except NetlinkError as e:
            raise VlanError("802.1Q programs", getattr(e, "errno", 0), str(e)) from e

    def _attach_programs(self, rtnl: Rtnl, trunks: set[str], branches: list[str]) -> None:
        index = self._ifindexes()
        for eni_id in branches:
            pb = self._branches[eni_id]
            cable = self._plugged[pb.branch.trunk_eni_id]
            kernel.attach(
                rtnl,
                index[pb.router_if],
                "egress",
                programs.tagger(pb.branch.vlan_id, index[cable.router_if]),
                "pw_dot1q_tag",
                f"vpc tagger of {eni_id}",
            )
        for trunk_id in sorted(trunks):
            trunk = self._plugged.get(trunk_id)
            if trunk is None:
                continue
            on_trunk = sorted(
                (pb.branch for pb in self._branches.values() if pb.branch.trunk_eni_id == trunk_id),
                key=lambda b: b.vlan_id,
            )
            if not on_trunk:
                kernel.detach(rtnl, index[trunk.router_if])
                continue
            program = programs.demux(
                [
                    programs.Branch(
                        vlan_id=b.vlan_id,
                        ifindex=index[self._branches[b.eni_id].router_if],
                        mac=b.mac,
                    )
                    for b in on_trunk
                ]
            )
            kernel.attach(
                rtnl,
                index[trunk.router_if],
                "ingress",
                program,
                "pw_dot1q_demux",
                f"vpc demultiplexer of {trunk_id}",
            )

    def _ifindexes(self) -> dict[str, int]:
        links = orjson.loads(self.router.ip_text("-j", "link", "show"))
        return {link["ifname"]: int(link["ifindex"]) for link in links}

    def _target(self, eni_id: str) -> tuple[IPv4Address, str] | None:
        plugged = self._plugged.get(eni_id)
        if plugged is not None:
            return plugged.next_hop, plugged.router_if
        pb = self._branches.get(eni_id)
        if pb is not None:
            return pb.next_hop, pb.router_if
        return None

    def _forget_routes(self, eni_id: str) -> None:
        self._routes = {n: e for n, e in self._routes.items() if e != eni_id}

    def ports(self) -> dict[str, str]:
        """Where each ENI on the wire meets the router: ENI id -> the router's interface (a
        cable's router end; for a branch, its link on the trunk's VLAN)."""
        found = {eni_id: p.router_if for eni_id, p in self._plugged.items()}
        found |= {eni_id: pb.router_if for eni_id, pb in self._branches.items()}
        return found

    def trunk_cables(self) -> dict[str, tuple[str, str]]:
        """Every cabled trunk: ENI id -> (the cable's router end, the trunk's MAC)."""
        return {
            eni_id: (p.router_if, p.cable.mac)
            for eni_id, p in self._plugged.items()
            if p.cable.trunk
        }

    def router_link_of(self, eni_id: str) -> str | None:
        """The router-side name of an ENI's cable, or None if it is not cabled."""
        plugged = self._plugged.get(eni_id)
        return plugged.router_if if plugged else None

    def close(self) -> None:
        """Remove the router and the internet (the cables go with the router)."""
        self.router.delete()
        self.internet.delete()
        self._plugged.clear()
        self._branches.clear()
        self._routes.clear()
        self._gateways.clear()

    def __repr__(self) -> str:
        return (
            f"Fabric(router={self.router.name}, cables={len(self._plugged)}, "
            f"branches={len(self._branches)}, routes={len(self._routes)})"
        )
