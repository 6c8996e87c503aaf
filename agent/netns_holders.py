"""Facts about pod network namespaces read from /proc and the mount table, for GC.

A namespace is named by its nsfs inode: ``stat()`` of a bind mount (``/run/netns/x``) and of
``/proc/<pid>/ns/net`` give the same (st_dev, st_ino) for the same namespace. A path that exists
but is not on nsfs is a leftover file whose mount is gone: not a namespace. Only each process's
main thread is looked at (``/proc/<pid>/ns/net``): the pause process of a sandbox is what holds
its namespace, and threads that enter a namespace for a moment (the agent's own) are not owners.
Everything here blocks: call it from a worker thread.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath

import attrs

NsId = tuple[int, int]  # (st_dev, st_ino) of the nsfs inode
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


@attrs.frozen(kw_only=True)
class NetnsFact:
    """What one namespace path looked like: gone, or present and maybe held by a process."""

    exists: bool
    held: bool = False
    ident: NsId | None = None


def _nsfs_dev() -> int:
    return os.stat("/proc/self/ns/net").st_dev


def netns_id(path: str) -> NsId | None:
    """Return the namespace ``path`` names, or None when it is gone or not a namespace."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    if st.st_dev != _nsfs_dev():
        return None
    return st.st_dev, st.st_ino


def held_netns(proc: str = "/proc") -> frozenset[NsId]:
    """Return every namespace some process's main thread is in now."""
    held: set[NsId] = set()
    try:
        entries = os.scandir(proc)
    except FileNotFoundError:
        return frozenset()
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                st = os.stat(f"{proc}/{entry.name}/ns/net")
            except OSError:  # the process exited, or is a kernel thread we may not read
                continue
            held.add((st.st_dev, st.st_ino))
    return frozenset(held)


def probe(paths: Iterable[str], proc: str = "/proc") -> Mapping[str, NetnsFact]:
    """Return a NetnsFact for each path; one scan of ``proc`` for all of them."""
    held = held_netns(proc)
    facts: dict[str, NetnsFact] = {}
    for path in paths:
        ident = netns_id(path)
        facts[path] = NetnsFact(exists=ident is not None, held=ident in held, ident=ident)
    return facts


def under(path: str, dirs: Iterable[str]) -> bool:
    """Return whether ``path`` is directly inside one of ``dirs`` (no ``..`` tricks)."""
    p = PurePosixPath(path)
    if ".." in p.parts or not p.is_absolute():
        return False
    return any(p.parent == PurePosixPath(d) for d in dirs)


class UnmountRefused(Exception):
    """The path is not a namespace mount inside an allowed directory: never touched."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"refusing to unmount {path}: {reason}")
        self.path = path
        self.reason = reason


def remove_netns_mount(path: str, dirs: Iterable[str]) -> bool:
    """Detach the namespace bind mount at ``path`` and remove the file; False if already gone.

    Raises UnmountRefused when ``path`` (resolved) is not directly inside ``dirs``, and
    OSError when the kernel refuses.
    """
    real = os.path.realpath(path)
    allowed = [os.path.realpath(d) for d in dirs]
    if not (under(path, dirs) and under(real, allowed)):
        raise UnmountRefused(path, "outside the namespace directories")
    if not os.path.lexists(real):
        return False
    if netns_id(real) is not None and _libc.umount2(real.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), real)
    os.unlink(real)
    return True
