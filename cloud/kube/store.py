"""One watched collection of Kubernetes objects: events in, the objects and what changed out.

Theory of operation. A ``Store`` holds the objects of one list+watch by key (namespace, name) and
the resourceVersion they are current at. It changes in exactly two ways, both pure:

* ``replace(objects, rv)`` — a complete list, as the API server answered it at ``rv``. The
  store becomes that list; what changed is the difference: keys new to the store are added,
  keys whose object differs are modified (a different uid means the object was deleted and
  re-created under the same name: reported as deleted, then added), and keys the list lacks are
  deleted. Only a complete list may replace the store: a partial one would report live objects
  as gone, which is how EKS's resource controller deleted running pods' branch ENIs when a list
  failed half-way (its issues #10 and #412). The shell therefore only ever passes one whole
  list response, never pages.
* ``apply(event)`` — one watch event (ADDED, MODIFIED, DELETED, BOOKMARK). ADDED of a key
  already held is a modification (a watch that resumed may repeat what a list already gave),
  DELETED of a key not held changes nothing, BOOKMARK only moves the resourceVersion.

Both return the changes as a list of ``Change`` (empty when nothing a reader would see moved);
the caller derives what it needs from them (the pods whose groups may have changed, the node's
new pod CIDRs, ...). Nothing here knows about I/O, time or retries.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar

import attrs

from cloud.kube.objects import Key


class Object(Protocol):
    @property
    def key(self) -> Key: ...
    @property
    def uid(self) -> str: ...
    @property
    def resource_version(self) -> str: ...


T = TypeVar("T", bound=Object)


class EventType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"


@attrs.frozen(kw_only=True)
class WatchEvent(Generic[T]):
    """One event of a watch; ``obj`` is None for a BOOKMARK (only ``resource_version``)."""

    type: EventType
    obj: T | None
    resource_version: str


class ChangeKind(enum.Enum):
    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"


@attrs.frozen(kw_only=True)
class Change(Generic[T]):
    kind: ChangeKind
    key: Key
    old: T | None = None
    new: T | None = None


class Store(Generic[T]):
    """The objects of one watch (see the module docstring)."""

    def __init__(self, *, same: Callable[[T, T], bool] | None = None) -> None:
        # ``same``: whether two versions of an object look alike to readers (default: equal),
        # so a status-only update of a pod is not reported as a change
        self._same = same or (lambda a, b: a == b)
        self._items: dict[Key, T] = {}
        self.resource_version: str | None = None

    def __repr__(self) -> str:
        return f"<Store {len(self._items)} objects rv={self.resource_version}>"

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def get(self, key: Key) -> T | None:
        return self._items.get(key)

    def keys(self) -> list[Key]:
        return list(self._items)

    def _put(self, new: T) -> list[Change[T]]:
        old = self._items.get(new.key)
        self._items[new.key] = new
        if old is None:
            return [Change(kind=ChangeKind.ADDED, key=new.key, new=new)]
        if old.uid != new.uid:
            return [
                Change(kind=ChangeKind.DELETED, key=new.key, old=old),
                Change(kind=ChangeKind.ADDED, key=new.key, new=new),
            ]
        if self._same(old, new):
            return []
        return [Change(kind=ChangeKind.MODIFIED, key=new.key, old=old, new=new)]

    def replace(self, objects: Iterable[T], resource_version: str) -> list[Change[T]]:
        """Become the complete list ``objects`` (current at ``resource_version``); return what
        changed."""
        listed = {o.key: o for o in objects}
        changes: list[Change[T]] = []
        for key in [k for k in self._items if k not in listed]:
            changes.append(Change(kind=ChangeKind.DELETED, key=key, old=self._items.pop(key)))
        for obj in listed.values():
            changes.extend(self._put(obj))
        self.resource_version = resource_version
        return changes

    def apply(self, event: WatchEvent[T]) -> list[Change[T]]:
        """Apply one watch event; return what changed."""
        self.resource_version = event.resource_version or self.resource_version
        obj = event.obj
        if event.type is EventType.BOOKMARK or obj is None:
            return []
        if event.type is EventType.DELETED:
            old = self._items.get(obj.key)
            if old is None or (obj.uid and old.uid != obj.uid):
                return []  # not held (or an older incarnation's deletion)
            del self._items[obj.key]
            return [Change(kind=ChangeKind.DELETED, key=obj.key, old=old)]
        return self._put(obj)
