"""Deleting host veths for DEL, GC and failed ADDs: shared kernel deletions, answered as soon as
the links are gone from their namespaces.

Theory of operation. The kernel deletes a link in two phases (netlink/veth.py): under the rtnl
lock it unlists the link from its namespace (a veth with its peer, their addresses and routes)
and broadcasts RTM_DELLINK, ~1-4 ms; then, with the lock released, the request waits ~15-20 ms
for RCU before it is acknowledged. A DEL needs only the first phase: once the links are unlisted
the pod's netns holds nothing of ours and the names are free again. So:

- ``delete(names)`` queues the names and returns when each is gone: reported by the node's
  netlink watcher (``on_events``: RTM_DELLINK of the ifindex the round parked), by the round's
  acknowledgement when no broadcast was seen, or at once for a name no link has.
- ``run`` starts a round with everything queued as soon as the previous round's links are gone
  and one of ``lanes`` link groups is free: DELs arriving while the kernel unlists one round
  share the next; a lone DEL starts at once, with no waiting window. Rounds in their RCU wait
  overlap, each in its own link group.
- A round parks its links (moves them into its group, learning their ifindex), then deletes
  the group. A name counts as in flight until its link is parked or known absent, so an ADD
  about to create a link of that name (``wait_for``) never has it taken by an older round.
- A failed round hands its error to the callers whose link still exists; the others succeed.
  Without ``run`` (not started yet, or stopped), ``delete`` runs a round itself, unshared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import anyio
import anyio.abc
import attrs

from netlink.errors import NetlinkError
from netlink.veth import DELETE_GROUP, DELETE_LANES
from netlink.watcher import Event, LinkEvent

log = logging.getLogger("podwire.deleter")


class LinkDeletion(Protocol):
    """The datapath's two halves of a group deletion, as agent.cni.datapath runs them."""

    async def park_links(
        self, names: list[str], group: int
    ) -> tuple[dict[str, int], Mapping[str, Exception]]: ...
    async def delete_parked(self, names: list[str], group: int) -> None: ...
    async def link_exists(self, name: str) -> bool: ...


class DeleterStopped(NetlinkError):
    """The agent stopped before this link's deletion could start."""

    def __init__(self) -> None:
        super().__init__("link deletion did not start before the agent stopped")


@attrs.define(eq=False)
class _Entry:
    """One name in flight; ``gone`` is set once its link is gone (or could not be deleted)."""

    name: str
    gone: anyio.Event = attrs.field(factory=anyio.Event)
    error: Exception | None = None


@attrs.define(eq=False)
class _Round:
    group: int
    by_index: dict[int, _Entry] = attrs.field(factory=dict)  # parked links not yet seen gone
    unlisted: anyio.Event = attrs.field(factory=anyio.Event)  # all gone, or the round ended


class LinkDeleter:
    """Deletes host links in shared rounds (see the module docstring)."""

    def __init__(self, datapath: LinkDeletion, *, lanes: int = DELETE_LANES) -> None:
        if not 1 <= lanes <= DELETE_LANES:
            raise ValueError(f"lanes must be 1..{DELETE_LANES}")
        self._dp = datapath
        self._free = [DELETE_GROUP + 1 + i for i in range(lanes)]
        self._lane_freed = anyio.Event()
        self._inflight: dict[str, _Entry] = {}
        self._queue: dict[_Entry, None] = {}  # insertion-ordered set
        self._wake = anyio.Event()
        self._rounds: list[_Round] = []
        self._running = False
        self.rounds = 0
        self.links = 0
        # Set by whoever feeds ``on_events`` (the watcher's poke): called when a round starts
        # waiting for its broadcasts, so that a watcher sleeping out a window reads them now.
        self.poke: Callable[[], None] = lambda: None

    def __repr__(self) -> str:
        return (
            f"<LinkDeleter inflight={len(self._inflight)} queued={len(self._queue)} "
            f"rounds={self.rounds} links={self.links} free_lanes={len(self._free)}>"
        )

    # -- callers --

    async def delete(self, names: Iterable[str]) -> None:
        """Return once no link of these names exists. Raises the error of a failed round
        when the link is still there. The names are queued before the first await."""
        entries = [self._enter(n) for n in dict.fromkeys(names)]
        if not entries:
            return
        if not self._running:
            mine = [e for e in entries if e in self._queue]
            for e in mine:
                del self._queue[e]
            if mine:
                await self._round(_Round(await self._take_lane()), mine)
        for e in entries:
            await e.gone.wait()
        for e in entries:
            if e.error is not None and await self._dp.link_exists(e.name):
                raise e.error

    async def wait_for(self, name: str) -> None:
        """Return once no round can still take a link called ``name`` (an ADD, before it
        creates one)."""
        entry = self._inflight.get(name)
        if entry is not None:
            await entry.gone.wait()

    def wanted(self) -> bool:
        """Whether a round waits for its links' RTM_DELLINK (the watcher reads at once then)."""
        return any(r.by_index for r in self._rounds)

    def on_events(self, events: Sequence[Event]) -> None:
        """Watcher callback, called as events are read: settle links whose deletion was seen."""
        for e in events:
            if not isinstance(e, LinkEvent) or e.kind != "del":
                continue
            for r in self._rounds:
                entry = r.by_index.pop(e.index, None)
                if entry is not None:
                    self._settle(entry)
                    if not r.by_index:
                        r.unlisted.set()
                    break

    def _enter(self, name: str) -> _Entry:
        entry = self._inflight.get(name)
        if entry is None:
            entry = self._inflight[name] = _Entry(name)
            self._queue[entry] = None
            self._wake.set()
        return entry

    def _settle(self, entry: _Entry, error: Exception | None = None) -> None:
        if entry.gone.is_set():
            return
        entry.error = error
        entry.gone.set()
        if self._inflight.get(entry.name) is entry:
            del self._inflight[entry.name]

    # -- rounds --

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run rounds until cancelled; what is still queued then fails with DeleterStopped."""
        try:
            async with anyio.create_task_group() as tg:
                self._running = True
                task_status.started()
                while True:
                    if not self._queue:
                        await self._wake.wait()
                        self._wake = anyio.Event()
                        continue
                    round_ = _Round(await self._take_lane())
                    batch, self._queue = list(self._queue), {}
                    tg.start_soon(self._round, round_, batch)
                    # Let the kernel unlist this round before starting the next: the DELs
                    # arriving meanwhile share the next round.
                    await round_.unlisted.wait()
        finally:
            self._running = False
            batch, self._queue = list(self._queue), {}
            for entry in batch:
                self._settle(entry, DeleterStopped())

    async def _take_lane(self) -> int:
        while not self._free:
            await self._lane_freed.wait()
        return self._free.pop(0)

    def _give_lane(self, group: int) -> None:
        self._free.append(group)
        freed, self._lane_freed = self._lane_freed, anyio.Event()
        freed.set()

    async def _round(self, round_: _Round, batch: list[_Entry]) -> None:
        try:
            # Shielded: links once parked must be deleted, not left in the group.
            with anyio.CancelScope(shield=True):
                await self._park_and_delete(round_, batch)
        finally:
            if round_ in self._rounds:
                self._rounds.remove(round_)
            round_.unlisted.set()
            self._give_lane(round_.group)

    async def _park_and_delete(self, round_: _Round, batch: list[_Entry]) -> None:
        names = [e.name for e in batch]
        try:
            parked, refused = await self._dp.park_links(names, round_.group)
        except Exception as e:
            log.error("link deletion failed", extra={"links": len(names), "error": str(e)})
            for entry in batch:
                self._settle(entry, e)
            return
        for entry in batch:
            if entry.name not in parked:  # no such link, or the kernel refused to move it
                self._settle(entry, refused.get(entry.name))
        for name, err in refused.items():
            log.warning("link deletion refused", extra={"link": name, "error": str(err)})
        if not parked:
            return
        by_name = {e.name: e for e in batch}
        round_.by_index = {index: by_name[name] for name, index in parked.items()}
        self._rounds.append(round_)
        self.poke()
        self.rounds += 1
        self.links += len(parked)
        error: Exception | None = None
        try:
            await self._dp.delete_parked(list(parked), round_.group)
        except Exception as e:
            error = e
            log.error("link deletion failed", extra={"links": len(parked), "error": str(e)})
        for entry in round_.by_index.values():
            self._settle(entry, error)
        round_.by_index.clear()
