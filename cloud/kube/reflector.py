"""Keeping a ``Store`` current with the API server: list, then watch, for as long as it runs.

Theory of operation. One recovery path, used for everything: a complete, consistent list
(``ListWatch.list``: one response, never pages, so it is whole or it is an error) replaces the
store, then a watch from the list's resourceVersion applies every event. The server ends each
watch request after about ``session`` seconds (jittered) and the next one resumes from the last
resourceVersion seen, with no list. Anything else that ends a watch leads back to a list:

* ``Expired`` (410 Gone: the server no longer has the history from our resourceVersion, after a
  compaction, or an API server restart with a fresh cache) — list again at once;
* any other ``KubeError`` (connection refused or reset, timeouts, 5xx, 401/403) — the store is
  kept as it is and keeps answering readers (``connected`` turns False), and the list is tried
  again after a jittered, doubling delay (``retry_base`` .. ``retry_cap``).

A client-side deadline, ``SILENCE`` seconds past the server's, bounds how long a connection
that died silently (no FIN, no RST) can hold a watch. Because a list only ever replaces the
store whole, an object is reported gone only when a complete answer lacks it, or a watch says
it was deleted; never because a request failed half-way. Readers get each batch of changes
through ``on_change`` as it is applied (the first, full one when the first list lands).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import Any, Generic, Protocol, TypeVar

import anyio
import anyio.abc
import attrs

from cloud.kube.errors import Expired, Forbidden, KubeError
from cloud.kube.store import Change, Object, Store, WatchEvent

log = logging.getLogger("podwire.kube")

T = TypeVar("T", bound=Object)

SILENCE = 60.0  # seconds past a watch's server-side timeout before it is taken for dead


class ListWatch(Protocol[T]):
    """One collection of the API (a resource, maybe a namespace, maybe a field selector)."""

    async def list(self) -> tuple[Sequence[T], str]:
        """The whole collection and the resourceVersion it is current at; raises KubeError."""
        ...

    def watch(self, resource_version: str, timeout: int) -> AsyncGenerator[WatchEvent[T], None]:
        """Events after ``resource_version``, until cancelled. The server ends each watch
        request after ``timeout`` seconds and the source makes the next one from the last
        resourceVersion by itself. Raises KubeError (Expired for 410 Gone)."""
        ...


@attrs.define(kw_only=True)
class WatchStatus:
    """What ``agentctl kube`` shows of one watch."""

    name: str
    synced: bool = False  # a complete list has landed (the store holds a whole view)
    connected: bool = False  # the last list or watch request succeeded
    resource_version: str = ""
    objects: int = 0
    lists: int = 0
    expired: int = 0  # 410 Gone answers (each followed by a list)
    errors: int = 0
    events: int = 0
    last_error: str = ""
    last_error_at: float | None = None
    disconnected_since: float | None = None  # wall clock, while not connected

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class Reflector(Generic[T]):
    """Runs one ``ListWatch`` into a ``Store`` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        source: ListWatch[T],
        store: Store[T] | None = None,
        *,
        on_change: Callable[[Reflector[T], list[Change[T]]], None] = lambda r, c: None,
        session: float = 300.0,
        retry_base: float = 1.0,
        retry_cap: float = 30.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.source = source
        self.store: Store[T] = store if store is not None else Store()
        self.on_change = on_change
        self.session = session
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.wall = wall
        self.status = WatchStatus(name=name)
        self.synced = anyio.Event()

    def __repr__(self) -> str:
        s = self.status
        state = "connected" if s.connected else "disconnected"
        return f"<Reflector {self.name} {state} synced={s.synced} {self.store!r}>"

    def _changed(self, changes: list[Change[T]], *, force: bool = False) -> None:
        self.status.objects = len(self.store)
        self.status.resource_version = self.store.resource_version or ""
        if changes or force:
            self.on_change(self, changes)

    def _connected(self) -> None:
        self.status.connected = True
        self.status.disconnected_since = None

    def _failed(self, e: KubeError) -> None:
        s = self.status
        s.errors += 1
        first = s.connected or s.last_error != str(e)
        s.connected = False
        s.last_error, s.last_error_at = str(e), self.wall()
        if s.disconnected_since is None:
            s.disconnected_since = s.last_error_at
        if first:
            level = logging.ERROR if isinstance(e, Forbidden) else logging.WARNING
            log.log(
                level,
                "kubernetes watch of %s failed; serving from the cache, retrying: %s",
                self.name,
                e,
            )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Reflector[T]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """List and watch until cancelled; ``task_status.started`` is called at once (readers
        wait on ``synced`` when they need a complete view)."""
        task_status.started(self)
        delay = self.retry_base
        while True:
            try:
                objects, rv = await self.source.list()
            except KubeError as e:
                self._failed(e)
                await anyio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.retry_cap)
                continue
            self.status.lists += 1
            self._connected()
            # readers hear of the first list even when it is empty (they wait for a view)
            self._changed(self.store.replace(objects, rv), force=not self.status.synced)
            if not self.status.synced:
                log.info("kubernetes watch of %s synced: %d objects", self.name, len(objects))
            self.status.synced = True
            self.synced.set()
            delay = self.retry_base
            events = self.status.events
            try:
                await self._watch()
            except Expired as e:
                self.status.expired += 1
                log.info("kubernetes watch of %s expired (%s); listing again", self.name, e)
                if self.status.events == events:
                    # expired before a single event: never spin on a server that keeps saying so
                    await anyio.sleep(self.retry_base * random.uniform(0.5, 1.0))
            except KubeError as e:
                self._failed(e)
                await anyio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.retry_cap)

    async def _watch(self) -> None:
        """Watch sessions, each resuming where the last ended, until an error ends them."""
        while True:
            rv = self.store.resource_version or ""
            # the server ends each watch request (jittered, so a fleet does not reconnect in
            # step); the client-side deadline only catches a connection that died in silence
            timeout = max(1, round(self.session * random.uniform(0.8, 1.0)))
            with anyio.move_on_after(timeout + SILENCE):
                async with aclosing(self.source.watch(rv, timeout)) as events:
                    async for event in events:
                        self.status.events += 1
                        self._connected()
                        self._changed(self.store.apply(event))
