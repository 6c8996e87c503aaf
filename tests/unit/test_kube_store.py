"""The store of one watch: a complete list replaces it (the difference is what changed), watch
events apply one by one; nothing but a complete list or a DELETED event removes an object."""

from __future__ import annotations

from cloud.kube.store import ChangeKind, EventType, Store, WatchEvent
from tests.unit.kube_fakes import pod


def changes(cs: list) -> list[tuple[str, tuple[str, str]]]:
    return [(c.kind.value, c.key) for c in cs]


def rv(p, v: str):
    import attrs

    return attrs.evolve(p, resource_version=v)


def test_first_list_adds_everything() -> None:
    s: Store = Store()
    out = s.replace([rv(pod("a"), "5"), rv(pod("b"), "6")], "10")
    assert changes(out) == [("added", ("default", "a")), ("added", ("default", "b"))]
    assert s.resource_version == "10" and len(s) == 2


def test_relist_reports_exactly_the_difference() -> None:
    s: Store = Store()
    s.replace([rv(pod("keep"), "1"), rv(pod("gone"), "2"), rv(pod("edit"), "3")], "3")
    out = s.replace(
        [
            rv(pod("keep"), "1"),
            rv(pod("edit", labels={"x": "y"}), "7"),
            rv(pod("new"), "8"),
        ],
        "9",
    )
    assert sorted(changes(out)) == [
        ("added", ("default", "new")),
        ("deleted", ("default", "gone")),
        ("modified", ("default", "edit")),
    ]
    (mod,) = [c for c in out if c.kind is ChangeKind.MODIFIED]
    assert mod.old is not None and mod.new is not None and mod.new.labels == {"x": "y"}
    assert s.get(("default", "keep")) is not None and ("default", "gone") not in s


def test_relist_of_an_unchanged_world_changes_nothing() -> None:
    s: Store = Store()
    items = [rv(pod(f"p{i}"), str(i)) for i in range(20)]
    s.replace(items, "20")
    assert s.replace(items, "35") == []
    assert s.resource_version == "35"


def test_same_name_new_uid_is_deleted_then_added() -> None:
    s: Store = Store()
    s.replace([rv(pod("sts-0", uid="u1"), "1")], "1")
    out = s.replace([rv(pod("sts-0", uid="u2"), "4")], "4")
    assert changes(out) == [("deleted", ("default", "sts-0")), ("added", ("default", "sts-0"))]
    assert out[0].old.uid == "u1" and out[1].new.uid == "u2"


def test_events() -> None:
    s: Store = Store()
    s.replace([], "1")
    a = rv(pod("a"), "2")
    assert changes(s.apply(WatchEvent(type=EventType.ADDED, obj=a, resource_version="2"))) == [
        ("added", ("default", "a"))
    ]
    # a repeat of what the store has (a resumed watch) is no change
    assert s.apply(WatchEvent(type=EventType.MODIFIED, obj=a, resource_version="2")) == []
    b = rv(pod("a", labels={"k": "v"}), "3")
    assert changes(s.apply(WatchEvent(type=EventType.ADDED, obj=b, resource_version="3"))) == [
        ("modified", ("default", "a"))
    ]
    assert s.apply(WatchEvent(type=EventType.BOOKMARK, obj=None, resource_version="9")) == []
    assert s.resource_version == "9"
    # the deletion of an older incarnation does not remove the current one
    old = rv(pod("a", uid="other"), "10")
    assert s.apply(WatchEvent(type=EventType.DELETED, obj=old, resource_version="10")) == []
    assert changes(s.apply(WatchEvent(type=EventType.DELETED, obj=b, resource_version="11"))) == [
        ("deleted", ("default", "a"))
    ]
    unknown = rv(pod("zz"), "12")
    assert s.apply(WatchEvent(type=EventType.DELETED, obj=unknown, resource_version="12")) == []
    assert len(s) == 0 and s.resource_version == "12"


def test_same_hides_what_readers_do_not_look_at() -> None:
    s: Store = Store(same=lambda x, y: x.labels == y.labels)
    s.replace([rv(pod("a", phase="Pending"), "1")], "1")
    running = rv(pod("a", phase="Running"), "2")
    assert s.apply(WatchEvent(type=EventType.MODIFIED, obj=running, resource_version="2")) == []
    assert s.get(("default", "a")).phase == "Running"  # kept current all the same
