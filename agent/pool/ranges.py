"""Following a node's pod ranges as the cloud changes them (GCE alias IP ranges).

Theory of operation. A provider without a warm pool (gce) owns whole ranges: every usable
address of a range (never its network or broadcast address, nor a reserved one such as the
node's own address or the subnet gateway) is in the pool, owned by the range (``str(cidr)``).
When the cloud hands the node a new set of ranges, ``plan_ranges`` — a pure function of the
pool's addresses and owners, the old and new ranges — says which addresses join, which stay but
now belong to another range (a /24 shrunk to its /25 half), and which leave. ``RangeFollower``
carries the plan out on the pool: joining addresses are free at once; leaving ones that are free
or cooling leave at once; leaving ones a pod holds are *withdrawn* (``IpPool.withdraw``): the pod
keeps its address until its DEL, which drops it instead of cooling it, so it is never handed out
again. Those are reported (log, event, ``agentctl pool``, the ``podwire_pool_withdrawn_in_use``
gauge): the VPC no longer routes them to this node, so only deleting the pod ends that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

import anyio
import attrs
from anyio.abc import TaskStatus

from agent.events import EventBus
from agent.pool.ipam import IpPool
from cloud.static import first_overlap, usable_hosts

log = logging.getLogger("podwire.ranges")


class InvalidRanges(ValueError):
    """The ranges the cloud reported cannot be served as they are (``reason`` says why)."""

    def __init__(self, ranges: Sequence[IPv4Network], reason: str) -> None:
        super().__init__(f"{', '.join(map(str, ranges)) or 'no ranges'}: {reason}")
        self.ranges = tuple(ranges)
        self.reason = reason


def check_ranges(ranges: Sequence[IPv4Network]) -> None:
    """Raise InvalidRanges when two ranges overlap or one repeats."""
    overlap = first_overlap(ranges)
    if overlap is not None:
        raise InvalidRanges(ranges, f"{overlap[0]} overlaps {overlap[1]}")


def range_addresses(
    ranges: Iterable[IPv4Network], reserved: Iterable[IPv4Address] = ()
) -> dict[IPv4Address, str]:
    """Every address a pod may get from ``ranges``, with the range that owns it."""
    skip = tuple(reserved)
    return {ip: str(r) for r in ranges for ip in usable_hosts(r, skip)}


@attrs.frozen(kw_only=True)
class RangePlan:
    """What moving the pool to a new set of ranges takes (see ``plan_ranges``)."""

    ranges_added: tuple[IPv4Network, ...] = ()
    ranges_removed: tuple[IPv4Network, ...] = ()
    join: Mapping[str, tuple[IPv4Address, ...]] = attrs.field(factory=dict)  # owner -> new ips
    move: Mapping[str, tuple[IPv4Address, ...]] = attrs.field(factory=dict)  # owner -> kept ips
    leave: tuple[IPv4Address, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.ranges_added or self.ranges_removed or self.join or self.move or self.leave
        )

    @property
    def joining(self) -> int:
        return sum(len(v) for v in self.join.values())


def plan_ranges(
    current: Mapping[IPv4Address, str],
    old: Sequence[IPv4Network],
    new: Sequence[IPv4Network],
    reserved: Iterable[IPv4Address] = (),
) -> RangePlan:
    """Plan the pool's move from ``old`` to ``new`` ranges.

    ``current`` maps every address the pool holds (withdrawn ones excluded) to its owner.
    Returns the ranges added and removed, the addresses that join (per new owner), those that
    stay but change owner, and those that leave. Raises InvalidRanges for overlapping ranges.
    """
    check_ranges(new)
    want = range_addresses(new, reserved)
    join: dict[str, list[IPv4Address]] = {}
    move: dict[str, list[IPv4Address]] = {}
    for ip, owner in want.items():
        have = current.get(ip)
        if have is None:
            join.setdefault(owner, []).append(ip)
        elif have != owner:
            move.setdefault(owner, []).append(ip)
    leave = tuple(sorted(ip for ip in current if ip not in want))
    old_set, new_set = set(old), set(new)
    return RangePlan(
        ranges_added=tuple(r for r in new if r not in old_set),
        ranges_removed=tuple(r for r in old if r not in new_set),
        join={o: tuple(ips) for o, ips in join.items()},
        move={o: tuple(ips) for o, ips in move.items()},
        leave=leave,
    )


class RangeSource(Protocol):
    """A provider whose ranges can change: the current ones, and a feed of new sets."""

    @property
    def ranges(self) -> tuple[IPv4Network, ...]: ...

    @property
    def reserved(self) -> tuple[IPv4Address, ...]: ...

    def watch_ranges(self) -> AsyncIterator[tuple[IPv4Network, ...]]:
        """Yield each new set of ranges as the cloud reports it (retrying on its own)."""
        ...


class RangeFollower:
    """Applies each new set of ranges from ``source`` to ``pool`` (module docstring)."""

    def __init__(
        self,
        pool: IpPool,
        source: RangeSource,
        *,
        on_change: Callable[[], None],
        events: EventBus | None = None,
    ) -> None:
        self.pool = pool
        self.source = source
        self.on_change = on_change
        self.events = events or EventBus()
        self.ranges: tuple[IPv4Network, ...] = tuple(source.ranges)
        self.changes = 0
        self.last_change: float | None = None
        self.last_error = ""

    def __repr__(self) -> str:
        return (
            f"<RangeFollower ranges={', '.join(map(str, self.ranges)) or '-'} "
            f"changes={self.changes} withdrawn_in_use={len(self.pool.withdrawn_in_use())}>"
        )

    async def run(
        self, *, task_status: TaskStatus[RangeFollower] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the source until cancelled; ``task_status.started`` hands back this object."""
        task_status.started(self)
        async for ranges in self.source.watch_ranges():
            self.apply(ranges)

    def apply(self, ranges: Sequence[IPv4Network]) -> RangePlan | None:
        """Move the pool to ``ranges``; return the plan carried out, or None when the ranges
        were refused (overlapping: the pool keeps the ranges it had, the error is reported)."""
        new = tuple(ranges)
        current = {ip: o for ip in self.pool.addresses() if (o := self.pool.owner_of(ip))}
        try:
            plan = plan_ranges(current, self.ranges, new, self.source.reserved)
        except InvalidRanges as e:
            self.last_error = str(e)
            log.error("refused the node's new pod ranges; keeping the old ones: %s", e)
            self.events.publish(
                "pool.ranges_refused", ranges=[str(r) for r in new], reason=e.reason
            )
            return None
        self.last_error = ""
        self.ranges = new
        if plan.empty:
            return plan
        removed, in_use = self.pool.withdraw(plan.leave)
        for owner, ips in plan.move.items():
            self.pool.move(ips, owner)
        for owner, ips in plan.join.items():
            self.pool.add_block(owner, ips)
        for owner in self.pool.owners():
            self.pool.drop_owner_if_empty(owner)
        self.changes += 1
        self.last_change = time.time()
        holders = self.pool.withdrawn_in_use()
        in_use_text = [f"{ip}={holders[ip]}" for ip in in_use if ip in holders]
        (log.warning if in_use else log.info)(
            "pod ranges changed: +%s -%s; %d addresses joined, %d left, %d withdrawn in use%s",
            ",".join(map(str, plan.ranges_added)) or "none",
            ",".join(map(str, plan.ranges_removed)) or "none",
            plan.joining,
            len(removed),
            len(in_use),
            f" ({'; '.join(in_use_text)}: never handed out again)" if in_use else "",
        )
        self.events.publish(
            "pool.ranges_changed",
            ranges=[str(r) for r in new],
            added=[str(r) for r in plan.ranges_added],
            removed=[str(r) for r in plan.ranges_removed],
            joined=plan.joining,
            left=len(removed),
            withdrawn_in_use=len(in_use),
        )
        for ip in in_use:
            self.events.publish("pool.withdrawn_in_use", ip=str(ip), key=str(holders.get(ip, "")))
        self.on_change()
        return plan

    def status(self) -> dict[str, Any]:
        return {
            "ranges": [str(r) for r in self.ranges],
            "changes": self.changes,
            "last_change": self.last_change,
            "last_error": self.last_error,
        }
