"""Garbage collection of the branch datapath: leaked VLAN links, priority-10 rules and
strict-mode ingress chains. A pure planner and a thin executor, as ``agent.gc``.

Theory of operation. What a live branch pod owns follows from its allocation: the link
``vlan.eth.<vid>``, in strict mode the rules ``iif vlan.eth.<vid>`` and ``iif <host veth>`` to
table 100 + vid and the netdev chain named after its host veth. Anything of those shapes that
no allocation owns, seen so on two looks at least ``grace`` apart, is collected; other names,
other priorities and other tables are someone else's and never planned. Route tables need no
collection of their own: every route of table 100 + vid goes through ``vlan.eth.<vid>`` or a
pod's host veth, and the kernel removes a link's routes with the link. The 512/1536 rules of
standard-mode pods are the ordinary pod rules, collected by ``agent.gc``. Where branch links
are 802.1Q by eBPF (``netlink.dot1q``), each run ends by bringing every trunk's demultiplexer
back to the live links (a leaked link just deleted leaves its VLAN there until then).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

import attrs

from agent.checkpoint import Allocation
from netlink.errors import NetlinkError
from netlink.names import HOST_VETH_PREFIXES
from netlink.requests import Link
from netlink.vlan import VLAN_LINK_PREFIX, IifRule, link_name, table_of

log = logging.getLogger("podwire.sg.gc")


@attrs.frozen(kw_only=True)
class Owned:
    """What the live branch pods own."""

    links: frozenset[str] = frozenset()
    rules: frozenset[IifRule] = frozenset()
    chains: frozenset[str] = frozenset()


def owned_by(allocations: Iterable[Allocation]) -> Owned:
    links: set[str] = set()
    rules: set[IifRule] = set()
    chains: set[str] = set()
    for a in allocations:
        if a.sg is None:
            continue
        name = link_name(a.sg.vlan)
        links.add(name)
        if a.sg.strict:
            table = table_of(a.sg.vlan)
            rules |= {IifRule(iifname=name, table=table), IifRule(iifname=a.host_veth, table=table)}
            chains.add(a.host_veth)
    return Owned(links=frozenset(links), rules=frozenset(rules), chains=frozenset(chains))


@attrs.frozen(kw_only=True)
class SgObservations:
    links: frozenset[str] = frozenset()
    rules: tuple[IifRule, ...] = ()
    chains: frozenset[str] = frozenset()


@attrs.frozen(kw_only=True)
class SgSightings:
    links: Mapping[str, float] = attrs.field(factory=dict)
    rules: Mapping[IifRule, float] = attrs.field(factory=dict)
    chains: Mapping[str, float] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class SgGcPlan:
    links: tuple[str, ...] = ()
    rules: tuple[IifRule, ...] = ()
    chains: tuple[str, ...] = ()
    sightings: SgSightings = SgSightings()

    def describe(self) -> list[str]:
        return (
            [f"delete link {n}: no branch pod owns it" for n in self.links]
            + [
                f"delete rule 10: iif {r.iifname} lookup {r.table}: no branch pod owns it"
                for r in self.rules
            ]
            + [f"delete strict-mode chain {c}: no branch pod owns it" for c in self.chains]
        )

    @property
    def size(self) -> int:
        return len(self.links) + len(self.rules) + len(self.chains)


def _ours(iifname: str) -> bool:
    return iifname.startswith(VLAN_LINK_PREFIX) or iifname.startswith(HOST_VETH_PREFIXES)


T = TypeVar("T")


def _due(
    candidates: Iterable[T], sightings: Mapping[T, float], now: float, grace: float
) -> tuple[list[T], dict[T, float]]:
    """The candidates first seen at least ``grace`` ago, and the others with when they were
    first seen (now, for the new ones)."""
    due, seen = [], {}
    for c in candidates:
        first = sightings.get(c, now)
        if now - first >= grace:
            due.append(c)
        else:
            seen[c] = first
    return due, seen


def plan(
    owned: Owned,
    obs: SgObservations,
    now: float,
    grace: float,
    sightings: SgSightings = SgSightings(),
) -> SgGcPlan:
    """Decide what to collect now; pure."""
    links, seen_links = _due(
        (n for n in sorted(obs.links) if n not in owned.links), sightings.links, now, grace
    )
    rules, seen_rules = _due(
        (r for r in obs.rules if r not in owned.rules and _ours(r.iifname)),
        sightings.rules,
        now,
        grace,
    )
    chains, seen_chains = _due(
        (c for c in sorted(obs.chains) if c not in owned.chains), sightings.chains, now, grace
    )
    return SgGcPlan(
        links=tuple(links),
        rules=tuple(rules),
        chains=tuple(chains),
        sightings=SgSightings(links=seen_links, rules=seen_rules, chains=seen_chains),
    )


class SgKernel(Protocol):
    async def branch_links(self) -> dict[str, Link]: ...
    async def sync_dot1q(self, parents: list[int], dry_run: bool = False) -> list[str]: ...
    async def iif_rules(self) -> list[IifRule]: ...
    async def delete_iif_rules(self, rules: list[IifRule]) -> None: ...
    async def strict_chains(self) -> dict[str, str]: ...
    async def delete_strict_chains(self, host_veths: list[str]) -> None: ...


@attrs.frozen(kw_only=True)
class SgGcReport:
    collected: int = 0
    lines: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()


class SgGc:
    """Looks, plans and collects; ``agent.gc.GcService`` runs it with its own looks."""

    def __init__(
        self,
        kernel: SgKernel,
        allocations: Callable[[], Sequence[Allocation]],
        delete_links: Callable[[list[str]], Awaitable[None]],
        *,
        grace: float = 10.0,
        clock: Callable[[], float],
        trunks: Callable[[], list[int]] = list,
    ) -> None:
        self.kernel = kernel
        self.allocations = allocations
        self.delete_links = delete_links  # the CNI service's shared link deleter
        self.grace = grace
        self.clock = clock
        self.trunks = trunks  # the trunk's ifindex, once known
        self.sightings = SgSightings()

    async def run_once(self, *, dry_run: bool = False) -> SgGcReport:
        obs = SgObservations(
            links=frozenset(await self.kernel.branch_links()),
            rules=tuple(await self.kernel.iif_rules()),
            chains=frozenset(await self.kernel.strict_chains()),
        )
        # planned against the allocations after the look (as agent.gc does)
        the_plan = plan(owned_by(self.allocations()), obs, self.clock(), self.grace, self.sightings)
        lines = tuple(the_plan.describe())
        if dry_run:
            stale = await self.kernel.sync_dot1q(self.trunks(), dry_run=True)
            return SgGcReport(collected=the_plan.size + len(stale), lines=lines + tuple(stale))
        self.sightings = the_plan.sightings
        # re-check against the allocations now: an ADD may have taken a VLAN meanwhile
        owned = owned_by(self.allocations())
        errors: list[str] = []
        done = 0
        links = [n for n in the_plan.links if n not in owned.links]
        rules = [r for r in the_plan.rules if r not in owned.rules]
        chains = [c for c in the_plan.chains if c not in owned.chains]
        try:
            if links:
                await self.delete_links(links)
                done += len(links)
            if rules:
                await self.kernel.delete_iif_rules(rules)
                done += len(rules)
            if chains:
                await self.kernel.delete_strict_chains(chains)
                done += len(chains)
            # after the links went: each trunk's 802.1Q demultiplexer back to its live links
            synced = await self.kernel.sync_dot1q(self.trunks())
            lines += tuple(synced)
            done += len(synced)
        except NetlinkError as e:
            errors.append(f"branch datapath: {e}")
        if done:
            log.info("gc collected branch datapath leftovers", extra={"lines": list(lines)})
        return SgGcReport(collected=done, lines=lines, errors=tuple(errors))
