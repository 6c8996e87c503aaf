"""The VPC router's security-group rule set as nftables: pure functions of a ``Policy``.

Theory of operation. Security groups are allow-only and stateful, judged where the ENI meets
the VPC; in the router that is the interface a packet comes in by (the sender's port) and the
one it leaves by (the receiver's). Two base chains on the forward hook, in table ``ip
podwire_vpc``, do it:

* ``egress`` (priority filter): established and related packets pass; anything else jumps,
  through the verdict map ``out_by_if`` keyed by the input interface, to the sender ENI's chain
  ``e_<eni>_out``, which jumps to each of its groups' ``g_<group>_out`` chains and ends in a
  drop counted by the named counter ``<eni>_out``. A group rule that matches accepts, which
  ends this base chain only, so the packet goes on to
* ``ingress`` (priority filter + 10): the same for the receiver, keyed by the output interface,
  through ``in_by_if`` to ``e_<eni>_in`` and the ``g_<group>_in`` chains, counter ``<eni>_in``.

A packet to or from the internet namespace, or the router itself (IMDS, the gateways), has no
ENI on that side and is judged on the other side only. Referenced groups are interval sets
``m_<group>`` of the current addresses of every ENI holding the group. Drops are silent (no
reject), so a client times out as on EC2. Because replies pass as ``established``, a reply no
rule allows still arrives, and changing a rule never touches a tracked flow.

A trunk's cable gets a netdev ingress chain (table ``netdev podwire_vpc_frames``): the VLAN
demultiplexer (``dot1q``) takes its branches' tagged frames off the cable before netfilter sees
them, so whatever is still tagged there (an unassociated VLAN id, or a branch's id with another
MAC), or untagged from a MAC that is not the trunk's, is dropped and counted in
``<trunk>_frames``.

``ruleset`` computes the kernel objects wanted; ``render_full`` writes them as one idempotent
script (add, delete, define: the tables are replaced whole), ``render_delta`` as the changes from
one rule set to the next: new objects first, set elements and map entries changed in place,
chains flushed and refilled, what is gone removed last, so one ENI's change at a thousand ENIs
is a few lines and every counter of an ENI that stays keeps counting.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Network, collapse_addresses

import attrs

from cloud.emulator.firewall.model import ALL, Policy, Rule

TABLE = "podwire_vpc"
FRAMES_TABLE = "podwire_vpc_frames"
OUT_MAP = "out_by_if"
IN_MAP = "in_by_if"
DIRECTIONS = ("in", "out")
COUNTER_KINDS = ("in", "out", "frames")


def group_chain(group_id: str, direction: str) -> str:
    return f"g_{group_id}_{direction}"


def eni_chain(eni_id: str, direction: str) -> str:
    return f"e_{eni_id}_{direction}"


def counter_name(eni_id: str, kind: str) -> str:
    return f"{eni_id}_{kind}"


def member_set(group_id: str) -> str:
    return f"m_{group_id}"


def trunk_chain(eni_id: str) -> str:
    return f"t_{eni_id}"


@attrs.frozen(kw_only=True)
class NetdevChain:
    """A netdev ingress base chain bound to one device."""

    device: str
    rules: tuple[str, ...]


@attrs.frozen(kw_only=True)
class Ruleset:
    """The kernel objects a policy calls for (names as in the module docstring)."""

    counters: frozenset[str] = frozenset()
    sets: Mapping[str, frozenset[IPv4Network]] = attrs.field(factory=dict)
    chains: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    out_map: Mapping[str, str] = attrs.field(factory=dict)  # input interface -> ENI chain
    in_map: Mapping[str, str] = attrs.field(factory=dict)  # output interface -> ENI chain
    frame_counters: frozenset[str] = frozenset()
    frame_chains: Mapping[str, NetdevChain] = attrs.field(factory=dict)

    def __repr__(self) -> str:
        rules = sum(len(r) for r in self.chains.values())
        return (
            f"Ruleset(ports={len(self.out_map)}, chains={len(self.chains)}, rules={rules}, "
            f"sets={len(self.sets)}, trunks={len(self.frame_chains)})"
        )


def rule_line(rule: Rule, direction: str) -> str | None:
    """The nft rule for one group rule (``accept`` when it matches), or None when it can never
    match an IPv4 packet (an IPv6 peer or ICMPv6, a prefix list)."""
    addr = "saddr" if direction == "in" else "daddr"
    parts = []
    if rule.group is not None:
        parts.append(f"ip {addr} @{member_set(rule.group)}")
    elif rule.cidr is not None:
        if rule.cidr.prefixlen:
            parts.append(f"ip {addr} {rule.cidr}")
    else:
        return None
    protocol = rule.protocol
    if protocol in ("tcp", "udp"):
        if (rule.low, rule.high) == (0, 65535):
            parts.append(f"meta l4proto {protocol}")
        elif rule.low == rule.high:
            parts.append(f"{protocol} dport {rule.low}")
        else:
            parts.append(f"{protocol} dport {rule.low}-{rule.high}")
    elif protocol == "icmp":
        if rule.low == -1:
            parts.append("meta l4proto icmp")
        elif rule.high == -1:
            parts.append(f"icmp type {rule.low}")
        else:
            parts.append(f"icmp type {rule.low} icmp code {rule.high}")
    elif protocol == "icmpv6":
        return None
    elif protocol != ALL:
        parts.append(f"meta l4proto {int(protocol)}")
    parts.append("accept")
    return " ".join(parts)


@functools.lru_cache(maxsize=8192)
def _group_lines(rules: tuple[Rule, ...], direction: str) -> tuple[tuple[str, ...], frozenset[str]]:
    # Memoised by value: every API call rebuilds the policy, and most groups did not change.
    lines = []
    refs = set()
    for rule in rules:
        line = rule_line(rule, direction)
        if line is not None:
            lines.append(line)
            if rule.group is not None:
                refs.add(rule.group)
    return tuple(dict.fromkeys(lines)), frozenset(refs)


def _disjoint(nets: list[IPv4Network]) -> frozenset[IPv4Network]:
    """The networks as interval-set elements: as they are when none overlaps (the allocator
    sees to that), merged when some do (an interval set refuses overlapping elements)."""
    found = frozenset(nets)
    if all(n.prefixlen == 32 for n in found):
        return found
    spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in found)
    if all(a[1] < b[0] for a, b in itertools.pairwise(spans)):
        return found
    return frozenset(collapse_addresses(found))


def ruleset(policy: Policy) -> Ruleset:
    """Return the kernel objects ``policy`` calls for."""
    chains: dict[str, tuple[str, ...]] = {}
    out_map: dict[str, str] = {}
    in_map: dict[str, str] = {}
    counters: set[str] = set()
    used_groups: set[str] = set()
    for port in sorted(policy.ports, key=lambda p: p.ifname):
        eni = policy.enis.get(port.eni_id)
        groups = [g for g in eni.groups if g in policy.groups] if eni is not None else []
        used_groups.update(groups)
        for direction in DIRECTIONS:
            name = counter_name(port.eni_id, direction)
            counters.add(name)
            chains[eni_chain(port.eni_id, direction)] = (
                *(f"jump {group_chain(g, direction)}" for g in dict.fromkeys(groups)),
                f'counter name "{name}" drop',
            )
        out_map[port.ifname] = eni_chain(port.eni_id, "out")
        in_map[port.ifname] = eni_chain(port.eni_id, "in")

    referenced: set[str] = set()
    for group_id in sorted(used_groups):
        group = policy.groups[group_id]
        for direction, rules in (("in", group.inbound), ("out", group.outbound)):
            lines, refs = _group_lines(rules, direction)
            chains[group_chain(group_id, direction)] = lines
            referenced |= refs

    holders: dict[str, list[IPv4Network]] = {g: [] for g in referenced}
    for eni in policy.enis.values():
        for group_id in eni.groups:
            if group_id in holders:
                holders[group_id].extend(eni.addresses)
    sets = {member_set(g): _disjoint(nets) for g, nets in holders.items()}

    frame_counters: set[str] = set()
    frame_chains: dict[str, NetdevChain] = {}
    for trunk in sorted(policy.trunks, key=lambda t: t.eni_id):
        name = counter_name(trunk.eni_id, "frames")
        frame_counters.add(name)
        frame_chains[trunk_chain(trunk.eni_id)] = NetdevChain(
            device=trunk.ifname,
            rules=(
                f'ether type 8021q counter name "{name}" drop',
                f'ether saddr != {trunk.mac} counter name "{name}" drop',
            ),
        )
    return Ruleset(
        counters=frozenset(counters),
        sets=sets,
        chains=chains,
        out_map=out_map,
        in_map=in_map,
        frame_counters=frozenset(frame_counters),
        frame_chains=frame_chains,
    )


def _elements(nets: Iterable[IPv4Network]) -> str:
    return ", ".join(str(n) for n in sorted(nets))


def _verdicts(mapping: Mapping[str, str], keys: Iterable[str]) -> str:
    return ", ".join(f'"{k}" : jump {mapping[k]}' for k in sorted(keys))


_BASE_CHAINS = f"""\
	chain egress {{
		type filter hook forward priority filter; policy accept;
		ct state established,related accept
		iifname vmap @{OUT_MAP}
	}}
	chain ingress {{
		type filter hook forward priority filter + 10; policy accept;
		ct state established,related accept
		oifname vmap @{IN_MAP}
	}}
"""


def _netdev_hook(chain: NetdevChain) -> str:
    return f'type filter hook ingress device "{chain.device}" priority filter; policy accept;'


def render_full(rs: Ruleset) -> str:
    """Return one script that replaces both tables with exactly ``rs`` (counters start at 0)."""
    out = [
        f"add table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
    ]
    out += [f"\tcounter {c} {{\n\t}}" for c in sorted(rs.counters)]
    for name in sorted(rs.sets):
        out.append(f"\tset {name} {{\n\t\ttype ipv4_addr\n\t\tflags interval")
        if rs.sets[name]:
            out.append(f"\t\telements = {{ {_elements(rs.sets[name])} }}")
        out.append("\t}")
    for name in sorted(rs.chains):
        out.append(f"\tchain {name} {{")
        out += [f"\t\t{line}" for line in rs.chains[name]]
        out.append("\t}")
    for name, mapping in ((OUT_MAP, rs.out_map), (IN_MAP, rs.in_map)):
        out.append(f"\tmap {name} {{\n\t\ttype ifname : verdict")
        if mapping:
            out.append(f"\t\telements = {{ {_verdicts(mapping, mapping)} }}")
        out.append("\t}")
    out.append(_BASE_CHAINS.rstrip("\n"))
    out.append("}")
    out += [
        f"add table netdev {FRAMES_TABLE}",
        f"delete table netdev {FRAMES_TABLE}",
        f"table netdev {FRAMES_TABLE} {{",
    ]
    out += [f"\tcounter {c} {{\n\t}}" for c in sorted(rs.frame_counters)]
    for name in sorted(rs.frame_chains):
        chain = rs.frame_chains[name]
        out.append(f"\tchain {name} {{\n\t\t{_netdev_hook(chain)}")
        out += [f"\t\t{line}" for line in chain.rules]
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"


def render_delta(old: Ruleset, new: Ruleset) -> str:
    """Return the script that turns the kernel's ``old`` rule set into ``new`` in place
    (empty when nothing changed). Netdev chains that are gone are not in it: see
    ``render_removed_frame_chains``."""
    t, f = f"ip {TABLE}", f"netdev {FRAMES_TABLE}"
    out: list[str] = []
    out += [f"add counter {t} {c}" for c in sorted(new.counters - old.counters)]
    out += [f"add counter {f} {c}" for c in sorted(new.frame_counters - old.frame_counters)]
    for name in sorted(new.sets.keys() - old.sets.keys()):
        out.append(f"add set {t} {name} {{ type ipv4_addr; flags interval; }}")
    for name in sorted(new.sets):
        before, after = old.sets.get(name, frozenset()), new.sets[name]
        if before - after:
            out.append(f"delete element {t} {name} {{ {_elements(before - after)} }}")
        if after - before:
            out.append(f"add element {t} {name} {{ {_elements(after - before)} }}")
    added = sorted(new.chains.keys() - old.chains.keys())
    out += [f"add chain {t} {name}" for name in added]
    for name in sorted(new.chains):
        if name in old.chains and old.chains[name] == new.chains[name]:
            continue
        if name in old.chains:
            out.append(f"flush chain {t} {name}")
        out += [f"add rule {t} {name} {line}" for line in new.chains[name]]
    for name, before_map, after_map in (
        (OUT_MAP, old.out_map, new.out_map),
        (IN_MAP, old.in_map, new.in_map),
    ):
        gone = [k for k in before_map if after_map.get(k) != before_map[k]]
        if gone:
            keys = ", ".join(f'"{k}"' for k in sorted(gone))
            out.append(f"delete element {t} {name} {{ {keys} }}")
        fresh = [k for k in after_map if before_map.get(k) != after_map[k]]
        if fresh:
            out.append(f"add element {t} {name} {{ {_verdicts(after_map, fresh)} }}")
    for name in sorted(new.frame_chains):
        chain = new.frame_chains[name]
        was = old.frame_chains.get(name)
        if was == chain:
            continue
        if was is None or was.device != chain.device:
            if was is not None:
                out.append(f"delete chain {f} {name}")
            out.append(f"add chain {f} {name} {{ {_netdev_hook(chain)} }}")
        else:
            out.append(f"flush chain {f} {name}")
        out += [f"add rule {f} {name} {line}" for line in chain.rules]
    removed = sorted(old.chains.keys() - new.chains.keys())
    # Flush every chain that goes before deleting any: one may still jump to another.
    out += [f"flush chain {t} {name}" for name in removed]
    out += [f"delete chain {t} {name}" for name in removed]
    out += [f"delete set {t} {name}" for name in sorted(old.sets.keys() - new.sets.keys())]
    out += [f"delete counter {t} {c}" for c in sorted(old.counters - new.counters)]
    return "\n".join(out) + "\n" if out else ""


def render_removed_frame_chains(old: Ruleset, new: Ruleset) -> list[str]:
    """One command per netdev chain (and its counter) that is gone, to run apart: on kernels
    before 6.16 a netdev base chain disappears with its device, so "already gone" must not fail
    the rest."""
    f = f"netdev {FRAMES_TABLE}"
    out = [
        f"delete chain {f} {name}"
        for name in sorted(old.frame_chains.keys() - new.frame_chains.keys())
    ]
    out += [f"delete counter {f} {c}" for c in sorted(old.frame_counters - new.frame_counters)]
    return out


_COUNTER = re.compile(r"counter\s+(\S+)\s*\{\s*packets\s+(\d+)\s+bytes\s+(\d+)", re.S)


def parse_counters(listing: str) -> dict[str, int]:
    """Packets per named counter in the text of ``nft list counters ...``."""
    return {m.group(1): int(m.group(2)) for m in _COUNTER.finditer(listing)}


def drops_by_eni(packets: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Group counter values by ENI: ``{eni_id: {"in": n, "out": n, "frames": n}}``."""
    found: dict[str, dict[str, int]] = {}
    for name, value in packets.items():
        eni_id, _, kind = name.rpartition("_")
        if eni_id and kind in COUNTER_KINDS:
            found.setdefault(eni_id, dict.fromkeys(COUNTER_KINDS, 0))[kind] = value
    return found
