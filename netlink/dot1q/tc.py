"""tc over rtnetlink for the 802.1Q programs: request bodies and filter replies (no I/O).

A program runs under a ``clsact`` qdisc as a direct-action ``bpf`` filter at one fixed
priority and handle per direction, so replacing the filter swaps the program atomically and
there is never more than one of ours on a hook. Bodies are packed with ``struct`` (pyroute2's
tc classes know neither TCA_BPF_TAG nor TCA_BPF_ID); replies are read the same way.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from typing import Final, Literal

import attrs
from pyroute2.netlink.rtnl import (
    RTM_DELQDISC,
    RTM_DELTFILTER,
    RTM_GETTFILTER,
    RTM_NEWQDISC,
    RTM_NEWTFILTER,
)

from netlink.packing import attributes, nla, nla_str
from netlink.rtnl import ACKED, DUMP, REPLACE, Message, Request

Direction = Literal["ingress", "egress"]

# <linux/pkt_sched.h>, <linux/pkt_cls.h>, <linux/rtnetlink.h>
CLSACT_HANDLE: Final = 0xFFFF0000
TC_H_CLSACT: Final = 0xFFFFFFF1
PARENTS: Final[dict[Direction, int]] = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_TAG, TCA_BPF_ID = 6, 7, 8, 10, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
NLA_F_NESTED = 0x8000
ETH_P_ALL = 0x0003
PRIORITY, HANDLE = 1, 1
NAME_MAX = 255  # CLS_BPF_NAME_LEN - 1

_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_HEADER_SIZE = 16


def _tcmsg(ifindex: int, handle: int, parent: int, info: int = 0) -> bytes:
    return _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, info)


def add_clsact(ifindex: int) -> Request:
    """The ``clsact`` qdisc on ``ifindex`` (kept when it is there already)."""
    body = _tcmsg(ifindex, CLSACT_HANDLE, TC_H_CLSACT) + nla_str(TCA_KIND, "clsact")
    return Request(f"add clsact on ifindex {ifindex}", RTM_NEWQDISC, REPLACE, body)


def delete_clsact(ifindex: int) -> Request:
    """Remove the ``clsact`` qdisc of ``ifindex`` and every filter under it."""
    body = _tcmsg(ifindex, CLSACT_HANDLE, TC_H_CLSACT)
    return Request(f"delete clsact on ifindex {ifindex}", RTM_DELQDISC, ACKED, body)


def set_filter(ifindex: int, direction: Direction, fd: int, name: str) -> Request:
    """Run the program ``fd`` on ``direction`` of ``ifindex``, replacing ours if there; the
    filter is called ``name`` (what ``tc filter show`` prints)."""
    info = (PRIORITY << 16) | socket.htons(ETH_P_ALL)
    options = (
        nla(TCA_BPF_FD, struct.pack("=I", fd))
        + nla_str(TCA_BPF_NAME, name[:NAME_MAX])
        + nla(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT))
    )
    body = (
        _tcmsg(ifindex, HANDLE, PARENTS[direction], info)
        + nla_str(TCA_KIND, "bpf")
        + nla(TCA_OPTIONS | NLA_F_NESTED, options)
    )
    return Request(
        f"attach {name} to {direction} of ifindex {ifindex}", RTM_NEWTFILTER, REPLACE, body
    )


def delete_filter(ifindex: int, direction: Direction) -> Request:
    """Remove our filter (priority and handle) from ``direction`` of ``ifindex``."""
    info = (PRIORITY << 16) | socket.htons(ETH_P_ALL)
    body = _tcmsg(ifindex, HANDLE, PARENTS[direction], info) + nla_str(TCA_KIND, "bpf")
    return Request(f"detach from {direction} of ifindex {ifindex}", RTM_DELTFILTER, ACKED, body)


def filter_dump(ifindex: int, direction: Direction) -> Request:
    """Dump the filters on ``direction`` of ``ifindex`` (none, not an error, where there is no
    clsact or no such link)."""
    body = _tcmsg(ifindex, 0, PARENTS[direction])
    return Request(f"filters on {direction} of ifindex {ifindex}", RTM_GETTFILTER, DUMP, body)


@attrs.frozen(kw_only=True)
class BpfFilter:
    """One ``bpf`` filter as dumped."""

    ifindex: int
    parent: int
    priority: int
    handle: int
    name: str
    tag: str  # hex, as ``tc`` prints it
    prog_id: int
    direct_action: bool

    @property
    def ours(self) -> bool:
        """At the priority and handle podwire uses."""
        return self.priority == PRIORITY and self.handle == HANDLE


def parse_filter(raw: bytes) -> BpfFilter | None:
    """The ``bpf`` filter in one RTM_NEWTFILTER message (header included); None for any other
    kind (and for the chain's empty template entry)."""
    _, ifindex, handle, parent, info = _TCMSG.unpack_from(raw, _HEADER_SIZE)
    top = attributes(raw, _HEADER_SIZE + _TCMSG.size)
    if top.get(TCA_KIND, b"").rstrip(b"\0") != b"bpf" or TCA_OPTIONS not in top:
        return None
    options = attributes(top[TCA_OPTIONS], 0)
    flags = struct.unpack("=I", options[TCA_BPF_FLAGS])[0] if TCA_BPF_FLAGS in options else 0
    prog_id = struct.unpack("=I", options[TCA_BPF_ID])[0] if TCA_BPF_ID in options else 0
    return BpfFilter(
        ifindex=ifindex,
        parent=parent,
        priority=info >> 16,
        handle=handle,
        name=options.get(TCA_BPF_NAME, b"").rstrip(b"\0").decode(errors="replace"),
        tag=options.get(TCA_BPF_TAG, b"").hex(),
        prog_id=prog_id,
        direct_action=bool(flags & TCA_BPF_FLAG_ACT_DIRECT),
    )


def raw_of(msg: Message) -> bytes:
    """The bytes of a reply message the transport left undecoded (tc messages have no
    pyroute2 class there): the datagram slice it was read from."""
    start = int(msg.offset)
    return bytes(msg.data[start : start + int(msg["header"]["length"])])


def filters_of(messages: Iterable[Message]) -> list[BpfFilter]:
    """The ``bpf`` filters among a dump's messages."""
    out = []
    for m in messages:
        if m["header"]["type"] == RTM_NEWTFILTER and (f := parse_filter(raw_of(m))) is not None:
            out.append(f)
    return out
