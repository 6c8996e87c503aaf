"""Loading the 802.1Q programs and attaching them with tc.

Programs are loaded with the bpf(2) syscall (no toolchain, no bpffs pin). tc's clsact qdisc
and the direct-action ``bpf`` filter are set over the caller's rtnetlink socket (``netlink.rtnl``:
it decides the namespace); the filter holds the program once attached, so the file descriptor
is closed at once, and nothing outlives the link it is attached to.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from netlink.dot1q import tc
from netlink.dot1q.tc import BpfFilter, Direction
from netlink.errors import ProgramRefused
from netlink.rtnl import Rtnl

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SCHED_CLS = 3
_ATTR_SIZE = 128
_LOG_SIZE = 1 << 16
_OBJ_NAME_LEN = 15  # BPF_OBJ_NAME_LEN - 1: [A-Za-z0-9_.] only

_libc = ctypes.CDLL(None, use_errno=True)
_TRIVIAL = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def load(program: bytes, name: str) -> int:
    """Load a SCHED_CLS program called ``name`` (an object name: at most 15 of
    ``[A-Za-z0-9_.]``); return its fd. Raises ProgramRefused with the verifier's log."""
    if _SYS_BPF is None:
        raise ProgramRefused(name, errno.ENOSYS, f"no bpf syscall number for {platform.machine()}")
    insns = ctypes.create_string_buffer(program, len(program))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into(
        "<IIQQIIQ",
        attr,
        0,
        _BPF_PROG_TYPE_SCHED_CLS,
        len(program) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license),
        1,  # log level: the verifier says why it refuses
        _LOG_SIZE,
        ctypes.addressof(log),
    )
    encoded = name.encode()[:_OBJ_NAME_LEN]
    attr[48 : 48 + len(encoded)] = encoded
    buf = ctypes.create_string_buffer(bytes(attr), _ATTR_SIZE)
    fd = int(_libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, buf, _ATTR_SIZE))
    if fd < 0:
        err = ctypes.get_errno()
        raise ProgramRefused(name, err, log.value.decode(errors="replace")[-2000:])
    return fd


def can_load() -> str:
    """Why this process cannot load tc programs ("" when it can): a trivial one is loaded and
    dropped again; nothing is attached anywhere."""
    try:
        os.close(load(_TRIVIAL, "pw_probe"))
    except ProgramRefused as e:
        return str(e)
    return ""


def attach(
    rtnl: Rtnl, ifindex: int, direction: Direction, program: bytes, name: str, label: str
) -> None:
    """Run ``program`` (object name ``name``) on ``direction`` of link ``ifindex`` in the
    socket's namespace, replacing ours there atomically; the filter is called ``label``.
    Raises ProgramRefused, RequestFailed."""
    fd = load(program, name)
    try:
        requests = [tc.add_clsact(ifindex), tc.set_filter(ifindex, direction, fd, label)]
        replies = rtnl.transact(requests)
    finally:
        os.close(fd)
    for req, reply in zip(requests, replies, strict=True):
        if reply.error:
            raise reply.failure(req.op)


def detach(rtnl: Rtnl, ifindex: int) -> None:
    """Remove every program from link ``ifindex`` (its clsact qdisc); gone already is fine.
    Raises RequestFailed."""
    req = tc.delete_clsact(ifindex)
    reply = rtnl.one(req)
    if reply.error not in (0, errno.ENOENT, errno.EINVAL, errno.ENODEV):
        raise reply.failure(req.op)


def filters(rtnl: Rtnl, ifindex: int, direction: Direction) -> list[BpfFilter]:
    """The ``bpf`` filters on ``direction`` of ``ifindex``. Raises RequestFailed."""
    return tc.filters_of(rtnl.dump(tc.filter_dump(ifindex, direction)))
