"""Putting back what someone else removed from a live pod's host side.

Theory of operation: the netlink watcher reports every route, rule and link change in the
node's namespace. A deleted ``<pod ip>/32`` route in the main table, a deleted rule at the pod
priorities (512, 1536) naming a pod's address, or a pod's host veth seen down marks that
allocation suspect; a resync (events were lost) marks every allocation. The repair loop then
takes each suspect's key lock — so it never fights an ADD or DEL in flight, whose own route
changes are what the watcher reports first — checks the allocation still exists, and puts the
host side back (idempotent: veth up, route replaced, rules added unless present). Every repair
is counted (``podwire_gc_repairs_total{kind}``) and published on the event feed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from ipaddress import IPv4Address
from typing import TypeVar

import anyio
import anyio.abc

from agent.checkpoint import Allocation
from agent.cni.service import CniService
from agent.cni.spec import PodKey
from agent.events import EventBus
from agent.metrics import Metrics
from netlink.errors import NetlinkError
from netlink.names import HOST_VETH_PREFIXES
from netlink.requests import RT_TABLE_MAIN
from netlink.veth import RULE_FROM_PRIORITY, RULE_TO_PRIORITY
from netlink.vlan import IIF_RULE_PRIORITY, VLAN_LINK_PREFIX, link_name, table_of
from netlink.watcher import Batch, Item, LinkEvent, RouteEvent, RuleEvent, TcEvent

log = logging.getLogger("podwire.repair")


K = TypeVar("K")


class _Lazy(Mapping[K, PodKey]):
    """A mapping built on first use."""

    def __init__(self, build: Callable[[], dict[K, PodKey]]) -> None:
        self._build = build
        self._map: dict[K, PodKey] | None = None

    def _get(self) -> dict[K, PodKey]:
        if self._map is None:
            self._map = self._build()
        return self._map

    def __getitem__(self, key: K) -> PodKey:
        return self._get()[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class _ByIp(Mapping[IPv4Address, PodKey]):
    """The allocations by address, through the pool's index (O(1), nothing built)."""

    def __init__(self, cni: CniService) -> None:
        self._cni = cni
        self._branches: dict[IPv4Address, PodKey] | None = None

    def __getitem__(self, ip: IPv4Address) -> PodKey:
        key = self._cni.pool.holder(ip)
        if key is None:  # a branch pod's address is its branch ENI's, not the pool's
            key = self._branch_pods().get(ip)
        if key is None or key not in self._cni.allocations:
            raise KeyError(ip)
        return key

    def _branch_pods(self) -> dict[IPv4Address, PodKey]:
        if self._branches is None:
            self._branches = {a.ip: k for k, a in self._cni.allocations.items() if a.sg is not None}
        return self._branches

    def __iter__(self) -> Iterator[IPv4Address]:
        return (a.ip for a in self._cni.allocations.values())

    def __len__(self) -> int:
        return len(self._cni.allocations)


def suspects(
    item: Item,
    by_ip: Mapping[IPv4Address, PodKey],
    by_veth: Mapping[str, PodKey],
    seen_up: set[str] | None = None,
    by_table: Mapping[int, PodKey] | None = None,
    by_link: Mapping[str, PodKey] | None = None,
) -> dict[PodKey, str]:
    """Allocations an event batch may have damaged, each with what happened.

    Pure but for ``seen_up``, the host veths seen up so far, which it updates: a veth reported
    down counts only if it was up before (while ADD wires a pod, its new veth is down for a
    moment, and that is not damage). Branch pods (security groups) also own a route table
    (``by_table``: 100 + vid) and the names their priority-10 rules match (``by_link``: the VLAN
    link and, in strict mode, the host veth): a route deleted from that table, a rule at 10 on
    one of those names deleted, their VLAN link deleted or set down mark them too, and so
    does any tc program someone removes (a branch link's 802.1Q programs live under tc).
    """
    seen_up = set() if seen_up is None else seen_up
    by_table = by_table or {}
    by_link = by_link or {}
    if not isinstance(item, Batch):
        return {key: "resync" for key in by_ip.values()}
    found: dict[PodKey, str] = {}
    for e in item.events:
        if isinstance(e, RouteEvent):
            if (
                e.kind == "del"
                and e.prefixlen == 32
                and e.table == RT_TABLE_MAIN
                and e.dst in by_ip
            ):
                found[by_ip[e.dst]] = "route"
            elif e.kind == "del" and e.table > 255 and e.table in by_table:
                found[by_table[e.table]] = "branch route"
        elif isinstance(e, RuleEvent):
            ip = e.src if e.priority == RULE_FROM_PRIORITY else e.dst
            pod_rule = e.priority in (RULE_TO_PRIORITY, RULE_FROM_PRIORITY)
            if e.kind == "del" and pod_rule and ip is not None and ip in by_ip:
                found[by_ip[ip]] = "rule"
            elif e.kind == "del" and e.priority == IIF_RULE_PRIORITY and e.iifname in by_link:
                found[by_link[e.iifname]] = "rule"
        elif isinstance(e, TcEvent):
            # a tc program removed by someone: a branch link's 802.1Q tagger or the trunk's
            # demultiplexer (netlink.dot1q) may be gone; which pod's, the check tells
            found.update({key: "802.1Q program" for key in by_link.values()})
        elif isinstance(e, LinkEvent) and e.name.startswith(VLAN_LINK_PREFIX):
            if (e.kind == "del" or not e.up) and e.name in by_link:
                found[by_link[e.name]] = "branch link"
        elif isinstance(e, LinkEvent) and e.name.startswith(HOST_VETH_PREFIXES):
            if e.kind == "del":
                seen_up.discard(e.name)
            elif e.up:
                seen_up.add(e.name)
            elif e.name in seen_up:
                seen_up.discard(e.name)
                if e.name in by_veth:
                    found[by_veth[e.name]] = "link down"
    return found


def _branch_links(allocs: Mapping[PodKey, Allocation]) -> dict[str, PodKey]:
    """The names branch pods' priority-10 rules match: VLAN links, strict pods' host veths."""
    out: dict[str, PodKey] = {}
    for k, a in allocs.items():
        if a.sg is not None:
            out[link_name(a.sg.vlan)] = k
            if a.sg.strict:
                out[a.host_veth] = k
    return out


class Repairer:
    def __init__(
        self,
        cni: CniService,
        repair_host: object,
        *,
        metrics: Metrics | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.cni = cni
        self._repair_host = repair_host  # async (PodNet) -> bool
        self.metrics = metrics or Metrics()
        self.events = events or EventBus()
        self._pending: dict[PodKey, str] = {}
        self._seen_up: set[str] = set()
        self._wake = anyio.Event()
        self.repairs = 0

    def __repr__(self) -> str:
        return f"<Repairer pending={len(self._pending)} repairs={self.repairs}>"

    def on_watch(self, item: Item) -> None:
        """Watcher callback (synchronous, never blocks). The lookups are built only when an
        event may concern a pod: most batches (a pod's own ADD or DEL) need none."""
        allocs = self.cni.allocations
        by_ip = _ByIp(self.cni)
        by_veth = _Lazy(lambda: {a.host_veth: k for k, a in allocs.items()})
        by_table = _Lazy(lambda: {table_of(a.sg.vlan): k for k, a in allocs.items() if a.sg})
        by_link = _Lazy(lambda: _branch_links(allocs))
        found = suspects(item, by_ip, by_veth, self._seen_up, by_table, by_link)
        if found:
            self._pending.update(found)
            self._wake.set()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            pending, self._pending = self._pending, {}
            for key, what in pending.items():
                await self._repair(key, what)

    async def _repair(self, key: PodKey, what: str) -> None:
        async with self.cni.locks.hold(key):
            alloc = self.cni.allocations.get(key)
            if alloc is None:
                return  # a DEL or GC released it: its route went with it, as it should
            try:
                # only what is really missing: an ADD's own transient states are not damage
                fixed = await self._repair_host(self.cni.pod_net(alloc))  # type: ignore[operator]
            except NetlinkError as e:
                log.warning("repair failed", extra={"key": str(key), "what": what, "error": str(e)})
                return
        if fixed:
            self.repairs += 1
            self.metrics.gc_run({}, {what: 1})
            self.events.publish("repaired", key=str(key), ip=str(alloc.ip), what=what, fixed=fixed)
            log.warning("put back what someone removed", extra={"key": str(key), "fixed": fixed})
