"""Loading the 802.1Q programs and attaching them with tc, inside one namespace.

Programs are loaded with the bpf(2) syscall (no toolchain, no bpffs pin); tc's clsact qdisc and
a direct-action ``bpf`` filter are set over a netlink socket opened inside the namespace
(``netlink.rtnl``), which holds the program once attached, so the file descriptor is closed at
once. Replacing the filter (same priority and handle) swaps the program atomically.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct

from pyroute2.netlink.rtnl import RTM_DELQDISC, RTM_NEWQDISC, RTM_NEWTFILTER
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from cloud.emulator.errors import VlanError
from netlink.rtnl import ACKED, REPLACE, Request, opened_in

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SCHED_CLS = 3
_ATTR_SIZE = 128
_LOG_SIZE = 1 << 16
_CLSACT = 0xFFFFFFF1
PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
_ETH_P_ALL = 0x0003
_PRIO, _HANDLE, _DIRECT_ACTION = 1, 1, 1

_libc = ctypes.CDLL(None, use_errno=True)


def load(program: bytes, name: str) -> int:
    """Load a SCHED_CLS program; return its fd. Raises VlanError with the verifier's log."""
    if _SYS_BPF is None:
        raise VlanError("bpf", errno.ENOSYS, f"no bpf syscall number for {platform.machine()}")
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
        1,
        _LOG_SIZE,
        ctypes.addressof(log),
    )
    encoded = name.encode()[:15]
    attr[48 : 48 + len(encoded)] = encoded
    buf = ctypes.create_string_buffer(bytes(attr), _ATTR_SIZE)
    fd = int(_libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, buf, _ATTR_SIZE))
    if fd < 0:
        err = ctypes.get_errno()
        raise VlanError(f"load {name}", err, log.value.decode(errors="replace")[-2000:])
    return fd


def _clsact(ifindex: int) -> tcmsg:
    msg = tcmsg()
    msg["index"] = ifindex
    msg["handle"] = 0xFFFF0000
    msg["parent"] = _CLSACT
    msg["attrs"] = [["TCA_KIND", "clsact"]]
    return msg


def attach(netns_path: str, ifindex: int, direction: str, program: bytes, name: str) -> None:
    """Run ``program`` on ``direction`` (``ingress``/``egress``) of link ``ifindex`` in the
    namespace, replacing what ran there. Raises VlanError."""
    fd = load(program, name)
    try:
        flt = tcmsg()
        flt["index"] = ifindex
        flt["handle"] = _HANDLE
        flt["parent"] = PARENTS[direction]
        flt["info"] = (_PRIO << 16) | socket.htons(_ETH_P_ALL)
        flt["attrs"] = [
            ["TCA_KIND", "bpf"],
            [
                "TCA_OPTIONS",
                {
                    "attrs": [
                        ["TCA_BPF_FD", fd],
                        ["TCA_BPF_NAME", name],
                        ["TCA_BPF_FLAGS", _DIRECT_ACTION],
                    ]
                },
            ],
        ]
        with opened_in(netns_path) as rtnl:
            replies = rtnl.transact(
                [
                    Request("add clsact", RTM_NEWQDISC, REPLACE, _clsact(ifindex)),
                    Request(f"attach {name}", RTM_NEWTFILTER, REPLACE, flt),
                ]
            )
    finally:
        os.close(fd)
    for op, reply in zip(("add clsact", f"attach {name}"), replies, strict=True):
        if reply.error:
            raise VlanError(op, reply.error, reply.detail)


def detach(netns_path: str, ifindex: int) -> None:
    """Remove every program from link ``ifindex`` (its clsact qdisc); gone already is fine."""
    with opened_in(netns_path) as rtnl:
        reply = rtnl.one(Request("delete clsact", RTM_DELQDISC, ACKED, _clsact(ifindex)))
    if reply.error not in (0, errno.ENOENT, errno.EINVAL, errno.ENODEV):
        raise VlanError("delete clsact", reply.error, reply.detail)
