"""Netlink event watcher: links, IPv4 addresses, routes and rules of one namespace (and tc
removals), in batches.

Theory of operation.

- One NETLINK_ROUTE socket, non-blocking, subscribed to RTNLGRP_LINK, RTNLGRP_TC,
  RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV4_ROUTE and RTNLGRP_IPV4_RULE in the namespace it was created
  in (a socket stays in its namespace; for another namespace it is created by a worker thread
  that enters it). It is read on the event loop with ``anyio.wait_readable``: no reader thread,
  no polling. Of tc's notifications only removals of a qdisc or filter become events.
- Coalescing: the first event after a quiet spell opens a window (``window``, 30 ms by
  default); everything read until it closes, or until ``max_batch`` events, is delivered as one
  ``Batch``. 300 veths deleted at once are a few batches, not 300 wake-ups of each consumer.
  Events keep their kernel order inside and across batches.
- Lazy windows: while nobody needs an event before the window closes (no ``wait_link`` waiter,
  no immediate callback whose ``wanted()`` is true), the reader does not wake for each datagram
  but sleeps the window out and reads everything at its end: an ADD's own half-dozen events
  cost the event loop one wake-up, not six in the middle of the wiring. Whoever starts needing
  events at once calls ``poke()`` (the deleter when a round starts, ``wait_link`` when it
  registers), and the reader reads what is there and from then on every datagram again.
- Overrun: the kernel drops notifications when the receive buffer is full and reports ENOBUFS
  once. The buffer is made large (SO_RCVBUFFORCE, else SO_RCVBUF) so this is rare, and when it
  happens the events held for the current batch are dropped and a ``Resync`` carrying a full
  dump (links, IPv4 addresses, routes of every table, rules) is delivered instead. The dump runs
  on a second socket; notifications read after it may repeat what the dump already shows, so
  consumers apply events as idempotent state ("this object now looks like this" / "is gone").
  The first item every subscriber sees is also a ``Resync`` (the view at subscription time).
- Back-pressure: delivery awaits each subscriber's stream. A consumer that falls behind stops
  the reader, the kernel overruns, and everyone gets a Resync: slow consumers cost a dump, never
  unbounded memory. Callbacks run synchronously on delivery and must not block.
- ``wait_link(mac=...)`` registers before it looks at a dump of the links, and the reader checks
  every decoded link event against registered waiters at once (not after the batch window), so
  a link appearing before, during or after the call is found without polling.

Messages are decoded here with struct (``_decode_one``: the few fields an event carries), not
with pyroute2's message classes, which cost ~50-300 us a message; the pyroute2 decoding is kept
as the reference in tests/integration/test_watcher_decode.py.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address
from typing import Literal, TypeAlias

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from netlink.errors import NetlinkError
from netlink.ns import entered_path
from netlink.packing import attributes, text

log = logging.getLogger("podwire.watcher")

# <linux/rtnetlink.h>: RTNLGRP_LINK 1, RTNLGRP_TC 4, RTNLGRP_IPV4_IFADDR 5,
# RTNLGRP_IPV4_ROUTE 7, RTNLGRP_IPV4_RULE 8; the bind() group mask has bit (group - 1).
GROUPS = (1 << 0) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7)
_SOL_NETLINK = 270
_SO_RCVBUFFORCE = 33
_NETLINK_ROUTE = 0
_NLMSG_ERROR, _NLMSG_DONE, _NLMSG_OVERRUN = 2, 3, 4
_NLM_F_DUMP_INTR = 0x10
_DUMP = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
_RTM_NEWLINK, _RTM_DELLINK, _RTM_GETLINK = 16, 17, 18
_RTM_NEWADDR, _RTM_DELADDR, _RTM_GETADDR = 20, 21, 22
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_GETROUTE = 24, 25, 26
_RTM_NEWRULE, _RTM_DELRULE, _RTM_GETRULE = 32, 33, 34
_RTM_DELQDISC, _RTM_DELTFILTER = 37, 45
_DELETIONS = frozenset({_RTM_DELLINK, _RTM_DELADDR, _RTM_DELROUTE, _RTM_DELRULE})
_IFF_UP = 0x1
_RT_TABLE_MAIN = 254
_NLMSGHDR = struct.Struct("=IHHII")
_ERRNO = struct.Struct("=i")
_RECV_SIZE = 1 << 18
DEFAULT_RCVBUF = 8 << 20

Kind: TypeAlias = Literal["new", "del"]


# --- events ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LinkEvent:
    """A link appeared or changed (``new``) or is gone (``del``)."""

    kind: Kind
    index: int
    name: str
    mac: str  # lower-case "aa:bb:..", "" for links without one
    up: bool  # administratively up (IFF_UP)
    kind_of_link: str = ""  # IFLA_INFO_KIND: "veth", "vlan", ...; "" for plain devices


@attrs.frozen(kw_only=True)
class AddrEvent:
    kind: Kind
    index: int
    address: IPv4Address
    prefixlen: int
    label: str = ""


@attrs.frozen(kw_only=True)
class RouteEvent:
    kind: Kind
    dst: IPv4Address  # 0.0.0.0 with prefixlen 0 for a default route
    prefixlen: int
    oif: int | None
    table: int
    gateway: IPv4Address | None = None
    scope: int = 0
    protocol: int = 0
    type: int = 1  # RTN_UNICAST
    priority: int | None = None  # the route metric


@attrs.frozen(kw_only=True)
class RuleEvent:
    kind: Kind
    priority: int
    table: int
    src: IPv4Address | None = None
    src_len: int = 0
    dst: IPv4Address | None = None
    dst_len: int = 0
    fwmark: int | None = None
    fwmask: int | None = None
    iifname: str = ""
    action: int = 1  # FR_ACT_TO_TBL


@attrs.frozen(kw_only=True)
class TcEvent:
    """Someone removed a qdisc or a tc filter (``netlink.dot1q``'s programs live there). Only
    explicit removals are reported: a link deleted with its programs is a LinkEvent."""

    kind: Kind
    index: int  # the link's ifindex
    parent: int  # the hook: ingress ffff:fff2, egress ffff:fff3, clsact ffff:fff1


Event: TypeAlias = LinkEvent | AddrEvent | RouteEvent | RuleEvent | TcEvent


@attrs.frozen(kw_only=True)
class Batch:
    """Events read within one coalescing window, in kernel order."""

    events: tuple[Event, ...]

    def links(self) -> list[LinkEvent]:
        return [e for e in self.events if isinstance(e, LinkEvent)]

    def links_gone(self, prefix: str | tuple[str, ...] = "") -> list[LinkEvent]:
        """Return the link deletions in this batch whose name starts with ``prefix`` (or one
        of several)."""
        return [
            e
            for e in self.events
            if isinstance(e, LinkEvent) and e.kind == "del" and e.name.startswith(prefix)
        ]


@attrs.frozen(kw_only=True)
class Resync:
    """Everything in the namespace now: replaces whatever view a consumer had built.

    ``reason`` is "start" (the first item of every subscription) or "overrun" (notifications
    were lost: the receive buffer overflowed).
    """

    reason: Literal["start", "overrun"]
    links: tuple[LinkEvent, ...]
    addrs: tuple[AddrEvent, ...]
    routes: tuple[RouteEvent, ...]
    rules: tuple[RuleEvent, ...]


Item: TypeAlias = Batch | Resync


class WatcherError(NetlinkError):
    """Base of the watcher's own errors."""


class WatcherNotRunning(WatcherError):
    """The watcher's socket is closed (serve() ended or never started): your code's order."""

    def __init__(self) -> None:
        super().__init__("the netlink watcher is not running")


class LinkWaitTimedOut(WatcherError, TimeoutError):
    """No link with ``mac`` appeared within ``timeout`` seconds."""

    def __init__(self, mac: str, timeout: float) -> None:
        super().__init__(f"no link with MAC {mac} appeared within {timeout:g} s")
        self.mac = mac
        self.timeout = timeout


class DumpFailed(WatcherError):
    """The kernel refused a dump request, or the dump socket failed."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(f"dump of {what} failed: {errno.errorcode.get(err, err)}")
        self.what = what
        self.errno = err


# --- decoding (pure) ------------------------------------------------------------------------


# Events are decoded by hand with struct: the watcher sees every link, route and rule change of
# the node, and pyroute2's classes spend ~50-300 us on a message (most of the watcher's CPU
# during pod churn). tests/integration/test_watcher_decode.py holds the pyroute2 decoding as
# the reference. Header layouts from <linux/rtnetlink.h>, <linux/if_addr.h>, <linux/fib_rules.h>.
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_U32 = struct.Struct("=I")
_HEAD = _NLMSGHDR.size
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND = 1, 3, 18, 1
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
FRA_DST, FRA_SRC, FRA_IIFNAME, FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = (
    1,
    2,
    3,
    6,
    10,
    15,
    16,
)


def _u32(value: bytes | None) -> int | None:
    return _U32.unpack(value[:4])[0] if value is not None and len(value) >= 4 else None


def _ipv4(value: bytes | None) -> IPv4Address | None:
    return IPv4Address(value[:4]) if value is not None and len(value) >= 4 else None


def _decode_one(mtype: int, raw: bytes) -> Event | None:
    kind: Kind = "del" if mtype in _DELETIONS else "new"
    if mtype in (_RTM_NEWLINK, _RTM_DELLINK):
        _, _, index, flags, _ = _IFINFO.unpack_from(raw, _HEAD)
        a = attributes(raw, _HEAD + _IFINFO.size)
        info = a.get(IFLA_LINKINFO)
        return LinkEvent(
            kind=kind,
            index=index,
            name=text(a.get(IFLA_IFNAME)),
            mac=a.get(IFLA_ADDRESS, b"").hex(":"),
            up=bool(flags & _IFF_UP),
            kind_of_link=text(attributes(info, 0).get(IFLA_INFO_KIND)) if info else "",
        )
    if mtype in (_RTM_DELQDISC, _RTM_DELTFILTER):
        _, index, _, parent, _ = _TCMSG.unpack_from(raw, _HEAD)
        return TcEvent(kind="del", index=index, parent=parent)
    family = raw[_HEAD] if len(raw) > _HEAD else 0
    if family != socket.AF_INET:
        return None
    if mtype in (_RTM_NEWADDR, _RTM_DELADDR):
        _, prefixlen, _, _, index = _IFADDR.unpack_from(raw, _HEAD)
        a = attributes(raw, _HEAD + _IFADDR.size)
        address = _ipv4(a.get(IFA_LOCAL)) or _ipv4(a.get(IFA_ADDRESS))
        if address is None:
            return None
        return AddrEvent(
            kind=kind,
            index=index,
            address=address,
            prefixlen=prefixlen,
            label=text(a.get(IFA_LABEL)),
        )
    if mtype in (_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_NEWRULE, _RTM_DELRULE):
        # rtmsg and fib_rule_hdr share their layout: action sits where a route's type does
        _, dst_len, src_len, _, table, proto, scope, rtype, _ = _RTMSG.unpack_from(raw, _HEAD)
        a = attributes(raw, _HEAD + _RTMSG.size)
        if mtype in (_RTM_NEWROUTE, _RTM_DELROUTE):
            return RouteEvent(
                kind=kind,
                dst=_ipv4(a.get(RTA_DST)) or IPv4Address(0),
                prefixlen=dst_len,
                oif=_u32(a.get(RTA_OIF)),
                table=_u32(a.get(RTA_TABLE)) or table,
                gateway=_ipv4(a.get(RTA_GATEWAY)),
                scope=scope,
                protocol=proto,
                type=rtype,
                priority=_u32(a.get(RTA_PRIORITY)),
            )
        return RuleEvent(
            kind=kind,
            priority=_u32(a.get(FRA_PRIORITY)) or 0,
            table=_u32(a.get(FRA_TABLE)) or table,
            src=_ipv4(a.get(FRA_SRC)),
            src_len=src_len,
            dst=_ipv4(a.get(FRA_DST)),
            dst_len=dst_len,
            fwmark=_u32(a.get(FRA_FWMARK)),
            fwmask=_u32(a.get(FRA_FWMASK)),
            iifname=text(a.get(FRA_IIFNAME)),
            action=rtype,
        )
    return None


@attrs.frozen
class _Parsed:
    events: list[Event]
    done: bool = False  # NLMSG_DONE (or an error) ended a dump
    error: int = 0  # positive errno from NLMSG_ERROR / DONE
    interrupted: bool = False  # NLM_F_DUMP_INTR: the dump changed under the kernel's feet


def parse(data: bytes) -> _Parsed:
    """Decode every netlink message in one datagram; unknown types are skipped."""
    events: list[Event] = []
    done = interrupted = False
    error = 0
    offset, end = 0, len(data)
    while offset + _NLMSGHDR.size <= end:
        size, mtype, flags, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if size < _NLMSGHDR.size or offset + size > end:
            break
        if flags & _NLM_F_DUMP_INTR:
            interrupted = True
        if mtype in (_NLMSG_DONE, _NLMSG_ERROR):
            done = True
            if size >= _NLMSGHDR.size + 4:
                error = -int(_ERRNO.unpack_from(data, offset + _NLMSGHDR.size)[0])
        elif mtype != _NLMSG_OVERRUN:
            event = _decode_one(mtype, data[offset : offset + size])
            if event is not None:
                events.append(event)
        offset += (size + 3) & ~3
    return _Parsed(events, done, error, interrupted)


# --- sockets --------------------------------------------------------------------------------


def _netlink_socket() -> socket.socket:
    return socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        _NETLINK_ROUTE,
    )


def open_sockets(rcvbuf: int = DEFAULT_RCVBUF) -> tuple[socket.socket, socket.socket]:
    """Open (events, dump) sockets in the calling thread's namespace; events is subscribed.

    Raises WatcherError when the sockets cannot be made.
    """
    events = dump = None
    try:
        events = _netlink_socket()
        try:  # CAP_NET_ADMIN may exceed net.core.rmem_max; SO_RCVBUF is capped by it
            events.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        events.bind((0, GROUPS))
        dump = _netlink_socket()
        dump.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 1 << 20)
        dump.bind((0, 0))
    except OSError as e:
        for s in (events, dump):
            if s is not None:
                s.close()
        raise WatcherError(f"cannot open netlink sockets: {e}") from e
    return events, dump


def _open_in(netns: str | None, rcvbuf: int) -> tuple[socket.socket, socket.socket]:
    if netns is None:
        return open_sockets(rcvbuf)
    with entered_path(netns):
        return open_sockets(rcvbuf)


def _dump_request(mtype: int, seq: int) -> bytes:
    # The family header of every GET is at least 8 bytes of zeros but for the family byte.
    if mtype == _RTM_GETLINK:
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
    elif mtype == _RTM_GETADDR:
        body = struct.pack("=BBBBI", socket.AF_INET, 0, 0, 0, 0)
    else:  # routes and rules share the 12-byte rtmsg / fib_rule_hdr layout
        body = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, _DUMP, seq, 0) + body


# --- the watcher ----------------------------------------------------------------------------


@attrs.define(eq=False)  # hashed by identity: kept in a set
class _LinkWaiter:
    mac: str
    found: LinkEvent | None = None
    event: anyio.Event = attrs.field(factory=anyio.Event)


Callback: TypeAlias = Callable[[Item], None]


class Watcher:
    """Watches one network namespace; ``serve`` runs it, ``subscribe`` reads it.

    ``netns`` is a namespace path, or None for the namespace of the thread running ``serve``.
    """

    def __init__(
        self,
        *,
        netns: str | None = None,
        window: float = 0.03,
        max_batch: int = 1024,
        rcvbuf: int = DEFAULT_RCVBUF,
    ) -> None:
        self.netns = netns
        self.window = window
        self.max_batch = max_batch
        self.rcvbuf = rcvbuf
        self._events: socket.socket | None = None
        self._dump_sock: socket.socket | None = None
        self._dump_lock = anyio.Lock()
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)  # events
        self._dump_buf = bytearray(_RECV_SIZE)
        self._subscribers: list[MemoryObjectSendStream[Item]] = []
        self._callbacks: list[Callback] = []
        self._immediate: list[Callable[[Sequence[Event]], None]] = []
        self._wanted: list[Callable[[], bool]] = []  # whether each needs events at once
        self._poked = anyio.Event()
        self._waiters: set[_LinkWaiter] = set()
        self._running = anyio.Event()
        self.batches = 0
        self.events = 0
        self.resyncs = 0
        self.overruns = 0

    def __repr__(self) -> str:
        return (
            f"<Watcher netns={self.netns or '(own)'} batches={self.batches} events={self.events}"
            f" overruns={self.overruns} subscribers={len(self._subscribers)}"
            f" waiters={len(self._waiters)}>"
        )

    # -- consumers --

    def subscribe(self, max_buffer: int = 16) -> MemoryObjectReceiveStream[Item]:
        """Return a stream of Batch/Resync items; the first item will be a Resync.

        Subscribe before ``serve`` starts (the daemon's start order) so no event is missed.
        Closing the returned stream unsubscribes.
        """
        send, recv = anyio.create_memory_object_stream[Item](max_buffer)
        self._subscribers.append(send)
        return recv

    def add_callback(self, callback: Callback) -> None:
        """Call ``callback(item)`` on every delivery, synchronously; it must not block."""
        self._callbacks.append(callback)

    def add_immediate_callback(
        self,
        callback: Callable[[Sequence[Event]], None],
        wanted: Callable[[], bool] | None = None,
    ) -> Callable[[], None]:
        """Call ``callback(events)`` as events are read, before the coalescing window, with
        no Resync (a consumer must not depend on it alone); it must not block.

        With ``wanted``, events are read at once only while ``wanted()`` is true (otherwise at
        the end of the window, still before the batch is delivered): call the returned
        ``poke`` when it becomes true, so that a reader sleeping out a window reads now.
        """
        self._immediate.append(callback)
        self._wanted.append(wanted if wanted is not None else (lambda: True))
        return self.poke

    def poke(self) -> None:
        """Make a reader sleeping out a window read what the socket holds now."""
        self._poked.set()

    def _urgent(self) -> bool:
        return bool(self._waiters) or any(wanted() for wanted in self._wanted)

    async def wait_link(self, mac: str, timeout: float) -> LinkEvent:
        """Return the link whose MAC is ``mac``, waiting up to ``timeout`` s for it to appear.

        Raises LinkWaitTimedOut, or WatcherNotRunning if ``serve`` ends while waiting.
        """
        waiter = _LinkWaiter(mac.lower())
        try:
            with anyio.fail_after(timeout):
                await self._running.wait()
                # Registered before the dump: a link made meanwhile is seen by one or the other.
                self._waiters.add(waiter)
                self.poke()
                for link in (await self.dump(links=True)).links:
                    if link.mac == waiter.mac:
                        return link
                await waiter.event.wait()
        except TimeoutError:
            raise LinkWaitTimedOut(mac, timeout) from None
        finally:
            self._waiters.discard(waiter)
        if waiter.found is None:
            raise WatcherNotRunning()
        return waiter.found

    def _match_waiters(self, events: Iterable[Event]) -> None:
        for e in events:
            if isinstance(e, LinkEvent) and e.kind == "new" and e.mac:
                for w in self._waiters:
                    if w.mac == e.mac and w.found is None:
                        w.found = e
                        w.event.set()

    # -- dumps --

    async def dump(
        self, *, links: bool = True, addrs: bool = False, routes: bool = False, rules: bool = False
    ) -> Resync:
        """Return what the namespace holds now (only the kinds asked for; the rest empty).

        Raises WatcherNotRunning before ``serve`` has opened its sockets, DumpFailed on a
        kernel error.
        """
        found: dict[int, list[Event]] = {}
        async with self._dump_lock:
            for wanted, mtype in (
                (links, _RTM_GETLINK),
                (addrs, _RTM_GETADDR),
                (routes, _RTM_GETROUTE),
                (rules, _RTM_GETRULE),
            ):
                if wanted:
                    found[mtype] = await self._dump_one(mtype)
        return Resync(
            reason="start",
            links=tuple(e for e in found.get(_RTM_GETLINK, ()) if isinstance(e, LinkEvent)),
            addrs=tuple(e for e in found.get(_RTM_GETADDR, ()) if isinstance(e, AddrEvent)),
            routes=tuple(e for e in found.get(_RTM_GETROUTE, ()) if isinstance(e, RouteEvent)),
            rules=tuple(e for e in found.get(_RTM_GETRULE, ()) if isinstance(e, RuleEvent)),
        )

    async def dump_rules(self) -> Sequence[RuleEvent]:
        """Return the IPv4 policy rules of the namespace now."""
        return (await self.dump(links=False, rules=True)).rules

    async def _dump_one(self, mtype: int) -> list[Event]:
        sock = self._dump_sock
        if sock is None:
            raise WatcherNotRunning()
        for _ in range(5):  # NLM_F_DUMP_INTR: the table changed mid-dump; ask again
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            seq = self._seq
            try:
                sock.send(_dump_request(mtype, seq))
            except OSError as e:
                raise DumpFailed(str(mtype), e.errno or errno.EIO) from e
            events: list[Event] = []
            interrupted = False
            while True:
                try:
                    n = sock.recv_into(self._dump_buf)
                except BlockingIOError:
                    await anyio.wait_readable(sock)
                    continue
                except OSError as e:
                    raise DumpFailed(str(mtype), e.errno or errno.EIO) from e
                data = bytes(self._dump_buf[:n])
                if n >= _NLMSGHDR.size and _NLMSGHDR.unpack_from(data)[3] != seq:
                    continue  # the tail of an abandoned (cancelled) earlier dump
                parsed = parse(data)
                events += parsed.events
                interrupted |= parsed.interrupted
                if parsed.done:
                    if parsed.error:
                        raise DumpFailed(str(mtype), parsed.error)
                    break
            if not interrupted:
                return events
        return events

    # -- serving --

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Subscribe, deliver a start Resync, call ``task_status.started()``, then deliver
        batches until cancelled. Raises WatcherError when the sockets cannot be opened."""
        if self.netns is None:
            events, dump = open_sockets(self.rcvbuf)
        else:
            events, dump = await anyio.to_thread.run_sync(_open_in, self.netns, self.rcvbuf)
        self._events, self._dump_sock = events, dump
        try:
            self._running.set()
            await self._publish(await self._full_dump("start"))
            task_status.started()
            await self._read_loop(events)
        finally:
            self._events = self._dump_sock = None
            self._running = anyio.Event()
            for w in self._waiters:
                w.event.set()  # found stays None: WatcherNotRunning
            for send in self._subscribers:
                send.close()
            events.close()
            dump.close()

    async def _full_dump(self, reason: Literal["start", "overrun"]) -> Resync:
        snap = await self.dump(links=True, addrs=True, routes=True, rules=True)
        self._match_waiters(snap.links)
        self.resyncs += 1
        return attrs.evolve(snap, reason=reason)

    async def _read_loop(self, sock: socket.socket) -> None:
        pending: list[Event] = []
        deadline = math.inf  # when the open window closes (inf: none open)
        while True:
            if deadline == math.inf:
                await anyio.wait_readable(sock)  # the first datagram opens a window
                deadline = anyio.current_time() + self.window
            elif self._urgent():
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await anyio.wait_readable(sock)
            else:  # lazy: sleep the window out, unless someone starts needing events now
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await self._poked.wait()
            if self._poked.is_set():
                self._poked = anyio.Event()
            closing = anyio.current_time() >= deadline
            if (closing or self._urgent()) and self._drain(sock, pending):
                self.overruns += 1
                log.warning(
                    "netlink receive buffer overrun; resyncing",
                    extra={"dropped_pending": len(pending)},
                )
                pending = []
                deadline = math.inf
                await self._publish(await self._full_dump("overrun"))
                continue
            if closing or len(pending) >= self.max_batch:
                deadline = math.inf
                if pending:
                    batch = Batch(events=tuple(pending))
                    pending = []
                    self.batches += 1
                    self.events += len(batch.events)
                    await self._publish(batch)

    def _drain(self, sock: socket.socket, pending: list[Event]) -> bool:
        """Read what the socket holds into ``pending``; return True on overrun (ENOBUFS)."""
        while len(pending) < self.max_batch:
            try:
                n = sock.recv_into(self._buf)
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return True
                raise WatcherError(f"netlink event socket failed: {e}") from e
            events = parse(bytes(self._buf[:n])).events
            if self._waiters:
                self._match_waiters(events)
            for callback in self._immediate:
                callback(events)
            pending += events
        return False

    async def _publish(self, item: Item) -> None:
        for callback in self._callbacks:
            callback(item)
        for send in list(self._subscribers):
            try:
                await send.send(item)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(send)
