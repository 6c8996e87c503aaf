"""Branch ENI datapath: a pod with its own security groups reaches the VPC through a branch ENI
on the node's trunk, as Amazon VPC CNI builds it.

Theory of operation. The pod side is the ordinary routed veth (``netlink.veth``). On the node:

* ``vlan.eth.<vid>``: a link on the trunk ENI's link carrying the branch ENI's MAC, up, no
  address, whose frames cross the trunk tagged with the VLAN id (what EC2 needs). Its kind is
  ``vlan``, an 802.1Q device, where the kernel has them, else ``ebpf``: a veth end of the same
  name, MAC and MTU whose frames eBPF programs under tc tag and untag (``netlink.dot1q``: the
  link's egress tags and sends out of the trunk, the trunk's ingress demultiplexes), the same
  frames on the wire.
* route table ``100 + vid``: ``<gw>/32 dev vlan.eth.<vid> scope link`` and ``default via <gw>``
  (gw: the branch subnet's base + 1).
* strict mode: the pod's ``ip/32 dev <host veth> scope link`` goes in table 100 + vid (not in
  main), and two rules at priority 10 send everything arriving from the VLAN link or from the
  pod's veth to that table: every packet of the pod crosses the VPC and its groups, even to
  pods on this node and to the node itself. For that to hold the ``local`` table's rule moves
  from priority 0 to 20 (once per node, in the node's namespace). Packets the node sends to the
  pod leave by its primary interface and come back through the trunk.
* standard mode: the pod's ``ip/32`` is in main with the ordinary rules ``to ip lookup main``
  (512) and ``from ip lookup 100 + vid`` (1536): traffic inside the node stays local, the rest
  leaves by the branch.

Early demux (why Amazon VPC CNI needs ``tcp_early_demux=0`` for kubelet's probes in strict
mode, and what podwire does instead). A connection from the node to a strict pod hairpins: out
of the node's primary interface, through the VPC, in through the trunk. The pod's reply then
enters the node through the host veth *addressed to a local socket* (the prober's). IP early
demux looks that socket up before routing and attaches it to the packet; the priority-10 rule
then routes the packet out of the VLAN link, and ``ip_forward()`` drops every packet that
carries a socket. So the SYN-ACK dies and the probe times out; with early demux off the packet
is routed like any other. podwire keeps early demux on for the node and instead gives each
strict pod a netdev ``ingress`` rule on its host veth that sends packets addressed to one of
the node's own addresses straight out of its VLAN link (``fwd ip to <gw> device vlan.eth.N``,
with neighbour resolution) before the IP stack sees them. They still cross the VPC and the
pod's groups, as strict mode wants, and come back to the node through its primary interface.

All functions here build requests or read replies; ``netlink.veth.Datapath`` sends them.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from typing import Final, Literal

import attrs
from pyroute2.netlink.rtnl import RTM_NEWLINK, RTM_NEWROUTE
from pyroute2.netlink.rtnl.fibmsg import fibmsg

from netlink.dot1q.links import Dot1qLink
from netlink.requests import (
    FR_ACT_TO_TBL,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_LOCAL,
    Link,
    is_route,
    link_msg,
    route_req,
    rule_table,
)
from netlink.rtnl import CREATE, Message, Request

LinkKind = Literal["vlan", "ebpf"]
LINK_KINDS: Final[tuple[LinkKind, ...]] = ("vlan", "ebpf")
# What each kind is, as the kernel names it (IFLA_INFO_KIND).
_KERNEL_KINDS: Final[dict[LinkKind, str]] = {"vlan": "vlan", "ebpf": "veth"}

VLAN_LINK_PREFIX: Final = "vlan.eth."
TABLE_BASE: Final = 100
IIF_RULE_PRIORITY: Final = 10
LOCAL_RULE_PRIORITY: Final = 20  # where the local rule moves from 0 on a strict-mode node
VLAN_IDS: Final = range(1, 4095)

NFT_FAMILY: Final = "netdev"
NFT_TABLE: Final = "podwire_strict"

_VLAN_NAME = re.compile(r"^vlan\.eth\.(\d{1,4})$")


def link_name(vlan: int) -> str:
    """``vlan.eth.<vid>``: fixed, whatever the trunk's own link is called (as VPC CNI)."""
    return f"{VLAN_LINK_PREFIX}{vlan}"


def table_of(vlan: int) -> int:
    """The branch's route table: 100 + its VLAN id."""
    return TABLE_BASE + vlan


def vlan_of_link(name: str) -> int | None:
    """The VLAN id in a ``vlan.eth.<vid>`` name, or None for any other name."""
    m = _VLAN_NAME.match(name)
    if m is None:
        return None
    vid = int(m.group(1))
    return vid if vid in VLAN_IDS else None


@attrs.frozen(kw_only=True)
class BranchLink:
    """How one pod reaches the VPC through its branch ENI."""

    vlan: int = attrs.field()
    trunk_index: int  # ifindex of the trunk ENI's link
    mac: str  # the branch ENI's MAC
    gateway: ipaddress.IPv4Address  # the branch subnet's base + 1
    strict: bool = True
    kind: LinkKind = "vlan"

    @vlan.validator
    def _check_vlan(self, _attr: object, value: int) -> None:
        if value not in VLAN_IDS:
            raise ValueError(f"VLAN id {value} is outside 1..4094")

    @property
    def name(self) -> str:
        return link_name(self.vlan)

    @property
    def table(self) -> int:
        return table_of(self.vlan)

    @property
    def mode(self) -> str:
        return "strict" if self.strict else "standard"


def dot1q_link(b: BranchLink) -> Dot1qLink:
    """The eBPF-backed link of an ``ebpf`` branch (``netlink.dot1q.links``)."""
    return Dot1qLink(name=b.name, vlan_id=b.vlan, mac=b.mac, parent=b.trunk_index)


# --- requests -------------------------------------------------------------------------------


def new_link(b: BranchLink) -> Request:
    """Create the 802.1Q device ``vlan.eth.<vid>`` on the trunk with the branch's MAC, up
    (kind ``vlan``; ``ebpf`` links are ``netlink.dot1q.links.create``'s). No MTU: it inherits
    the trunk's."""
    info = {
        "attrs": [
            ("IFLA_INFO_KIND", "vlan"),
            ("IFLA_INFO_DATA", {"attrs": [("IFLA_VLAN_ID", b.vlan)]}),
        ]
    }
    msg = link_msg(
        ("IFLA_IFNAME", b.name),
        ("IFLA_LINK", b.trunk_index),
        ("IFLA_ADDRESS", b.mac),
        ("IFLA_LINKINFO", info),
        up=True,
    )
    return Request(f"create {b.name}", RTM_NEWLINK, CREATE, msg)


def table_routes(b: BranchLink, index: int, mtype: int, flags: int) -> list[Request]:
    """``<gw>/32 dev vlan.eth.N scope link`` and ``default via <gw>`` in table 100 + N."""
    return [
        route_req(
            f"route {b.gateway}/32 dev {b.name} table {b.table}",
            mtype,
            flags,
            dst=b.gateway,
            oif=index,
            scope=RT_SCOPE_LINK,
            table=b.table,
        ),
        route_req(
            f"default via {b.gateway} dev {b.name} table {b.table}",
            mtype,
            flags,
            dst=None,
            oif=index,
            scope=RT_SCOPE_UNIVERSE,
            gateway=b.gateway,
            table=b.table,
        ),
    ]


def iif_rule(op: str, mtype: int, flags: int, iifname: str, table: int) -> Request:
    """``iif <iifname> lookup <table>`` at priority 10."""
    msg = fibmsg()
    msg["family"] = socket.AF_INET
    msg["table"] = table if table < 256 else 0
    msg["action"] = FR_ACT_TO_TBL
    msg["attrs"] = [
        ("FRA_IIFNAME", iifname),
        ("FRA_PRIORITY", IIF_RULE_PRIORITY),
        ("FRA_TABLE", table),
    ]
    return Request(op, mtype, flags, msg)


def iif_rule_name(iifname: str, table: int) -> str:
    return f"rule iif {iifname} lookup {table} ({IIF_RULE_PRIORITY})"


def iif_rules(b: BranchLink, host_veth: str, mtype: int, flags: int) -> list[Request]:
    """The strict-mode rules: from the VLAN link and from the pod's veth to table 100 + N."""
    return [
        iif_rule(iif_rule_name(name, b.table), mtype, flags, name, b.table)
        for name in (b.name, host_veth)
    ]


def local_rule(mtype: int, flags: int, priority: int) -> Request:
    """``lookup local`` at ``priority``."""
    msg = fibmsg()
    msg["family"] = socket.AF_INET
    msg["table"] = RT_TABLE_LOCAL
    msg["action"] = FR_ACT_TO_TBL
    msg["attrs"] = [("FRA_PRIORITY", priority), ("FRA_TABLE", RT_TABLE_LOCAL)]
    return Request(f"rule lookup local ({priority})", mtype, flags, msg)


# --- replies --------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class IifRule:
    """A rule ``iif <name> lookup <table>`` at priority 10, as dumped."""

    iifname: str
    table: int


def iif_rules_of(messages: Iterable[Message]) -> list[IifRule]:
    """The plain ``iif X lookup T`` rules at priority 10 among dumped rule messages."""
    out = []
    for m in messages:
        if (m.get_attr("FRA_PRIORITY") or 0) != IIF_RULE_PRIORITY or m["action"] != FR_ACT_TO_TBL:
            continue
        name = m.get_attr("FRA_IIFNAME")
        if not name or m["src_len"] or m["dst_len"] or m.get_attr("FRA_FWMARK"):
            continue
        out.append(IifRule(iifname=name, table=rule_table(m)))
    return out


@attrs.frozen(kw_only=True)
class LocalRules:
    """Where the node's ``lookup local`` rules are."""

    priorities: tuple[int, ...]

    @property
    def moved(self) -> bool:
        """Strict mode's shape: at 20, not at 0."""
        return LOCAL_RULE_PRIORITY in self.priorities and 0 not in self.priorities

    @property
    def original(self) -> bool:
        return 0 in self.priorities and LOCAL_RULE_PRIORITY not in self.priorities


def local_rules_of(messages: Iterable[Message]) -> LocalRules:
    found = []
    for m in messages:
        plain = not (m["src_len"] or m["dst_len"] or m.get_attr("FRA_IIFNAME"))
        if plain and m["action"] == FR_ACT_TO_TBL and rule_table(m) == RT_TABLE_LOCAL:
            found.append(m.get_attr("FRA_PRIORITY") or 0)
    return LocalRules(priorities=tuple(sorted(found)))


def link_problems(b: BranchLink, link: Link | None) -> list[str]:
    """What is wrong with the branch's link as found (None: missing)."""
    if link is None:
        return [f"link {b.name}"]
    problems = []
    want = _KERNEL_KINDS[b.kind]
    if link.kind and link.kind != want:
        problems.append(f"link {b.name} is {link.kind}, not {want}")
    # An ebpf link's peer is its idle veth end; its tagger names the trunk (netlink.dot1q).
    if b.kind != "ebpf" and link.peer_index != b.trunk_index:
        problems.append(f"link {b.name} not on the trunk (ifindex {b.trunk_index})")
    if link.mac.lower() != b.mac.lower():
        problems.append(f"link {b.name} MAC {link.mac}, not {b.mac}")
    if b.kind == "vlan" and link.vlan_id is not None and link.vlan_id != b.vlan:
        problems.append(f"link {b.name} VLAN id {link.vlan_id}, not {b.vlan}")
    if not link.up:
        problems.append(f"link {b.name} down")
    return problems


def table_problems(b: BranchLink, index: int, routes: Sequence[Message]) -> list[str]:
    """What is missing from table 100 + N (``routes``: its routes through the VLAN link)."""
    problems = []
    if not any(is_route(m, b.gateway, None, RT_SCOPE_LINK) for m in routes):
        problems.append(f"route {b.gateway}/32 dev {b.name} table {b.table}")
    if not any(is_route(m, None, b.gateway, RT_SCOPE_UNIVERSE) for m in routes):
        problems.append(f"default via {b.gateway} dev {b.name} table {b.table}")
    return problems


def is_new_route(msg: Message) -> bool:
    return bool(msg["header"]["type"] == RTM_NEWROUTE)


# --- nftables: past early demux ------------------------------------------------------------


def _chain(host_veth: str) -> str:
    return (
        f"add chain {NFT_FAMILY} {NFT_TABLE} {host_veth} "
        f'{{ type filter hook ingress device "{host_veth}" priority 0; policy accept; }}'
    )


def local_fwd_rule(b: BranchLink) -> str:
    """The rule text, as ``nft list`` prints it."""
    return f'meta protocol ip fib daddr type local fwd ip to {b.gateway} device "{b.name}"'


def render_local_fwd(host_veth: str, b: BranchLink) -> str:
    """One transaction: the pod veth's ingress chain, holding only the rule that sends packets
    for the node's own addresses out of the branch's VLAN link (see the module docstring)."""
    t = f"{NFT_FAMILY} {NFT_TABLE}"
    return (
        f"add table {t}\n{_chain(host_veth)}\nflush chain {t} {host_veth}\n"
        f'add rule {t} {host_veth} {local_fwd_rule(b)} comment "podwire: strict pod to the '
        f'node crosses the VPC"\n'
    )


def render_local_fwd_removal(host_veths: Iterable[str]) -> str:
    """One transaction deleting the chains of ``host_veths``; fine when they are gone already
    (a chain is added first: netdev chains may name a device that does not exist)."""
    t = f"{NFT_FAMILY} {NFT_TABLE}"
    out = [f"add table {t}"]
    for name in host_veths:
        out += [_chain(name), f"delete chain {t} {name}"]
    return "\n".join(out) + "\n"


def chains_of(listing: dict[str, object] | None) -> dict[str, str]:
    """Our chains in ``nft -j list table netdev podwire_strict``: chain -> its rule text
    (rules joined), for checks and GC."""
    if not listing:
        return {}
    chains: dict[str, list[str]] = {}
    items = listing.get("nftables", [])
    assert isinstance(items, list)
    for item in items:
        if not isinstance(item, dict):
            continue
        if "chain" in item:
            chains.setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            rule = item["rule"]
            chains.setdefault(rule["chain"], []).append(_rule_text(rule.get("expr", [])))
    return {name: "; ".join(rules) for name, rules in chains.items()}


def _rule_text(exprs: list[dict[str, object]]) -> str:
    """Enough of a rule's JSON to recognise ours: the fwd target and its device."""
    for e in exprs:
        fwd = e.get("fwd") if isinstance(e, dict) else None
        if isinstance(fwd, dict):
            return f"fwd ip to {fwd.get('addr')} device {fwd.get('dev')}"
    return "other"


def expected_fwd(b: BranchLink) -> str:
    return f"fwd ip to {b.gateway} device {b.name}"
