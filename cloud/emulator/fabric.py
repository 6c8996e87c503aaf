"""The VPC fabric in network namespaces: a router, an internet, one cable per attached ENI.

Theory of operation: the ``vpc`` namespace is the VPC router. Every attached ENI is a veth pair
created inside the router with its far end placed straight into the node's namespace, named
``eth<device index>`` and carrying the ENI's MAC. The router reaches an ENI the way the VPC does,
by MAC and not by ARP: each cable gets a private next hop (169.254.0.0/17) with a permanent
neighbour entry pointing at the ENI's MAC, and every address, /28 prefix or static pod CIDR owned
by that ENI is routed ``via <next hop> dev <cable> onlink``. Gateways (subnet base + 1) and the
metadata address live on the router's ``lo``; proxy ARP on the cables lets a node reach the rest
of its subnet through the router. The ``internet`` namespace hangs off the router at 203.0.113.10.
``apply`` diffs the wanted ``Wiring`` against what it built before and issues one ``ip -batch``
per namespace touched. Nothing here runs outside namespaces the emulator made.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import attrs

from cloud.emulator.netns import Namespace
from cloud.emulator.wiring import Cable, Wiring

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
}


@attrs.frozen
class _Plugged:
    cable: Cable
    router_if: str
    next_hop: IPv4Address


class Fabric:
    """The router and internet namespaces and the cables and routes built so far."""

    def __init__(self, router: Namespace, internet: Namespace) -> None:
        self.router = router
        self.internet = internet
        self._plugged: dict[str, _Plugged] = {}
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
        """Make the kernel match ``wiring`` (raises FabricError if an ``ip`` command fails)."""
        router: list[str] = []
        nodes: dict[str, list[str]] = defaultdict(list)

        for eni_id, plugged in list(self._plugged.items()):
            if wiring.cables.get(eni_id) != plugged.cable:
                # Deleting one end removes the pair and every route through it.
                router.append(f"link del {plugged.router_if}")
                del self._plugged[eni_id]
                self._routes = {n: e for n, e in self._routes.items() if e != eni_id}

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

        for net in [n for n in self._routes if n not in wiring.routes]:
            router.append(f"route del {net}")
            del self._routes[net]
        for net, eni_id in wiring.routes.items():
            plugged_to = self._plugged.get(eni_id)
            if self._routes.get(net) == eni_id or plugged_to is None:
                continue
            router.append(
                f"route replace {net} via {plugged_to.next_hop} dev {plugged_to.router_if} onlink"
            )
            self._routes[net] = eni_id

        self.router.ip_batch(router)
        for name, commands in nodes.items():
            Namespace(name).ip_batch(commands)

    def ports(self) -> dict[str, str]:
        """Where each cabled ENI meets the router: ENI id -> the router's interface."""
        return {eni_id: p.router_if for eni_id, p in self._plugged.items()}

    def router_link_of(self, eni_id: str) -> str | None:
        """The router-side name of an ENI's cable, or None if it is not cabled."""
        plugged = self._plugged.get(eni_id)
        return plugged.router_if if plugged else None

    def close(self) -> None:
        """Remove the router and the internet (the cables go with the router)."""
        self.router.delete()
        self.internet.delete()
        self._plugged.clear()
        self._routes.clear()
        self._gateways.clear()

    def __repr__(self) -> str:
        return (
            f"Fabric(router={self.router.name}, cables={len(self._plugged)}, "
            f"routes={len(self._routes)})"
        )
