"""rtnetlink transport: batches of pyroute2 messages over one raw NETLINK_ROUTE socket.

Theory of operation. A request is a pyroute2 message class filled in by the caller (fields and
``attrs``) plus what to do with it: its type, its flags and ``op``, the name errors carry. The
transport numbers the requests, encodes them with pyroute2 (``msg.encode()``) and sends them in
one ``send``: the kernel runs every message of a send in order and answers each one (an ack, an
error, or a dump ending in NLMSG_DONE) before the send returns, so N requests that need no reply
data cost one round trip instead of N. Replies are matched back to requests by sequence number
and decoded with the pyroute2 class of their type (an ack without extended-ack text, and the
link of a ``raw`` request, are read with struct: the wiring path's acks and read-backs cost
~0.2 ms a pod through pyroute2); a kernel error is a Reply with ``error`` set (and the kernel's
extended-ack text in ``detail``), never an exception, so a caller can accept "already gone" for
one request and not for another.

Encoding and collecting are pure (``encode_batch``, ``Collector``: bytes in, replies out) and the
socket around them is short. pyroute2's request machinery (IPRoute: an asyncio loop per object,
~0.4 ms per request) is not used; only its message classes are.

Threads. A socket stays in the namespace it was created in, whatever its thread does later: a
pod-namespace socket is opened by entering the namespace in the calling thread and leaving at
once (``opened_in``); a long-lived namespace (the node's) gets one socket per thread
(``ThreadSockets``), so threads never share a sequence space or a receive queue.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    nlmsg,
    nlmsgerr,
)
from pyroute2.netlink.rtnl import (
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
)
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netlink.errors import NotANetns, RequestFailed
from netlink.ns import entered, open_netns

# Flags of the usual request shapes.
ACKED: int = NLM_F_REQUEST | NLM_F_ACK
CREATE: int = ACKED | NLM_F_CREATE | NLM_F_EXCL
REPLACE: int = ACKED | NLM_F_CREATE | NLM_F_REPLACE
DUMP: int = NLM_F_REQUEST | NLM_F_DUMP

# A decoded pyroute2 message (a dict subclass with ``get_attr``); pyroute2 ships no types.
Message = Any

# <linux/netlink.h>: not exported by the socket module.
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_NETLINK_EXT_ACK = 11
_NETLINK_GET_STRICT_CHK = 12
_RECV_TIMEOUT_S = 10
# Requests per send. Every reply is its own skb (~1 KiB of receive buffer each): 64 stay well
# inside the default 208 KiB, so a long batch cannot overflow into ENOBUFS and lost acks.
MAX_BATCH = 64

# How to decode what the kernel sends back, by message type; anything else is kept undecoded
# past its header.
_DECODERS: dict[int, Any] = {
    RTM_NEWLINK: ifinfmsg,
    RTM_NEWADDR: ifaddrmsg,
    RTM_NEWROUTE: rtmsg,
    RTM_NEWNEIGH: ndmsg,
    RTM_NEWRULE: fibmsg,
}
# Framing only: length, type, flags and sequence number of each message in a datagram (what
# pyroute2's own Marshal reads before choosing a class).
_FRAME = struct.Struct("=IHHI")
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_ERRNO = struct.Struct("=i")  # nlmsgerr's error, right after the header


class CappedAck(nlmsgerr):  # type: ignore[misc]
    """NLMSG_ERROR as sent to a NETLINK_CAP_ACK socket: the errno, the request's header echoed
    back (its payload capped off), then the extended-ack attributes.

    pyroute2's ``nlmsgerr`` expects the attributes right after the errno (true only for
    NLMSG_DONE), so this declares the echoed header as fields.
    """

    __slots__ = ()
    fields = (
        ("error", "i"),
        ("orig_length", "I"),
        ("orig_type", "H"),
        ("orig_flags", "H"),
        ("orig_seq", "I"),
        ("orig_pid", "I"),
    )


@attrs.frozen
class Request:
    """One rtnetlink request: ``msg`` is a pyroute2 message with its fields and ``attrs`` set
    and no header, or the body bytes ``netlink.packing`` made; the transport adds the header
    and encodes it, once."""

    op: str  # what the request does, as errors name it
    type: int
    flags: int
    msg: Message
    # Keep (decode) only reply messages containing these bytes; b"" keeps all. A sound
    # prefilter for dumps the kernel cannot filter: pyroute2 decodes a rule in ~25-60 us, so
    # scanning a thousand pods' rules for one pod's would cost tens of ms per check.
    match: bytes = b""
    # Link replies: decode only these IFLA_* attributes (empty: all). A veth's RTM_NEWLINK is
    # ~1.5 KiB, mostly statistics, and pyroute2 decodes every nested attribute it is given.
    keep: frozenset[int] = frozenset()
    # Link replies (with ``keep``) as bytes in Reply.links, not decoded by pyroute2 at all:
    # read with netlink.requests.only_link (a link's attributes cost ~20 us each through
    # pyroute2's lazy decoding, most of a read-back).
    raw: bool = False


@attrs.frozen
class Reply:
    """The kernel's answer to one request: ``error`` 0 or a positive errno, the extended-ack
    text, the decoded data messages (a dump's, or a GET's), and the raw link messages of a
    ``raw`` request (header included; ``only_link`` reads only what it needs)."""

    error: int
    detail: str
    messages: list[Message]
    links: list[bytes] = attrs.field(factory=list)

    def failure(self, op: str) -> RequestFailed:
        """Return the RequestFailed this reply means for ``op``."""
        return RequestFailed(op, self.error or errno.EPROTO, self.detail)


def encode_batch(requests: Sequence[Request], first_seq: int) -> bytes:
    """Return ``requests`` encoded back to back, numbered from ``first_seq`` (mod 2**32)."""
    out = bytearray()
    for i, req in enumerate(requests):
        msg = req.msg
        seq = (first_seq + i) & 0xFFFFFFFF
        if isinstance(msg, bytes):  # a body packed by netlink.packing: add the header
            out += _HEADER.pack(_HEADER.size + len(msg), req.type, req.flags, seq, 0) + msg
            continue
        msg["header"] = {
            "type": req.type,
            "flags": req.flags,
            "sequence_number": (first_seq + i) & 0xFFFFFFFF,
            "pid": 0,
        }
        msg.encode()
        out += msg.data
    return bytes(out)


_IFINFOMSG_SIZE = 16
_NLA = struct.Struct("=HH")


def slim_link(raw: bytes, keep: frozenset[int]) -> bytes:
    """Return the link message ``raw`` (header included) with only the attributes in
    ``keep``: what a caller reads, without the kilobyte of statistics pyroute2 would decode."""
    head = _HEADER.size + _IFINFOMSG_SIZE
    kept = bytearray(raw[:head])
    offset, end = head, len(raw)
    while offset + 4 <= end:
        size, kind = _NLA.unpack_from(raw, offset)
        if size < 4:
            break
        step = (size + 3) & ~3
        if kind & 0x3FFF in keep:
            kept += raw[offset : offset + step]
        offset += step
    _HEADER.pack_into(kept, 0, len(kept), *_HEADER.unpack_from(raw)[1:])
    return bytes(kept)


def decode_message(data: bytes, offset: int = 0) -> Message:
    """Decode the data message at ``offset`` with the pyroute2 class of its type."""
    mtype = _FRAME.unpack_from(data, offset)[1]
    msg = _DECODERS.get(mtype, nlmsg)(data, offset=offset)
    msg.decode()
    return msg


class Collector:
    """Matches replies to a batch numbered from ``first_seq``: feed it every datagram read
    until ``done``, then take ``replies()``. Messages of other sequence numbers are skipped."""

    def __init__(self, requests: Sequence[Request], first_seq: int) -> None:
        self._ops = [r.op for r in requests]
        self._matches = [r.match for r in requests]
        self._keeps = [r.keep for r in requests]
        self._raws = [r.raw for r in requests]
        self._links: list[list[bytes]] = [[] for _ in requests]
        self._pending = {(first_seq + i) & 0xFFFFFFFF: i for i in range(len(requests))}
        self._errors = [0] * len(requests)
        self._details = [""] * len(requests)
        self._messages: list[list[Message]] = [[] for _ in requests]
        self.last_op = self._ops[0] if self._ops else ""  # the request being answered

    @property
    def done(self) -> bool:
        return not self._pending

    def feed(self, data: bytes) -> None:
        """Take one datagram from the socket."""
        offset, end = 0, len(data)
        while offset + 16 <= end:
            size, mtype, flags, seq = _FRAME.unpack_from(data, offset)
            if size < 16:
                break
            index = self._pending.get(seq)
            if index is not None:
                self.last_op = self._ops[index]
                if mtype == NLMSG_ERROR and not flags & NLM_F_ACK_TLVS:
                    # an ack or an error without text: the errno alone, no pyroute2 decoding
                    self._errors[index] = -_ERRNO.unpack_from(data, offset + 16)[0]
                    del self._pending[seq]
                elif mtype in (NLMSG_ERROR, NLMSG_DONE):
                    ack = (CappedAck if mtype == NLMSG_ERROR else nlmsgerr)(data, offset=offset)
                    ack.decode()
                    self._errors[index] = -int(ack["error"])
                    if flags & NLM_F_ACK_TLVS:
                        self._details[index] = ack.get_attr("NLMSGERR_ATTR_MSG") or ""
                    del self._pending[seq]
                else:
                    match = self._matches[index]
                    if not match or data.find(match, offset, offset + size) >= 0:
                        keep = self._keeps[index]
                        if keep and mtype == RTM_NEWLINK and self._raws[index]:
                            self._links[index].append(data[offset : offset + size])
                            offset += (size + 3) & ~3
                            continue
                        if keep and mtype == RTM_NEWLINK:
                            msg = ifinfmsg(slim_link(data[offset : offset + size], keep))
                            msg.decode()
                        else:
                            msg = decode_message(data, offset)
                        self._messages[index].append(msg)
            offset += (size + 3) & ~3

    def replies(self) -> list[Reply]:
        """Return one reply per request, in order."""
        return [
            Reply(error, detail, messages, links)
            for error, detail, messages, links in zip(
                self._errors, self._details, self._messages, self._links, strict=True
            )
        ]


class Rtnl:
    """A NETLINK_ROUTE socket in the namespace it was created in; one thread at a time."""

    def __init__(self) -> None:
        """Open the socket in the calling thread's namespace. Raises RequestFailed."""
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
            )
        except OSError as e:
            raise RequestFailed("open netlink socket", e.errno or errno.EIO) from e
        try:
            # Acks carry the request's header only, plus the kernel's reason as text; dumps
            # are filtered by the kernel (by device, table) rather than sent whole.
            sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
            sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
            sock.setsockopt(_SOL_NETLINK, _NETLINK_GET_STRICT_CHK, 1)
            # A kernel timeout rather than settimeout(): no extra poll() before every recv.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", _RECV_TIMEOUT_S, 0)
            )
            sock.bind((0, 0))
        except OSError as e:
            sock.close()
            raise RequestFailed("open netlink socket", e.errno or errno.EIO) from e
        self.sock = sock
        self.broken = False
        self._seq = 0
        self._buf = bytearray(1 << 16)

    def close(self) -> None:
        self.sock.close()

    def transact(self, requests: Sequence[Request]) -> list[Reply]:
        """Send ``requests`` in batches of at most MAX_BATCH; return one reply each, in order.

        Raises RequestFailed when the socket fails (and marks it broken); kernel errors are
        replies, not exceptions.
        """
        replies: list[Reply] = []
        for start in range(0, len(requests), MAX_BATCH):
            replies += self._send(requests[start : start + MAX_BATCH])
        return replies

    def _send(self, requests: Sequence[Request]) -> list[Reply]:
        first = (self._seq + 1) & 0xFFFFFFFF
        self._seq = (self._seq + len(requests)) & 0xFFFFFFFF
        collector = Collector(requests, first)
        try:
            self.sock.sendto(encode_batch(requests, first), (0, 0))
            while not collector.done:
                n = self.sock.recv_into(self._buf)
                collector.feed(bytes(self._buf[:n]))
        except OSError as e:
            # The kernel answers at once: a timeout or a socket error means replies may still
            # be in flight, so this socket is not used again.
            self.broken = True
            raise RequestFailed(collector.last_op, e.errno or errno.EIO, "netlink socket") from e
        return collector.replies()

    def one(self, request: Request) -> Reply:
        """Send one request and return its reply."""
        return self.transact([request])[0]

    def dump(self, request: Request) -> list[Message]:
        """Run one dump and return its messages. Raises RequestFailed on any error."""
        reply = self.one(request)
        if reply.error:
            raise reply.failure(request.op)
        return reply.messages


@contextlib.contextmanager
def opened_in(path: str) -> Iterator[Rtnl]:
    """Yield a socket in the namespace at ``path``, closed afterwards.

    Raises NetnsNotFound / NotANetns (naming ``path``) and RequestFailed.
    """
    fd = open_netns(path)
    try:
        with entered(fd):
            rtnl = Rtnl()
    except NotANetns:
        raise NotANetns(path) from None
    finally:
        os.close(fd)
    try:
        yield rtnl
    finally:
        rtnl.close()


class ThreadSockets:
    """One Rtnl per thread in the namespace ``netns_fd`` (not owned: the caller closes it).

    A thread's socket opens on first use, is replaced when broken, and closes when its thread
    ends or on ``close()``, whichever comes first.
    """

    def __init__(self, netns_fd: int) -> None:
        self._fd = netns_fd
        self._local = threading.local()
        self._lock = threading.Lock()
        self._closers: list[weakref.finalize[[], Rtnl]] = []
        self._closed = False

    def __repr__(self) -> str:
        with self._lock:
            live = sum(1 for c in self._closers if c.alive)
        return f"ThreadSockets(fd={self._fd}, open={live}, closed={self._closed})"

    def get(self) -> Rtnl:
        """Return the calling thread's socket, opening it on first use.

        Raises RequestFailed (EBADF once closed, or the kernel's error when opening).
        """
        rtnl: Rtnl | None = getattr(self._local, "rtnl", None)
        if rtnl is not None and not rtnl.broken and not self._closed:
            return rtnl
        with self._lock:
            if self._closed:
                raise RequestFailed("open netlink socket", errno.EBADF, "sockets closed")
            with entered(self._fd):
                rtnl = Rtnl()
            self._closers = [c for c in self._closers if c.alive]
            self._closers.append(weakref.finalize(rtnl, rtnl.sock.close))
        old: Rtnl | None = getattr(self._local, "rtnl", None)
        if old is not None:
            old.close()
        self._local.rtnl = rtnl
        return rtnl

    def close(self) -> None:
        """Close every thread's socket. Not while calls are running."""
        with self._lock:
            self._closed = True
            closers, self._closers = self._closers, []
        for close in closers:
            close()
