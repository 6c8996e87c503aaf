"""The node's pool of pod addresses.

Theory of operation: every address the node may hand to a pod belongs to a *block* owned by
something in the cloud (a static CIDR, an ENI's secondary IPs or /28 prefixes). An address is
in exactly one state:

    free --assign--> assigned --release--> cooling --(cooldown elapsed)--> free

An address can also be *withdrawn* when its block leaves the node (a GCE alias range shrinks):
free and cooling ones leave at once; an assigned one stays with its pod, outside every block,
and leaves the pool when the pod releases it instead of cooling, so it is never handed out
again (``withdraw``, ``withdrawn_in_use``).

A released address cools for ``cooldown`` seconds before it is handed out again, so a
connection or a conntrack entry of the old pod never reaches the new one (Amazon VPC CNI's
IP_COOLDOWN_PERIOD). Free addresses are handed out first-in first-out, so the address that has
been free longest is reused first. Time is passed in (``now``, a monotonic clock reading) so
the pool is a pure in-memory structure, tested on a virtual clock.

Groups: every owner belongs to one *group*, and ``assign`` hands out only addresses of the
group asked for. Group ``""`` is the shared pool, what ordinary pods get and what ``total``,
``assigned``, ``cooling`` and ``available`` count; security groups for pods in eni mode keep
each set of groups in a group of its own (its ENIs' addresses), so a pod only ever gets an
address whose ENI carries its groups. Everything keyed by address (``claim``, ``release``,
``cool``, the checkpoint's cooling list) works across groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address

import attrs

from agent.cni.spec import PodKey
from agent.pool.pool_math import SHARED


class PoolExhausted(Exception):
    """No free address right now; ``cooling`` tells how many will come back and when."""

    def __init__(self, *, total: int, cooling: int, next_free_in: float | None) -> None:
        if total == 0:
            reason = "the pool holds no addresses"
        elif cooling:
            reason = (
                f"all {total} addresses in use; {cooling} cooling, next free in {next_free_in:.1f}s"
            )
        else:
            reason = f"all {total} addresses in use"
        super().__init__(reason)
        self.reason = reason
        self.total = total
        self.cooling = cooling
        self.next_free_in = next_free_in


class AddressUnknown(Exception):
    """The address is not in any block of the pool."""

    def __init__(self, ip: IPv4Address) -> None:
        super().__init__(f"{ip} is not in the pool")
        self.ip = ip


class AddressTaken(Exception):
    """The address is already assigned to another attachment."""

    def __init__(self, ip: IPv4Address, holder: PodKey) -> None:
        super().__init__(f"{ip} is already assigned to {holder}")
        self.ip = ip
        self.holder = holder


@attrs.frozen(kw_only=True)
class Lease:
    """An assigned address and where it lives."""

    ip: IPv4Address
    owner: str
    table: int | None


@attrs.frozen(kw_only=True)
class OwnerCounts:
    owner: str
    total: int
    assigned: int
    cooling: int
    group: str = ""


class IpPool:
    """Addresses grouped by owner, each free, assigned or cooling (see the module docstring)."""

    def __init__(self, *, cooldown: float) -> None:
        self.cooldown = cooldown
        self._owner: dict[IPv4Address, str] = {}
        self._tables: dict[str, int | None] = {}
        self._groups: dict[str, str] = {}  # owner -> group ("" = the shared pool)
        # per group, an insertion-ordered set: FIFO reuse
        self._free: dict[str, dict[IPv4Address, None]] = {SHARED: {}}
        self._assigned: dict[IPv4Address, PodKey] = {}
        self._cooling: dict[IPv4Address, float] = {}  # ip -> released at; in release order
        self._released: dict[str, float] = {}  # group -> when it last released an address

    def __repr__(self) -> str:
        free = sum(len(f) for f in self._free.values())
        groups = f" groups={len(self._free) - 1}" if len(self._free) > 1 else ""
        return (
            f"<IpPool owners={len(self._tables)} total={len(self._owner)} free={free} "
            f"assigned={len(self._assigned)} cooling={len(self._cooling)}{groups}>"
        )

    def _group_of_ip(self, ip: IPv4Address) -> str | None:
        owner = self._owner.get(ip)
        return None if owner is None else self._groups.get(owner, SHARED)

    def _free_of(self, group: str) -> dict[IPv4Address, None]:
        free = self._free.get(group)
        if free is None:
            free = self._free[group] = {}
        return free

    # -- blocks -------------------------------------------------------------------------------

    def add_block(
        self,
        owner: str,
        ips: Iterable[IPv4Address],
        *,
        table: int | None = None,
        group: str = SHARED,
    ) -> int:
        """Add addresses owned by ``owner`` (of ``group``) as free; return how many were new.

        A withdrawn address a pod still holds comes back to ``owner`` as assigned, never free.
        An owner stays in the group it was first added to while it holds addresses.
        """
        self._tables[owner] = table
        group = self._groups.setdefault(owner, group)
        free = self._free_of(group)
        added = 0
        for ip in ips:
            if ip in self._owner:
                continue
            self._owner[ip] = owner
            if ip not in self._assigned:
                free[ip] = None
            added += 1
        return added

    def remove_free(self, ips: Iterable[IPv4Address]) -> list[IPv4Address]:
        """Remove the given addresses where they are free or cooling; return those removed.

        Assigned addresses are never removed: a pod is using them.
        """
        removed = []
        for ip in ips:
            if ip in self._assigned or ip not in self._owner:
                continue
            self._discard_free(ip)
            self._cooling.pop(ip, None)
            del self._owner[ip]
            removed.append(ip)
        return removed

    def _discard_free(self, ip: IPv4Address) -> None:
        group = self._group_of_ip(ip)
        if group is not None:
            self._free_of(group).pop(ip, None)

    def withdraw(self, ips: Iterable[IPv4Address]) -> tuple[list[IPv4Address], list[IPv4Address]]:
        """Take addresses out of the pool for good; return (removed, still in use).

        Free and cooling addresses leave at once. An assigned one stays with its pod but belongs
        to no block any more: ``release`` then drops it instead of cooling it, so it is never
        handed out again (unless a block brings it back). Addresses the pool does not hold are
        ignored.
        """
        removed: list[IPv4Address] = []
        in_use: list[IPv4Address] = []
        for ip in ips:
            if ip not in self._owner:
                continue
            if ip in self._assigned:
                in_use.append(ip)
            else:
                self._discard_free(ip)
                self._cooling.pop(ip, None)
                removed.append(ip)
            del self._owner[ip]
        return removed, in_use

    def withdrawn_in_use(self) -> dict[IPv4Address, PodKey]:
        """Addresses withdrawn while a pod holds them, with their holders."""
        return {ip: k for ip, k in self._assigned.items() if ip not in self._owner}

    def move(self, ips: Iterable[IPv4Address], owner: str, *, table: int | None = None) -> int:
        """Give addresses the pool holds to ``owner`` (their state is unchanged); return how
        many moved."""
        self._tables.setdefault(owner, table)
        self._groups.setdefault(owner, SHARED)
        moved = 0
        for ip in ips:
            if self._owner.get(ip, owner) != owner:
                free = ip in self._free_of(self._group_of_ip(ip) or SHARED)
                self._discard_free(ip)
                self._owner[ip] = owner
                if free:
                    self._free_of(self._groups[owner])[ip] = None
                moved += 1
        return moved

    def owner_of(self, ip: IPv4Address) -> str | None:
        """The block ``ip`` belongs to, or None (not in the pool, or withdrawn)."""
        return self._owner.get(ip)

    def drop_owner_if_empty(self, owner: str) -> bool:
        """Forget ``owner`` when it holds no addresses; return whether it was dropped."""
        if any(o == owner for o in self._owner.values()):
            return False
        self._tables.pop(owner, None)
        self._groups.pop(owner, None)
        return True

    def addresses(self) -> list[IPv4Address]:
        """Every address the pool holds, whatever its state."""
        return list(self._owner)

    def owners(self) -> list[str]:
        return list(self._tables)

    def table_of(self, owner: str) -> int | None:
        return self._tables.get(owner)

    def group_of(self, owner: str) -> str:
        """The group ``owner`` belongs to (``""``, the shared pool, for an unknown one)."""
        return self._groups.get(owner, SHARED)

    def groups(self) -> list[str]:
        """Every group whose owners hold addresses now, the shared pool first."""
        return [SHARED, *sorted({g for g in self._groups.values() if g != SHARED})]

    def last_release(self, group: str) -> float | None:
        """When an address of ``group`` was last released (None: not since the start)."""
        return self._released.get(group)

    # -- leases -------------------------------------------------------------------------------

    def _thaw(self, now: float) -> None:
        while self._cooling:
            ip, released = next(iter(self._cooling.items()))
            if now - released < self.cooldown:
                break
            del self._cooling[ip]
            self._free_of(self._group_of_ip(ip) or SHARED)[ip] = None

    def assign(self, key: PodKey, now: float, *, group: str = SHARED) -> Lease:
        """Assign the longest-free address of ``group`` to ``key``; raises PoolExhausted when
        none is free."""
        self._thaw(now)
        free = self._free_of(group)
        if not free:
            raise PoolExhausted(
                total=self._count(group),
                cooling=sum(1 for ip in self._cooling if self._group_of_ip(ip) == group),
                next_free_in=self.next_free_in(now, group=group),
            )
        ip = next(iter(free))
        del free[ip]
        self._assigned[ip] = key
        owner = self._owner[ip]
        return Lease(ip=ip, owner=owner, table=self._tables[owner])

    def assign_requested(self, ip: IPv4Address, key: PodKey, now: float) -> Lease:
        """Assign ``ip`` itself to ``key`` (a runtime asked for it): free or cooling both do,
        a cooling address skipping the rest of its cooldown; ``key`` holding it already is fine.

        Raises AddressUnknown when the pool does not hold it and AddressTaken when another
        attachment holds it.
        """
        self._thaw(now)
        return self.claim(ip, key)

    def claim(self, ip: IPv4Address, key: PodKey) -> Lease:
        """Mark ``ip`` assigned to ``key`` (restoring a checkpoint); free or cooling both do.

        Raises AddressUnknown when the pool does not hold it and AddressTaken when another
        attachment holds it.
        """
        owner = self._owner.get(ip)
        if owner is None:
            raise AddressUnknown(ip)
        holder = self._assigned.get(ip)
        if holder is not None and holder != key:
            raise AddressTaken(ip, holder)
        self._discard_free(ip)
        self._cooling.pop(ip, None)
        self._assigned[ip] = key
        return Lease(ip=ip, owner=owner, table=self._tables[owner])

    def release(self, ip: IPv4Address, now: float) -> bool:
        """Start the cooldown of an assigned address; return False if it was not assigned."""
        if self._assigned.pop(ip, None) is None:
            return False
        group = self._group_of_ip(ip)
        if group is not None:
            self._cooling[ip] = now
            self._released[group] = max(now, self._released.get(group, now))
        return True

    def cool(self, ip: IPv4Address, released_at: float) -> None:
        """Put a known, unassigned address into cooldown as if released at ``released_at``."""
        if ip in self._owner and ip not in self._assigned:
            self._discard_free(ip)
            self._cooling.pop(ip, None)
            self._cooling[ip] = released_at
            group = self._group_of_ip(ip) or SHARED
            self._released[group] = max(released_at, self._released.get(group, released_at))
            # keep release order: re-sort the (short) cooling list when restoring
            self._cooling = dict(sorted(self._cooling.items(), key=lambda kv: kv[1]))

    # -- counts -------------------------------------------------------------------------------

    def holder(self, ip: IPv4Address) -> PodKey | None:
        return self._assigned.get(ip)

    def cooling_items(self, now: float | None = None) -> list[tuple[IPv4Address, float]]:
        """(address, released at) of every cooling address; those whose cooldown has ended
        by ``now`` are freed first when it is given."""
        if now is not None:
            self._thaw(now)
        return list(self._cooling.items())

    def next_free_in(self, now: float, *, group: str = SHARED) -> float | None:
        """Seconds until the next cooling address of ``group`` becomes free, or None if none
        is cooling."""
        first = next((t for ip, t in self._cooling.items() if self._group_of_ip(ip) == group), None)
        if first is None:
            return None
        return max(0.0, self.cooldown - (now - first))

    def available(self, now: float, *, group: str = SHARED) -> int:
        """Addresses of ``group`` that could be assigned right now."""
        self._thaw(now)
        return len(self._free.get(group, ()))

    def _count(self, group: str) -> int:
        if len(self._free) == 1:
            return len(self._owner)
        return sum(1 for o in self._owner.values() if self._groups.get(o, SHARED) == group)

    @property
    def total(self) -> int:
        """Addresses of the shared pool."""
        return self._count(SHARED)

    @property
    def assigned(self) -> int:
        """Assigned addresses of the shared pool (withdrawn ones included)."""
        if len(self._free) == 1:
            return len(self._assigned)
        return sum(1 for ip in self._assigned if self._group_of_ip(ip) in (None, SHARED))

    @property
    def cooling(self) -> int:
        """Cooling addresses of the shared pool."""
        if len(self._free) == 1:
            return len(self._cooling)
        return sum(1 for ip in self._cooling if self._group_of_ip(ip) == SHARED)

    def owner_counts(self, now: float) -> list[OwnerCounts]:
        """Per-owner totals, assigned and cooling counts (for pool math and agentctl)."""
        self._thaw(now)
        counts = {o: [0, 0, 0] for o in self._tables}
        for ip, owner in self._owner.items():
            c = counts[owner]
            c[0] += 1
            if ip in self._assigned:
                c[1] += 1
            elif ip in self._cooling:
                c[2] += 1
        return [
            OwnerCounts(owner=o, total=t, assigned=a, cooling=c, group=self.group_of(o))
            for o, (t, a, c) in counts.items()
        ]
