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
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address

import attrs

from agent.cni.spec import PodKey


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


class IpPool:
    """Addresses grouped by owner, each free, assigned or cooling (see the module docstring)."""

    def __init__(self, *, cooldown: float) -> None:
        self.cooldown = cooldown
        self._owner: dict[IPv4Address, str] = {}
        self._tables: dict[str, int | None] = {}
        self._free: dict[IPv4Address, None] = {}  # insertion-ordered set: FIFO reuse
        self._assigned: dict[IPv4Address, PodKey] = {}
        self._cooling: dict[IPv4Address, float] = {}  # ip -> released at; in release order

    def __repr__(self) -> str:
        return (
            f"<IpPool owners={len(self._tables)} total={len(self._owner)} free={len(self._free)} "
            f"assigned={len(self._assigned)} cooling={len(self._cooling)}>"
        )

    # -- blocks -------------------------------------------------------------------------------

    def add_block(self, owner: str, ips: Iterable[IPv4Address], *, table: int | None = None) -> int:
        """Add addresses owned by ``owner`` as free; return how many were new.

        A withdrawn address a pod still holds comes back to ``owner`` as assigned, never free.
        """
        self._tables[owner] = table
        added = 0
        for ip in ips:
            if ip in self._owner:
                continue
            self._owner[ip] = owner
            if ip not in self._assigned:
                self._free[ip] = None
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
            self._free.pop(ip, None)
            self._cooling.pop(ip, None)
            del self._owner[ip]
            removed.append(ip)
        return removed

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
            del self._owner[ip]
            if ip in self._assigned:
                in_use.append(ip)
            else:
                self._free.pop(ip, None)
                self._cooling.pop(ip, None)
                removed.append(ip)
        return removed, in_use

    def withdrawn_in_use(self) -> dict[IPv4Address, PodKey]:
        """Addresses withdrawn while a pod holds them, with their holders."""
        return {ip: k for ip, k in self._assigned.items() if ip not in self._owner}

    def move(self, ips: Iterable[IPv4Address], owner: str, *, table: int | None = None) -> int:
        """Give addresses the pool holds to ``owner`` (their state is unchanged); return how
        many moved."""
        self._tables.setdefault(owner, table)
        moved = 0
        for ip in ips:
            if self._owner.get(ip, owner) != owner:
                self._owner[ip] = owner
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
        return True

    def addresses(self) -> list[IPv4Address]:
        """Every address the pool holds, whatever its state."""
        return list(self._owner)

    def owners(self) -> list[str]:
        return list(self._tables)

    def table_of(self, owner: str) -> int | None:
        return self._tables.get(owner)

    # -- leases -------------------------------------------------------------------------------

    def _thaw(self, now: float) -> None:
        while self._cooling:
            ip, released = next(iter(self._cooling.items()))
            if now - released < self.cooldown:
                break
            del self._cooling[ip]
            self._free[ip] = None

    def assign(self, key: PodKey, now: float) -> Lease:
        """Assign the longest-free address to ``key``; raises PoolExhausted when none is free."""
        self._thaw(now)
        if not self._free:
            raise PoolExhausted(
                total=len(self._owner),
                cooling=len(self._cooling),
                next_free_in=self.next_free_in(now),
            )
        ip = next(iter(self._free))
        del self._free[ip]
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
        self._free.pop(ip, None)
        self._cooling.pop(ip, None)
        self._assigned[ip] = key
        return Lease(ip=ip, owner=owner, table=self._tables[owner])

    def release(self, ip: IPv4Address, now: float) -> bool:
        """Start the cooldown of an assigned address; return False if it was not assigned."""
        if self._assigned.pop(ip, None) is None:
            return False
        if ip in self._owner:
            self._cooling[ip] = now
        return True

    def cool(self, ip: IPv4Address, released_at: float) -> None:
        """Put a known, unassigned address into cooldown as if released at ``released_at``."""
        if ip in self._owner and ip not in self._assigned:
            self._free.pop(ip, None)
            self._cooling.pop(ip, None)
            self._cooling[ip] = released_at
            # keep release order: re-sort the (short) cooling list when restoring
            self._cooling = dict(sorted(self._cooling.items(), key=lambda kv: kv[1]))

    # -- counts -------------------------------------------------------------------------------

    def holder(self, ip: IPv4Address) -> PodKey | None:
        return self._assigned.get(ip)

    def cooling_items(self) -> list[tuple[IPv4Address, float]]:
        return list(self._cooling.items())

    def next_free_in(self, now: float) -> float | None:
        """Seconds until the next cooling address becomes free, or None if none is cooling."""
        if not self._cooling:
            return None
        first = next(iter(self._cooling.values()))
        return max(0.0, self.cooldown - (now - first))

    def available(self, now: float) -> int:
        """Addresses that could be assigned right now."""
        self._thaw(now)
        return len(self._free)

    @property
    def total(self) -> int:
        return len(self._owner)

    @property
    def assigned(self) -> int:
        return len(self._assigned)

    @property
    def cooling(self) -> int:
        return len(self._cooling)

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
            OwnerCounts(owner=o, total=t, assigned=a, cooling=c) for o, (t, a, c) in counts.items()
        ]
