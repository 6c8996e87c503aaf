"""Egress SNAT and connmark state as a pure function: desired state in, rulesets out. No I/O.

Theory of operation (mirrors Amazon VPC CNI's ``AWS-SNAT-CHAIN-*`` / ``AWS-CONNMARK-CHAIN-0``
and its ``mangle PREROUTING`` rules; see REFERENCE.md "SNAT"):

* SNAT (nat postrouting, priority ``srcnat + 10`` so kube-proxy's ``KUBE-POSTROUTING``
  masquerade at ``srcnat`` decides first; a connection is NATed once, by the first chain that
  NATs it). A packet from a pod (``ip saddr @pod_cidrs``) to a destination outside the VPC and
  the excluded CIDRs, not leaving through a VLAN link (branch ENIs have their own address), and
  not to a local address is SNATed to the node's primary IP with ``fully-random`` (VPC CNI
  ``prng``), ``random`` (``hashrandom``) or no flag (``none``). VPC CNI matches any source;
  podwire narrows it to its own pods, so host traffic is left alone. External SNAT: no SNAT
  rule and no pod connmark rule (VPC CNI drops both), the NodePort rules stay.
* Connmark (filter prerouting at ``mangle`` priority, after conntrack at -200). Pods whose IP
  lives on a secondary ENI route by ``from <pod> lookup <eni table>`` (prio 1536); the ip rule
  ``fwmark 0x80/0x80 lookup main`` (prio 1024, installed by netlink, not here) overrides that
  for packets carrying the mark, so they leave by eth0 where their SNAT address lives:

  1. ``iif primary_iface`` and the destination is an address of that interface (NodePort,
     VPC CNI: ``-i eth0 -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK
     --set-xmark 0x80/0x80``): ``ct mark |= 0x80``, every packet, as VPC CNI's mangle rule;
  2. ``iif pod veth``, first packet of a connection (VPC CNI does it in the nat table, which
     sees only the first packet), destination not in the VPC or excluded CIDRs and not local:
     ``ct mark |= 0x80``;
  3. ``iif pod veth``: restore the connmark bit into the packet mark (VPC CNI: ``-i eni+ -j
     CONNMARK --restore-mark --mask 0x80``), so replies to NodePort clients and the pod's own
     egress follow rule 1024. Only the bit is set, other mark bits are left alone; a packet
     arriving from a veth never carries the bit (crossing namespaces scrubs skb->mark), so
     "restore" never needs to clear it.

* nftables: everything lives in one table of ours, ``table ip podwire``, replaced whole in one
  transaction (``add table; delete table; table ip podwire {...}``: atomic for packets, never
  touches other tables, and also removes chains or sets someone else added to ours, which
  ``flush table`` would keep). Pod, VPC and excluded CIDRs are interval sets, so pods coming
  and going are set-element deltas, not rule rewrites (``diff_sets`` / ``render_nft_delta``).
  CIDRs are kept collapsed and sorted (``SnatSpec`` canonicalises them), so the kernel holds
  exactly the elements the deltas name.
* iptables (``iptables-restore --noflush``): chains of our own (``PODWIRE-SNAT`` in nat,
  ``PODWIRE-CONNMARK`` and ``PODWIRE-CONNMARK-POD`` in mangle), one jump each from
  POSTROUTING / PREROUTING. Declaring a chain in a restore flushes it; jump rules in the
  built-in chains are reconciled from what ``iptables-save`` shows (``parse_iptables_save``),
  so a re-apply leaves exactly one jump. Without sets, every pod CIDR is one SNAT rule.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Final, Literal

import attrs
import orjson

Mode = Literal["random-fully", "hashrandom", "none"]
SetName = Literal["vpc_cidrs", "excluded_cidrs", "pod_cidrs"]
UpdatePlan = Literal["full", "delta", "unchanged"]

MODES: Final[tuple[Mode, ...]] = ("random-fully", "hashrandom", "none")
SET_NAMES: Final[tuple[SetName, ...]] = ("vpc_cidrs", "excluded_cidrs", "pod_cidrs")

NFT_FAMILY: Final = "ip"
NFT_TABLE: Final = "podwire"
NFT_CONNMARK_CHAIN: Final = "prerouting"
NFT_SNAT_CHAIN: Final = "postrouting"
# Priorities as nft writes them and as the kernel reports them (JSON ``prio``).
NFT_CONNMARK_PRIORITY: Final = ("mangle", -150)
NFT_SNAT_PRIORITY: Final = ("srcnat + 10", 110)

IPT_SNAT_CHAIN: Final = "PODWIRE-SNAT"
IPT_CONNMARK_CHAIN: Final = "PODWIRE-CONNMARK"
IPT_CONNMARK_POD_CHAIN: Final = "PODWIRE-CONNMARK-POD"
IPT_CHAIN_PREFIX: Final = "PODWIRE-"

_VPC_CNI_MODES: Final[Mapping[str, Mode]] = {
    "prng": "random-fully",
    "hashrandom": "hashrandom",
    "none": "none",
}
# Interface names end up inside nft strings and iptables arguments: keep them boring.
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SnatError(Exception):
    """Base of the errors of the SNAT state core."""


class InvalidSnatSpec(SnatError, ValueError):
    """A field of ``SnatSpec`` has a value podwire cannot render."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"{field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class UnreadableListing(SnatError):
    """A ruleset listing (nft JSON or iptables-save) has a shape this module does not know."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def mode_from_vpc_cni(value: str) -> Mode:
    """Map AWS_VPC_K8S_CNI_RANDOMIZESNAT (``prng``, ``hashrandom``, ``none``) to a ``Mode``.

    Raises InvalidSnatSpec for anything else.
    """
    try:
        return _VPC_CNI_MODES[value.strip().lower()]
    except KeyError:
        raise InvalidSnatSpec(
            "AWS_VPC_K8S_CNI_RANDOMIZESNAT", value, "expected prng, hashrandom or none"
        ) from None


def canonical_cidrs(value: Iterable[IPv4Network | str]) -> tuple[IPv4Network, ...]:
    """Return the networks collapsed (overlaps and neighbours merged) and sorted.

    Raises InvalidSnatSpec for a string that is not an IPv4 network (host bits set included).
    """
    nets: list[IPv4Network] = []
    for item in value:
        if isinstance(item, IPv4Network):
            nets.append(item)
            continue
        try:
            nets.append(IPv4Network(item))
        except (ValueError, TypeError) as e:
            raise InvalidSnatSpec("cidr", item, str(e)) from None
    return tuple(sorted(ipaddress.collapse_addresses(nets)))


def _to_address(value: IPv4Address | str) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    try:
        return IPv4Address(value)
    except (ValueError, TypeError) as e:
        raise InvalidSnatSpec("node_ip", value, str(e)) from None


def _check_mode(_inst: object, attr: attrs.Attribute[Mode], value: Mode) -> None:
    if value not in MODES:
        raise InvalidSnatSpec(attr.name, value, f"expected one of {', '.join(MODES)}")


def _check_ifname(max_len: int) -> Any:
    def check(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str) or not _IFNAME.match(value) or len(value) > max_len:
            raise InvalidSnatSpec(
                attr.name, value, f"expected 1-{max_len} characters of [A-Za-z0-9_.-]"
            )

    return check


def _check_connmark(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    # One bit: the ip rule matches fwmark MARK/MARK and "restore" is a single-bit set.
    if not isinstance(value, int) or value <= 0 or value > 0xFFFFFFFF or value & (value - 1):
        raise InvalidSnatSpec(attr.name, value, "expected a single bit of a 32-bit mark")


def _check_node_ip(_inst: object, attr: attrs.Attribute[IPv4Address], value: IPv4Address) -> None:
    if value.is_unspecified or value.is_multicast or value.is_loopback:
        raise InvalidSnatSpec(attr.name, value, "expected a unicast address")


@attrs.frozen(kw_only=True)
class SnatSpec:
    """The node's desired SNAT and connmark state.

    CIDR fields accept networks or strings and are stored collapsed and sorted, so two specs
    that mean the same compare equal and the kernel's set elements are exactly these.
    """

    pod_cidrs: tuple[IPv4Network, ...] = attrs.field(converter=canonical_cidrs)
    vpc_cidrs: tuple[IPv4Network, ...] = attrs.field(converter=canonical_cidrs)
    excluded_cidrs: tuple[IPv4Network, ...] = attrs.field(converter=canonical_cidrs, default=())
    node_ip: IPv4Address = attrs.field(converter=_to_address, validator=_check_node_ip)
    mode: Mode = attrs.field(default="random-fully", validator=_check_mode)
    external_snat: bool = False
    pod_iface_prefix: str = attrs.field(default="pwv", validator=_check_ifname(14))
    primary_iface: str = attrs.field(default="eth0", validator=_check_ifname(15))
    connmark: int = attrs.field(default=0x80, validator=_check_connmark)

    def cidrs(self, name: SetName) -> tuple[IPv4Network, ...]:
        """Return the contents of the set ``name``."""
        return {
            "vpc_cidrs": self.vpc_cidrs,
            "excluded_cidrs": self.excluded_cidrs,
            "pod_cidrs": self.pod_cidrs,
        }[name]

    def __repr__(self) -> str:
        return (
            f"SnatSpec(pods={len(self.pod_cidrs)}, vpc={len(self.vpc_cidrs)}, "
            f"excluded={len(self.excluded_cidrs)}, node_ip={self.node_ip}, mode={self.mode}, "
            f"external_snat={self.external_snat})"
        )


# --- deltas -----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SetDelta:
    """Elements to delete from and add to one of our sets."""

    set_name: SetName
    add: tuple[IPv4Network, ...] = ()
    delete: tuple[IPv4Network, ...] = ()


def needs_full_apply(old: SnatSpec, new: SnatSpec) -> bool:
    """True when anything other than set contents differs (rules must be rewritten)."""

    def rules_only(spec: SnatSpec) -> SnatSpec:
        return attrs.evolve(spec, pod_cidrs=(), vpc_cidrs=(), excluded_cidrs=())

    return rules_only(old) != rules_only(new)


def plan_update(old: SnatSpec | None, new: SnatSpec) -> UpdatePlan:
    """What moving from ``old`` (None: unknown) to ``new`` takes: a full apply, set-element
    deltas only, or nothing."""
    if old is None or needs_full_apply(old, new):
        return "full"
    return "delta" if old != new else "unchanged"


def diff_sets(old: SnatSpec, new: SnatSpec) -> list[SetDelta]:
    """Return the element changes turning ``old``'s sets into ``new``'s, one per changed set.

    Both specs hold collapsed CIDRs, so a delete always names an element the kernel holds.
    """
    deltas: list[SetDelta] = []
    for name in SET_NAMES:
        before, after = set(old.cidrs(name)), set(new.cidrs(name))
        if before == after:
            continue
        deltas.append(
            SetDelta(
                set_name=name,
                add=tuple(sorted(after - before)),
                delete=tuple(sorted(before - after)),
            )
        )
    return deltas


# --- nftables script --------------------------------------------------------------------------


def _ct_mark_rules(spec: SnatSpec) -> list[tuple[str, str]]:
    """(rule text, comment) of the connmark chain, in order."""
    mark = f"{spec.connmark:#x}"
    pods = f'iifname "{spec.pod_iface_prefix}*"'
    rules = [
        (
            f'iifname "{spec.primary_iface}" fib daddr . iif type local '
            f"ct mark set ct mark | {mark}",
            "podwire: mark connections to the node (NodePort)",
        )
    ]
    if not spec.external_snat:
        rules.append(
            (
                f"{pods} ct state new ip daddr != @vpc_cidrs ip daddr != @excluded_cidrs "
                f"fib daddr type != local ct mark set ct mark | {mark}",
                "podwire: mark pod connections leaving the VPC",
            )
        )
    rules.append(
        (
            f"{pods} ct mark & {mark} == {mark} meta mark set meta mark | {mark}",
            "podwire: restore the connmark bit for pod packets",
        )
    )
    return rules


_SNAT_FLAGS: Final[Mapping[Mode, str]] = {
    "random-fully": " fully-random",
    "hashrandom": " random",
    "none": "",
}


def _snat_rules(spec: SnatSpec) -> list[tuple[str, str]]:
    if spec.external_snat:
        return []
    return [
        (
            "ip saddr @pod_cidrs ip daddr != @vpc_cidrs ip daddr != @excluded_cidrs "
            'oifname != "vlan*" fib daddr type != local '
            f"snat to {spec.node_ip}{_SNAT_FLAGS[spec.mode]}",
            "podwire: SNAT pod traffic leaving the VPC",
        )
    ]


def _elements(nets: Sequence[IPv4Network], indent: str) -> str:
    inner = f",\n{indent}\t".join(str(n) for n in nets)
    return f"{{\n{indent}\t{inner}\n{indent}}}"


def _our_chains(spec: SnatSpec) -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    """(name, type, priority, rules) of our base chains; both always exist (see render_nft)."""
    return [
        (NFT_CONNMARK_CHAIN, "filter", NFT_CONNMARK_PRIORITY[0], _ct_mark_rules(spec)),
        (NFT_SNAT_CHAIN, "nat", NFT_SNAT_PRIORITY[0], _snat_rules(spec)),
    ]


def _add_chain(table: str, name: str, kind: str, prio: str) -> str:
    # our chains are named after their hooks
    return f"add chain {table} {name} {{ type {kind} hook {name} priority {prio}; policy accept; }}"


def render_nft(spec: SnatSpec, present: NftTableState | None = None) -> str:
    """Return an nft script that makes ``table ip podwire`` hold ``spec``'s state, in one
    transaction that touches no other table.

    Our base chains are never deleted, only flushed and refilled: unregistering the last nat
    chain makes the kernel drop the NAT bindings of live connections, which then leave with
    the pod's address and are reset — an agent restart or a switch of external SNAT would
    break pods' connections. With external SNAT the nat chain stays, empty. ``present`` (the
    live table, when known) lets the script delete what someone else added to our table and
    re-create a chain or set whose definition differs.
    """
    t = f"{NFT_FAMILY} {NFT_TABLE}"
    chains = _our_chains(spec)
    want = expected_nft_state(spec)
    out = ["# podwire SNAT state: generated, applied as one transaction", f"add table {t}"]
    for name, kind, prio, _ in chains:
        out += [_add_chain(t, name, kind, prio), f"flush chain {t} {name}"]
    if present is not None:
        keep_chains = {c.name: c for c in want.chains}
        for c in present.chains:
            if keep_chains.get(c.name) != c:
                out.append(f"delete chain {t} {c.name}")
                if c.name in keep_chains:
                    name, kind, prio, _ = next(x for x in chains if x[0] == c.name)
                    out.append(_add_chain(t, name, kind, prio))
        keep_sets = {(s.name, s.type, s.flags) for s in want.sets}
        for st in present.sets:
            if (st.name, st.type, st.flags) not in keep_sets:
                out.append(f"delete set {t} {st.name}")
    for name in SET_NAMES:
        out += [
            f"add set {t} {name} {{ type ipv4_addr; flags interval; }}",
            f"flush set {t} {name}",
        ]
        nets = spec.cidrs(name)
        if nets:
            out.append(f"add element {t} {name} {{ {', '.join(map(str, nets))} }}")
    for name, _, _, rules in chains:
        out += [f'add rule {t} {name} {text} comment "{comment}"' for text, comment in rules]
    return "\n".join(out) + "\n"


def render_nft_delta(deltas: Iterable[SetDelta]) -> str:
    """Return an nft script applying ``deltas`` in one transaction (deletes first, so a merged
    interval can be replaced by its parts). Empty when there is nothing to do.

    Deleting an element the kernel lacks, or adding one that overlaps, fails the whole
    transaction: the caller then falls back to a full apply.
    """
    deltas = list(deltas)
    t = f"{NFT_FAMILY} {NFT_TABLE}"
    out = [
        f"delete element {t} {d.set_name} {{ {', '.join(map(str, d.delete))} }}"
        for d in deltas
        if d.delete
    ]
    out += [
        f"add element {t} {d.set_name} {{ {', '.join(map(str, d.add))} }}" for d in deltas if d.add
    ]
    return "".join(line + "\n" for line in out)


def render_nft_removal() -> str:
    """Return an nft script deleting our table; succeeds when it is already gone."""
    t = f"{NFT_FAMILY} {NFT_TABLE}"
    return f"add table {t}\ndelete table {t}\n"


# --- nftables: the state as the kernel reports it (nft -j list table) --------------------------


@attrs.frozen(kw_only=True)
class NftChain:
    name: str
    type: str
    hook: str
    prio: int
    policy: str


@attrs.frozen(kw_only=True)
class NftRule:
    chain: str
    comment: str | None
    expr: str  # canonical JSON of the rule's expressions (sorted keys)


@attrs.frozen(kw_only=True)
class NftSet:
    name: str
    type: str
    flags: tuple[str, ...]
    elements: tuple[IPv4Network, ...]


@attrs.frozen(kw_only=True)
class NftTableState:
    """``table ip podwire`` as comparable values: chains, rules in order, sets and elements."""

    chains: tuple[NftChain, ...]
    rules: tuple[NftRule, ...]
    sets: tuple[NftSet, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (golden files, diagnostics)."""
        return {
            "chains": [attrs.asdict(c) for c in self.chains],
            "rules": [
                {"chain": r.chain, "comment": r.comment, "expr": orjson.loads(r.expr)}
                for r in self.rules
            ],
            "sets": [
                {
                    "name": s.name,
                    "type": s.type,
                    "flags": list(s.flags),
                    "elements": [str(n) for n in s.elements],
                }
                for s in self.sets
            ],
        }


def _canonical_json(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _m(op: str, left: object, right: object) -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


_IIFNAME: Final = {"meta": {"key": "iifname"}}
_OIFNAME: Final = {"meta": {"key": "oifname"}}
_CT_MARK: Final = {"ct": {"key": "mark"}}
_META_MARK: Final = {"meta": {"key": "mark"}}
_SADDR: Final = {"payload": {"protocol": "ip", "field": "saddr"}}
_DADDR: Final = {"payload": {"protocol": "ip", "field": "daddr"}}
_FIB_DADDR_TYPE: Final = {"fib": {"result": "type", "flags": ["daddr"]}}
_FIB_DADDR_IIF_TYPE: Final = {"fib": {"result": "type", "flags": ["daddr", "iif"]}}
_JSON_SNAT_FLAGS: Final[Mapping[Mode, str | None]] = {
    "random-fully": "fully-random",
    "hashrandom": "random",
    "none": None,
}


def _or_mark(key: Mapping[str, Any], mark: int) -> dict[str, Any]:
    return {"mangle": {"key": key, "value": {"|": [key, mark]}}}


def expected_nft_state(spec: SnatSpec) -> NftTableState:
    """Return the table ``render_nft(spec)`` makes, as ``nft -j list table`` reports it
    (nftables 1.0.x JSON), for ``parse_nft_listing`` to be compared with."""
    mark = spec.connmark
    pods = _m("==", _IIFNAME, f"{spec.pod_iface_prefix}*")
    not_vpc = [_m("!=", _DADDR, "@vpc_cidrs"), _m("!=", _DADDR, "@excluded_cidrs")]
    not_local = _m("!=", _FIB_DADDR_TYPE, "local")
    comments = [c for _, c in _ct_mark_rules(spec)]
    exprs: list[list[dict[str, Any]]] = [
        [
            _m("==", _IIFNAME, spec.primary_iface),
            _m("==", _FIB_DADDR_IIF_TYPE, "local"),
            _or_mark(_CT_MARK, mark),
        ]
    ]
    if not spec.external_snat:
        exprs.append(
            [
                pods,
                _m("in", {"ct": {"key": "state"}}, "new"),
                *not_vpc,
                not_local,
                _or_mark(_CT_MARK, mark),
            ]
        )
    exprs.append([pods, _m("==", {"&": [_CT_MARK, mark]}, mark), _or_mark(_META_MARK, mark)])
    rules = [
        NftRule(chain=NFT_CONNMARK_CHAIN, comment=c, expr=_canonical_json(e))
        for c, e in zip(comments, exprs, strict=True)
    ]
    chains = [
        NftChain(
            name=NFT_CONNMARK_CHAIN,
            type="filter",
            hook="prerouting",
            prio=NFT_CONNMARK_PRIORITY[1],
            policy="accept",
        )
    ]
    chains.append(
        NftChain(
            name=NFT_SNAT_CHAIN,
            type="nat",
            hook="postrouting",
            prio=NFT_SNAT_PRIORITY[1],
            policy="accept",
        )
    )
    if not spec.external_snat:
        snat: dict[str, Any] = {"addr": str(spec.node_ip)}
        flag = _JSON_SNAT_FLAGS[spec.mode]
        if flag is not None:
            snat["flags"] = flag
        expr = [
            _m("==", _SADDR, "@pod_cidrs"),
            *not_vpc,
            _m("!=", _OIFNAME, "vlan*"),
            not_local,
            {"snat": snat},
        ]
        rules.append(
            NftRule(
                chain=NFT_SNAT_CHAIN, comment=_snat_rules(spec)[0][1], expr=_canonical_json(expr)
            )
        )
    sets = [
        NftSet(name=n, type="ipv4_addr", flags=("interval",), elements=spec.cidrs(n))
        for n in SET_NAMES
    ]
    return NftTableState(
        chains=tuple(sorted(chains, key=lambda c: c.name)),
        rules=tuple(rules),
        sets=tuple(sorted(sets, key=lambda s: s.name)),
    )


def _element_networks(elem: object) -> list[IPv4Network]:
    if isinstance(elem, dict) and "elem" in elem:  # element with comment/timeout
        return _element_networks(elem["elem"].get("val"))
    if isinstance(elem, str):
        return [IPv4Network(elem)]
    if isinstance(elem, dict) and "prefix" in elem:
        p = elem["prefix"]
        return [IPv4Network(f"{p['addr']}/{p['len']}")]
    if isinstance(elem, dict) and "range" in elem:
        lo, hi = elem["range"]
        return list(ipaddress.summarize_address_range(IPv4Address(lo), IPv4Address(hi)))
    raise UnreadableListing(f"set element {elem!r}")


def parse_nft_listing(doc: Mapping[str, Any]) -> NftTableState | None:
    """Read ``nft -j list table ip podwire`` output; None when it holds no table of ours.

    Handles and counters are dropped; elements are collapsed like ``SnatSpec``'s. Raises
    UnreadableListing for shapes it does not know.
    """
    try:
        items = doc["nftables"]
        found = False
        chains: list[NftChain] = []
        rules: list[NftRule] = []
        sets: list[NftSet] = []
        for item in items:
            ((kind, body),) = item.items()
            if kind == "metainfo":
                continue
            if body.get("family") != NFT_FAMILY or body.get("table", body.get("name")) != NFT_TABLE:
                continue
            if kind == "table":
                found = True
            elif kind == "chain":
                chains.append(
                    NftChain(
                        name=body["name"],
                        type=body.get("type", ""),
                        hook=body.get("hook", ""),
                        prio=int(body.get("prio", 0)),
                        policy=body.get("policy", ""),
                    )
                )
            elif kind == "rule":
                exprs = [e for e in body["expr"] if "counter" not in e]
                rules.append(
                    NftRule(
                        chain=body["chain"],
                        comment=body.get("comment"),
                        expr=_canonical_json(exprs),
                    )
                )
            elif kind == "set":
                flags = body.get("flags", [])
                nets: list[IPv4Network] = []
                for elem in body.get("elem", []):
                    nets.extend(_element_networks(elem))
                sets.append(
                    NftSet(
                        name=body["name"],
                        type=str(body.get("type")),
                        flags=tuple(sorted([flags] if isinstance(flags, str) else flags)),
                        elements=canonical_cidrs(nets),
                    )
                )
            else:  # maps, flowtables, objects: not ours, but in our table
                chains.append(NftChain(name=f"<{kind}>", type="", hook="", prio=0, policy=""))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UnreadableListing(f"nft JSON listing: {e!r}") from None
    if not found:
        return None
    return NftTableState(
        chains=tuple(sorted(chains, key=lambda c: c.name)),
        rules=tuple(rules),
        sets=tuple(sorted(sets, key=lambda s: s.name)),
    )


# --- iptables ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class IptablesRule:
    """One rule as ``iptables-save`` prints it: ``-A <chain> <spec>`` in ``*<table>``."""

    table: str
    chain: str
    spec: str

    def line(self, op: str = "-A") -> str:
        return f"{op} {self.chain} {self.spec}"


@attrs.frozen(kw_only=True)
class IptablesOwned:
    """What of ours a ruleset holds: jumps from built-in chains, our chains, their rules."""

    jumps: tuple[IptablesRule, ...] = ()
    chains: tuple[tuple[str, str], ...] = ()  # (table, chain), sorted
    rules: tuple[IptablesRule, ...] = ()  # rules in our chains, in order

    @classmethod
    def of(
        cls,
        jumps: Iterable[IptablesRule],
        chains: Iterable[tuple[str, str]],
        rules: Iterable[IptablesRule],
    ) -> IptablesOwned:
        """Build one in a canonical order (iptables-save orders tables its own way): jumps and
        chains sorted, rules grouped by table and chain keeping their order within a chain."""
        return cls(
            jumps=tuple(sorted(jumps, key=lambda r: (r.table, r.chain, r.spec))),
            chains=tuple(sorted(chains)),
            rules=tuple(sorted(rules, key=lambda r: (r.table, r.chain))),
        )


_IPT_TABLES: Final = ("nat", "mangle")


def _ipt_jumps() -> tuple[IptablesRule, ...]:
    return (
        IptablesRule(
            table="nat",
            chain="POSTROUTING",
            spec=f'-m comment --comment "podwire SNAT" -j {IPT_SNAT_CHAIN}',
        ),
        IptablesRule(
            table="mangle",
            chain="PREROUTING",
            spec=f'-m comment --comment "podwire connmark" -j {IPT_CONNMARK_CHAIN}',
        ),
    )


def _ipt_chains() -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted(
            [
                ("mangle", IPT_CONNMARK_CHAIN),
                ("mangle", IPT_CONNMARK_POD_CHAIN),
                ("nat", IPT_SNAT_CHAIN),
            ]
        )
    )


def expected_iptables(spec: SnatSpec) -> IptablesOwned:
    """Return our rules for ``spec`` exactly as ``iptables-save`` prints them."""
    mark = f"{spec.connmark:#x}"
    pods = f"-i {spec.pod_iface_prefix}+"
    rules: list[IptablesRule] = []

    def add(table: str, chain: str, text: str) -> None:
        rules.append(IptablesRule(table=table, chain=chain, spec=text))

    exempt = [*spec.vpc_cidrs, *spec.excluded_cidrs]
    if not spec.external_snat:
        for net in exempt:
            add("nat", IPT_SNAT_CHAIN, f"-d {net} -j RETURN")
        add("nat", IPT_SNAT_CHAIN, "-o vlan+ -j RETURN")
        add("nat", IPT_SNAT_CHAIN, "-m addrtype --dst-type LOCAL -j RETURN")
        flag = {"random-fully": " --random-fully", "hashrandom": " --random", "none": ""}
        for net in spec.pod_cidrs:
            add(
                "nat",
                IPT_SNAT_CHAIN,
                f"-s {net} -j SNAT --to-source {spec.node_ip}{flag[spec.mode]}",
            )
    add(
        "mangle",
        IPT_CONNMARK_CHAIN,
        f"-i {spec.primary_iface} -m addrtype --dst-type LOCAL --limit-iface-in "
        f"-j CONNMARK --set-xmark {mark}/{mark}",
    )
    if not spec.external_snat:
        add(
            "mangle",
            IPT_CONNMARK_CHAIN,
            f"{pods} -m conntrack --ctstate NEW -m addrtype ! --dst-type LOCAL "
            f"-j {IPT_CONNMARK_POD_CHAIN}",
        )
    add(
        "mangle",
        IPT_CONNMARK_CHAIN,
        f"{pods} -j CONNMARK --restore-mark --nfmask {mark} --ctmask {mark}",
    )
    if not spec.external_snat:
        for net in exempt:
            add("mangle", IPT_CONNMARK_POD_CHAIN, f"-d {net} -j RETURN")
        add("mangle", IPT_CONNMARK_POD_CHAIN, f"-j CONNMARK --set-xmark {mark}/{mark}")
    return IptablesOwned.of(_ipt_jumps(), _ipt_chains(), rules)


def parse_iptables_save(text: str) -> IptablesOwned:
    """Pick out of ``iptables-save`` output what belongs to podwire (chains named
    ``PODWIRE-*``, their rules, and jumps to them from other chains). Raises UnreadableListing
    for a rule line outside a table."""
    table: str | None = None
    jumps: list[IptablesRule] = []
    chains: list[tuple[str, str]] = []
    rules: list[IptablesRule] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
            continue
        if table is None:
            raise UnreadableListing(f"iptables-save: {line!r} outside a table")
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name.startswith(IPT_CHAIN_PREFIX):
                chains.append((table, name))
            continue
        if not line.startswith("-A "):
            continue
        _, chain, *rest = line.split(" ", 2)
        rule = IptablesRule(table=table, chain=chain, spec=rest[0] if rest else "")
        if chain.startswith(IPT_CHAIN_PREFIX):
            rules.append(rule)
        elif _jumps_to_ours(rule.spec):
            jumps.append(rule)
    return IptablesOwned.of(jumps, chains, rules)


def _jumps_to_ours(spec: str) -> bool:
    try:
        words = shlex.split(spec)
    except ValueError:
        return False
    return any(
        w in ("-j", "-g", "--jump", "--goto") and nxt.startswith(IPT_CHAIN_PREFIX)
        for w, nxt in itertools.pairwise(words)
    )


def _restore(sections: Mapping[str, list[str]]) -> str:
    out: list[str] = []
    for table in sorted(
        sections,
        key=lambda t: (t not in _IPT_TABLES, _IPT_TABLES.index(t) if t in _IPT_TABLES else 0, t),
    ):
        lines = sections[table]
        if lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "".join(line + "\n" for line in out)


class _Sections:
    """iptables-restore input per table, in the order restore needs: chain declarations,
    rule deletions, rule appends, chain deletions."""

    def __init__(self) -> None:
        self.declare: dict[str, list[str]] = {}
        self.delete: dict[str, list[str]] = {}
        self.append: dict[str, list[str]] = {}
        self.drop: dict[str, list[str]] = {}

    def render(self) -> str:
        tables = {*self.declare, *self.delete, *self.append, *self.drop}
        return _restore(
            {
                t: [
                    *self.declare.get(t, []),
                    *self.delete.get(t, []),
                    *self.append.get(t, []),
                    *self.drop.get(t, []),
                ]
                for t in tables
            }
        )


def render_iptables(spec: SnatSpec, present: IptablesOwned | None = None) -> str:
    """Return input for ``iptables-restore --noflush`` that makes our chains hold ``spec``'s
    rules and leaves exactly one jump to each, given what ``present`` (from
    ``parse_iptables_save``) shows. Chains of ours that are no longer wanted are deleted."""
    present = present or IptablesOwned()
    want = expected_iptables(spec)
    out = _Sections()
    stale = [c for c in present.chains if c not in set(want.chains)]
    for table, chain in [*want.chains, *stale]:
        out.declare.setdefault(table, []).append(f":{chain} - [0:0]")  # declaring flushes it
    kept: set[IptablesRule] = set()
    for jump in present.jumps:
        if jump in want.jumps and jump not in kept:
            kept.add(jump)
        else:
            out.delete.setdefault(jump.table, []).append(jump.line("-D"))
    for rule in [*(j for j in want.jumps if j not in kept), *want.rules]:
        out.append.setdefault(rule.table, []).append(rule.line("-A"))
    for table, chain in stale:
        out.drop.setdefault(table, []).append(f"-X {chain}")
    return out.render()


def render_iptables_removal(present: IptablesOwned | None = None) -> str:
    """Return input for ``iptables-restore --noflush`` removing our jumps and chains.

    Jumps can only be deleted when named, so pass what ``parse_iptables_save`` found; without
    it the standard chains are deleted, which fails if a jump still refers to one. Empty when
    there is nothing to remove.
    """
    present = present if present is not None else IptablesOwned(chains=_ipt_chains())
    out = _Sections()
    for jump in present.jumps:
        out.delete.setdefault(jump.table, []).append(jump.line("-D"))
    for table, chain in present.chains:
        out.declare.setdefault(table, []).append(f":{chain} - [0:0]")
        out.drop.setdefault(table, []).append(f"-X {chain}")
    return out.render()
