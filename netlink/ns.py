"""Entering network namespaces from a worker thread.

setns(2) switches only the calling thread, so blocking netlink work for a pod runs in a worker
thread that enters the pod's namespace, does its work and always switches back (``finally``).
This replaces pyroute2's ``netns=``, which forks a helper process per object (~10-20 ms, and a
fork inside a threaded daemon).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator, Sequence

from netlink.errors import NetlinkError, NetnsNotFound, NotANetns

CLONE_NEWNET = 0x40000000
NSFS_MAGIC = 0x6E736673

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_netns(path: str) -> int:
    """Open ``path`` as a network namespace and return an O_CLOEXEC descriptor.

    Raises NetnsNotFound when the path is missing and NotANetns when it is something else.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFound(path) from None
    except IsADirectoryError:
        raise NotANetns(path) from None
    except OSError as e:
        raise NotANetns(path) from e
    try:
        # /proc/<pid>/ns/net and bind mounts of it live on nsfs; anything else is not a netns.
        if _fstatfs_type(fd) != NSFS_MAGIC:
            raise NotANetns(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.POINTER(_Statfs))


def _fstatfs_type(fd: int) -> int:
    buf = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF


def is_netns_of(path: str, fds: Sequence[int]) -> bool:
    """Return whether ``path`` names the same namespace as one of ``fds`` (same nsfs inode);
    False when ``path`` cannot be looked at (the caller's open reports why)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    for fd in fds:
        other = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino):
            return True
    return False


def current_netns_fd() -> int:
    """Return a descriptor of the calling thread's current network namespace."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def entered(fd: int) -> Iterator[None]:
    """Run the body with the calling thread inside the namespace ``fd``; switch back after.

    For worker threads (``anyio.to_thread.run_sync``). The event loop's thread may enter only
    for a body that never awaits (``Datapath.wire`` opening its pod-side socket): no other task
    may run while it is elsewhere. If switching back fails the thread is unusable, so that is
    fatal.
    """
    home = current_netns_fd()
    try:
        try:
            _setns(fd)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise NotANetns(f"fd {fd}") from e
            raise NetlinkError(f"setns failed: {e}") from e
        try:
            yield
        finally:
            try:
                _setns(home)
            except OSError as e:  # pragma: no cover - would leave a thread in a pod's netns
                os.write(2, f"podwire: cannot return to home netns: {e}\n".encode())
                os._exit(70)
    finally:
        os.close(home)


@contextlib.contextmanager
def entered_path(path: str) -> Iterator[None]:
    """Like ``entered`` but opens ``path`` first (raising NetnsNotFound / NotANetns)."""
    fd = open_netns(path)
    try:
        with entered(fd):
            yield
    finally:
        os.close(fd)
