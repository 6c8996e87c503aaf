"""The reflector against an in-memory API on trio's virtual clock: it resumes after cut
connections and an API server that is down, lists again after 410 Gone, keeps serving its
cache meanwhile, and never reports a live object as deleted (EKS's resource controller deleted
running pods' branches when a list failed half-way: its issues #10 and #412)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from cloud.kube.objects import PodInfo
from cloud.kube.reflector import Reflector
from cloud.kube.store import Change, ChangeKind
from tests.unit.kube_fakes import FakeApi, FakeCollection, pod

pytestmark = pytest.mark.trio


class Recorder:
    def __init__(self) -> None:
        self.changes: list[Change[Any]] = []

    def __call__(self, r: Reflector[Any], changes: list[Change[Any]]) -> None:
        self.changes.extend(changes)

    def deleted(self) -> list[str]:
        return [c.key[1] for c in self.changes if c.kind is ChangeKind.DELETED]

    def added(self) -> list[str]:
        return [c.key[1] for c in self.changes if c.kind is ChangeKind.ADDED]


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def make(api: FakeApi, **kw: Any) -> tuple[Reflector[PodInfo], FakeCollection[PodInfo], Recorder]:
    coll: FakeCollection[PodInfo] = FakeCollection(api, lambda o: o.node_name == "n1")
    rec = Recorder()
    opts = {"session": 300.0, "retry_base": 1.0, "retry_cap": 8.0, **kw}
    return Reflector("pods", coll, on_change=rec, **opts), coll, rec


async def test_list_then_watch(autojump_clock: trio.testing.MockClock) -> None:
    api = FakeApi()
    api.put(pod("a"))
    api.put(pod("elsewhere", node="n2"))
    r, coll, rec = make(api)
    async with trio.open_nursery() as n:
        await n.start(r.run)
        await r.synced.wait()
        assert rec.added() == ["a"] and r.status.synced and r.status.connected
        api.put(pod("b"))
        api.put(pod("a", labels={"app": "x"}))
        api.delete(("default", "b"))
        await settle()
        assert [(c.kind.value, c.key[1]) for c in rec.changes] == [
            ("added", "a"),
            ("added", "b"),
            ("modified", "a"),
            ("deleted", "b"),
        ]
        assert r.store.resource_version == str(api.rv)
        assert coll.lists == 1 and r.status.events == 3
        n.cancel_scope.cancel()


async def test_cut_connection_lists_again_and_reports_only_real_changes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = FakeApi()
    for name in ("live1", "live2", "doomed"):
        api.put(pod(name))
    r, coll, rec = make(api)
    async with trio.open_nursery() as n:
        await n.start(r.run)
        await r.synced.wait()
        api.down = True
        api.cut()
        await settle()
        assert not r.status.connected and r.status.errors >= 1
        # the cache keeps answering while the server is away
        assert {p.name for p in r.store} == {"live1", "live2", "doomed"}
        api.down = False
        api.delete(("default", "doomed"))
        api.put(pod("born"))
        await r_wait(r, lambda: r.status.connected)
        await settle()
        assert rec.deleted() == ["doomed"]
        assert {p.name for p in r.store} == {"live1", "live2", "born"}
        assert coll.lists == 2
        n.cancel_scope.cancel()


async def r_wait(r: Reflector[Any], cond: Any) -> None:
    while not cond():
        await trio.sleep(0.1)


async def test_expired_lists_again_without_losing_a_live_pod(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = FakeApi()
    for i in range(30):
        api.put(pod(f"live{i}"))
    api.put(pod("doomed"))
    r, _coll, rec = make(api)
    async with trio.open_nursery() as n:
        await n.start(r.run)
        await r.synced.wait()
        api.down = True  # the agent misses what happens now ...
        api.cut()
        await settle()
        api.delete(("default", "doomed"))
        api.put(pod("born"))
        api.put(pod("live3", labels={"edited": "yes"}))
        api.compact()  # ... and the server forgets it
        api.down = False
        await r_wait(r, lambda: r.status.connected and "born" in {p.name for p in r.store})
        await settle()
        assert rec.deleted() == ["doomed"]
        assert sorted(rec.added())[-1] == "live9" and "born" in rec.added()
        assert {p.name for p in r.store} == {f"live{i}" for i in range(30)} | {"born"}
        assert r.store.get(("default", "live3")).labels == {"edited": "yes"}
        n.cancel_scope.cancel()


async def test_a_long_outage_is_one_list_with_everything_it_missed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = FakeApi(history=3)
    api.put(pod("keep"))
    r, coll, rec = make(api)
    async with trio.open_nursery() as n:
        await n.start(r.run)
        await r.synced.wait()
        api.cut()  # the watch breaks; while it is away, more happens than the server keeps
        api.down = True
        await settle()
        for i in range(5):
            api.put(pod(f"burst{i}"))
        api.down = False
        await r_wait(r, lambda: len(r.store) == 6)
        assert rec.deleted() == [] and coll.lists >= 2
        n.cancel_scope.cancel()


async def test_server_410_on_resume_counts_and_relists(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = FakeApi()
    api.put(pod("keep"))
    r, coll, rec = make(api, session=60.0)
    async with trio.open_nursery() as n:
        await n.start(r.run)
        await r.synced.wait()
        # sessions end on time and resume from the last resourceVersion: no list
        await trio.sleep(200)
        assert coll.lists == 1 and coll.watches >= 3
        assert set(coll.watch_from) == {str(api.rv)}
        # the history is gone by the next session: 410, then one list
        api.put(pod("new"))
        api.compact()
        await trio.sleep(61)
        await settle()
        assert r.status.expired == 1 and coll.lists == 2
        assert rec.deleted() == [] and {p.name for p in r.store} == {"keep", "new"}
        n.cancel_scope.cancel()


async def test_backoff_doubles_to_the_cap_while_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = FakeApi()
    api.down = True
    r, _coll, _rec = make(api, retry_base=1.0, retry_cap=8.0)
    async with trio.open_nursery() as n:
        await n.start(r.run)
        await trio.sleep(60)
        # delays are drawn in [d/2, d] for d = 1, 2, 4, 8, 8, ...: in 60 s, between 8 and 16 tries
        assert 8 <= r.status.errors <= 16
        assert not r.status.synced and r.status.disconnected_since is not None
        assert "connection refused" in r.status.last_error
        api.down = False
        await r.synced.wait()
        assert r.status.connected and r.status.disconnected_since is None
        n.cancel_scope.cancel()


async def test_expired_at_once_does_not_spin(autojump_clock: trio.testing.MockClock) -> None:
    api = FakeApi()
    r, coll, _rec = make(api)

    async def always_expired(rv: str, timeout: int) -> Any:
        from cloud.kube.errors import Expired

        raise Expired("watch", "too old")
        yield  # pragma: no cover

    coll.watch = always_expired  # type: ignore[method-assign]
    async with trio.open_nursery() as n:
        await n.start(r.run)
        await trio.sleep(10)
        # each 410 before any event waits retry_base/2..retry_base: at most ~20 lists in 10 s
        assert 10 <= coll.lists <= 21
        n.cancel_scope.cancel()
