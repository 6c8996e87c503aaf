"""Sets of security groups on this node (eni mode): pods asking for the same set of groups share
secondary ENIs created with exactly that set.

Theory of operation. A set is named by its key (``cloud.provider.group_key``: the ids sorted
and comma-joined). Its addresses are a group of the node's IpPool, its ENIs carry the key in a
tag, and the refiller plans and grows it with the shared pool (``pool_math.plan_node``): a set
in use keeps ``warm`` free addresses, so the next pod of the set starts with no EC2 call.

``acquire`` (the pod's ADD): a free address of the set is assigned at once; if that leaves the
set below its margin the refiller is woken to top it up. With none free the ADD counts as
waiting for its set (the refiller plans an address for every waiting ADD), wakes the refiller
and waits for, whichever comes first:

* an address of its set (taken at once);
* the verdict of a tick that ended after it began waiting: the set cannot grow (``SetRefused``:
  no ENI slot, its ENIs full; the reason names the limit) or its growth failed (``SetFailed``:
  the cloud's error, such as a group that does not exist);
* ``wait`` seconds (``SetPending``); the refiller carries on, so the retried ADD finds it.

A DEL releases the address like any other (it cools in its set). The set's ENI stays while the
set is in use and is freed by the refiller once the set has had no pod for the set cooldown,
its addresses have cooled and the ENI is old enough. Restart: the set ENIs come back from EC2
(their tag) into their groups, the checkpoint's allocations claim their addresses, cooling
entries cool in their set: nothing here is durable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio

from agent.cni.spec import PodKey
from agent.pool.ipam import IpPool, Lease, PoolExhausted
from cloud.errors import CloudError
from cloud.provider import group_key


class SetError(Exception):
    """Base of the sets' errors: the pod's set could not give it an address."""


class SetRefused(SetError):
    """The set cannot grow: a limit of the node (``reason`` names it)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"security groups {key}: {reason}")
        self.key = key
        self.reason = reason


class SetFailed(SetError):
    """Growing the set failed in the cloud (``cause``: the CloudError)."""

    def __init__(self, key: str, cause: CloudError) -> None:
        super().__init__(f"security groups {key}: the set's ENI could not be made: {cause}")
        self.key = key
        self.cause = cause


class SetPending(SetError):
    """No address of the set yet; the refiller is still at it (ask again)."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"security groups {key}: no address of the set yet ({why})")
        self.key = key
        self.why = why


class SetPools:
    """eni mode's sets over the node's pool; the refiller's ``SetDemand``."""

    def __init__(
        self,
        pool: IpPool,
        *,
        warm: int,
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.pool = pool
        self.warm = warm
        self.wake = wake  # the refiller's demand event (the daemon sets it)
        self.clock = clock
        self._waiting: Counter[str] = Counter()
        self._changed = anyio.Event()
        self._verdicts = 0  # ticks whose verdict arrived
        self._refused: dict[str, str] = {}
        self._failed: dict[str, CloudError] = {}
        self.refusals = 0
        self._topup = False  # a margin taken by an ADD still in flight (see ``settled``)

    def __repr__(self) -> str:
        return (
            f"<SetPools sets={len(self.pool.groups()) - 1} waiting={sum(self._waiting.values())} "
            f"verdicts={self._verdicts}>"
        )

    # -- SetDemand (the refiller) ----------------------------------------------------------

    def waiting(self) -> Mapping[str, int]:
        return {k: n for k, n in self._waiting.items() if n > 0}

    def notify(self) -> None:
        event, self._changed = self._changed, anyio.Event()
        event.set()

    def planned(self, refused: Mapping[str, str], failed: Mapping[str, CloudError]) -> None:
        self._verdicts += 1
        self._refused = dict(refused)
        self._failed = dict(failed)
        self.notify()

    def refused(self) -> Mapping[str, str]:
        """The latest tick's refusals: set key -> the limit, in words."""
        return dict(self._refused)

    # -- the ADD's side ----------------------------------------------------------------------

    def _take(self, key: PodKey, group: str, *, defer: bool = False) -> Lease:
        lease = self.pool.assign(key, self.clock(), group=group)
        if self.pool.available(self.clock(), group=group) < self.warm:
            # the margin is gone: the refiller tops it up now, not at its next tick -- or, for
            # an address the set had ready, once this ADD has answered (``settled``)
            if defer:
                self._topup = True
            else:
                self.wake()
        return lease

    def settled(self) -> None:
        """An ADD answered (or failed): wake the refiller for a margin it took. Woken at once,
        the top-up's EC2 call (request signing and reply parsing run on the agent's loop) ran
        beside that ADD's checkpoint and wiring and cost it ~10 ms here. An ADD that finds
        its set empty meanwhile wakes the refiller itself."""
        if self._topup:
            self._topup = False
            self.wake()

    async def acquire(self, key: PodKey, groups: Sequence[str], *, wait: float) -> Lease:
        """An address of the set ``groups`` for ``key``; see the module docstring.

        Raises SetRefused, SetFailed or SetPending.
        """
        group = group_key(groups)
        try:
            return self._take(key, group, defer=True)
        except PoolExhausted:
            pass
        deadline = self.clock() + wait
        start = self._verdicts
        self._waiting[group] += 1
        try:
            self.wake()
            while True:
                changed = self._changed
                try:
                    return self._take(key, group)
                except PoolExhausted as e:
                    exhausted = e
                if self._verdicts > start and group in self._refused:
                    self.refusals += 1
                    raise SetRefused(group, self._refused[group])
                if self._verdicts > start and group in self._failed:
                    raise SetFailed(group, self._failed[group])
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise SetPending(group, exhausted.reason)
                with anyio.move_on_after(remaining):
                    await changed.wait()
        finally:
            self._waiting[group] -= 1
            if not self._waiting[group]:
                del self._waiting[group]

    # -- views -------------------------------------------------------------------------------

    def rows(self, enis: Sequence[Any], pods: Mapping[str, list[str]]) -> list[dict[str, Any]]:
        """``agentctl sets``: per set its ENIs (with their groups as EC2 has them), addresses
        total/assigned/cooling/free, pods, waiting ADDs and the latest refusal. ``enis`` are
        the provider's ENI records, ``pods`` the pod names by set key."""
        now = self.clock()
        counts = {c.owner: c for c in self.pool.owner_counts(now)}
        keys = {e.group for e in enis if e.group} | set(self.waiting()) | set(pods)
        keys |= set(self._refused)
        rows = []
        for key in sorted(keys):
            mine = [e for e in enis if e.group == key]
            c = [counts[e.eni_id] for e in mine if e.eni_id in counts]
            total = sum(x.total for x in c)
            assigned = sum(x.assigned for x in c)
            cooling = sum(x.cooling for x in c)
            rows.append(
                {
                    "set": key,
                    "groups": key.split(","),
                    "enis": [
                        {
                            "eni": e.eni_id,
                            "device": e.device_index,
                            "table": e.table,
                            "groups": list(e.security_groups),
                        }
                        for e in mine
                    ],
                    "total": total,
                    "assigned": assigned,
                    "cooling": cooling,
                    "free": total - assigned - cooling,
                    "pods": sorted(pods.get(key, [])),
                    "waiting": self._waiting.get(key, 0),
                    "refused": self._refused.get(key, ""),
                    "last_release_s": _ago(self.pool.last_release(key), now),
                }
            )
        return rows


def _ago(t: float | None, now: float) -> float | None:
    return None if t is None else round(max(0.0, now - t), 1)
