"""Routed-veth pod datapath: wire a pod to the node, check it, unwire it, delete links in bulk.

Theory of operation. A pod gets a veth pair created by a netlink socket that lives in the pod's
namespace, with the peer placed straight into the host namespace (IFLA_NET_NS_FD): creating in
the host and moving costs ~30 ms. The pod end is created up with its MTU in the same request (the
peer cannot be: it has no partner yet when the kernel configures it). The pod side then gets
``ip/32``, ``169.254.1.1 dev <if> scope link``, a permanent neighbour for 169.254.1.1 with the
host veth's MAC, and ``default via 169.254.1.1``; the host side gets the veth up,
``ip/32 dev <veth> scope link`` and, for IPs of a secondary ENI, the two policy rules.

Speed. Messages are pyroute2's classes, sent in batches by ``netlink.rtnl`` (pyroute2's IPRoute
costs ~0.7 ms per object and ~0.4 ms per request; its marshalling alone is ~0.05-0.3 ms per
message). wire() is three round trips: create + read back the link (pod), address/routes/
neighbour (pod), up/route/rules (host). The host MAC is chosen here rather than read back, which
also keeps udev's MACAddressPolicy from rewriting it under the pod's permanent neighbour entry.

Deleting. An RTM_DELLINK has two phases in the kernel: under the rtnl lock the links are
unlisted from their namespaces (both ends of a veth; their addresses, routes and neighbours
flushed) and RTM_DELLINK is broadcast, ~1-4 ms; then, with the lock released, the request
waits ~15-20 ms for RCU before it is acknowledged. A whole link group goes in one request and
one wait: ``park_links`` moves the named links into a reserved group (cheap) and
``delete_parked`` deletes the group. ``delete_links`` does both, one batch per group at a time.
agent.cni.deleter runs rounds in several groups at once and answers on the broadcast.

Threads. Every call is synchronous and meant for worker threads. A pod-namespace socket is
opened per call (``rtnl.opened_in``); the host-namespace socket is one per thread, reused
(``rtnl.ThreadSockets``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Sequence
from typing import ClassVar

import attrs
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNEIGH,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTM_SETLINK,
)
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netlink import packing
from netlink.errors import (
    DatapathClosed,
    HostVethExists,
    LinkExists,
    NetlinkError,
    NetnsNotFound,
    NotANetns,
    RequestFailed,
    WireFailed,
)
from netlink.names import HOST_VETH_PREFIX
from netlink.ns import current_netns_fd, is_netns_of, open_netns
from netlink.rtnl import (
    ACKED,
    CREATE,
    DUMP,
    REPLACE,
    Message,
    Reply,
    Request,
    Rtnl,
    ThreadSockets,
    opened_in,
)

GATEWAY = ipaddress.IPv4Address("169.254.1.1")
RULE_FROM_PRIORITY = 1536
RULE_TO_PRIORITY = 512
RT_TABLE_MAIN = 254
# The link groups links are parked in just before the whole group is deleted: DELETE_GROUP for
# delete_links, the next DELETE_LANES for agent.cni.deleter's concurrent rounds. Reserved:
# nothing else on the node may put a link in them, or the next batch deletes that link too (or,
# for a link the kernel cannot delete, fails and falls back to one request per link).
DELETE_GROUP = 0x70770001
DELETE_LANES = 4

# From <linux/if.h>, neighbour.h, rtnetlink.h and fib_rules.h.
_IFF_UP = 0x1
_NUD_PERMANENT = 0x80
_RTPROT_BOOT = 3
_RT_SCOPE_UNIVERSE, _RT_SCOPE_LINK, _RT_SCOPE_NOWHERE = 0, 253, 255
_RTN_UNICAST = 1
_FR_ACT_TO_TBL = 1

_GONE_LINK = frozenset({errno.ENODEV})
_GONE_ROUTE = frozenset({errno.ESRCH, errno.ENOENT, errno.ENODEV})
_GONE_RULE = frozenset({errno.ENOENT})


@attrs.frozen(kw_only=True)
class PodNet:
    """One pod attachment as the datapath sees it.

    ``table`` is the route table of the secondary ENI that owns ``ip``; None means the main
    table and no policy rules.
    """

    netns: str
    ifname: str
    host_veth: str
    ip: ipaddress.IPv4Address
    mtu: int
    table: int | None = None


@attrs.frozen(kw_only=True)
class WiredPod:
    """What ``wire`` made: the two ends of the veth pair."""

    pod_mac: str
    host_mac: str
    pod_ifindex: int
    host_ifindex: int


# --- requests -------------------------------------------------------------------------------


def _random_mac() -> str:
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in raw)


def _ifinfmsg(*attrs: tuple[str, object], index: int = 0, up: bool = False) -> Message:
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["flags"] = msg["change"] = _IFF_UP if up else 0
    msg["attrs"] = list(attrs)
    return msg


# What _parse_link reads of a link reply: IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK.
_LINK_KEEP = frozenset({1, 3, 4, 5})


def _getlink(op: str, name: str) -> Request:
    return Request(op, RTM_GETLINK, ACKED, packing.link_by_name(name), keep=_LINK_KEEP)


def _dellink(op: str, name: str) -> Request:
    return Request(op, RTM_DELLINK, ACKED, packing.link_by_name(name))


def _set_group(op: str, name: str, group: int) -> Request:
    return Request(op, RTM_SETLINK, ACKED, packing.link_group(name, group))


def _delete_group(op: str, group: int) -> Request:
    # No index and no name: the kernel deletes every link of the group (rtnl_group_dellink),
    # ENODEV when there is none.
    return Request(op, RTM_DELLINK, ACKED, packing.whole_group(group))


def _link_up(op: str, index: int) -> Request:
    return Request(op, RTM_SETLINK, ACKED, packing.link_up(index))


def _route_req(
    op: str,
    mtype: int,
    flags: int,
    *,
    dst: ipaddress.IPv4Address | None,
    oif: int,
    scope: int,
    gateway: ipaddress.IPv4Address | None = None,
) -> Request:
    if mtype == RTM_DELROUTE:
        # Match whoever's protocol, scope and type; dst and oif pick the route.
        proto, scope, rtype = 0, _RT_SCOPE_NOWHERE, 0
    else:
        proto, rtype = _RTPROT_BOOT, _RTN_UNICAST
    body = packing.route(
        table=RT_TABLE_MAIN,
        oif=oif,
        dst=dst,
        scope=scope,
        proto=proto,
        rtype=rtype,
        gateway=gateway,
    )
    return Request(op, mtype, flags, body)


def _route_dump(oif: int) -> Request:
    # Strict checking lets the kernel filter by table and device, so a node with a thousand
    # pods answers with one route, not a thousand.
    msg = rtmsg()
    msg["family"] = socket.AF_INET
    msg["table"] = RT_TABLE_MAIN
    msg["attrs"] = [("RTA_OIF", oif)]
    return Request("routes", RTM_GETROUTE, DUMP, msg)


def _rule_req(
    op: str,
    mtype: int,
    flags: int,
    ip: ipaddress.IPv4Address,
    *,
    src: bool,
    table: int,
    priority: int,
) -> Request:
    return Request(op, mtype, flags, packing.rule(ip, src=src, table=table, priority=priority))


def _rule_reqs(pod: PodNet, mtype: int, flags: int) -> list[Request]:
    if pod.table is None:
        return []
    return [
        _rule_req(
            _rule_from_name(pod),
            mtype,
            flags,
            pod.ip,
            src=True,
            table=pod.table,
            priority=RULE_FROM_PRIORITY,
        ),
        _rule_req(
            _rule_to_name(pod),
            mtype,
            flags,
            pod.ip,
            src=False,
            table=RT_TABLE_MAIN,
            priority=RULE_TO_PRIORITY,
        ),
    ]


def _rule_from_name(pod: PodNet) -> str:
    return f"rule from {pod.ip} lookup {pod.table} ({RULE_FROM_PRIORITY})"


def _rule_to_name(pod: PodNet) -> str:
    return f"rule to {pod.ip} lookup main ({RULE_TO_PRIORITY})"


def _newveth(pod: PodNet, host_mac: str, host_fd: int) -> Request:
    body = packing.new_veth(pod.ifname, pod.mtu, pod.host_veth, host_mac, host_fd)
    return Request("create veth", RTM_NEWLINK, CREATE, body)


def _pod_side(pod: PodNet, index: int, host_mac: str) -> list[Request]:
    return [
        Request(
            f"address {pod.ip}/32 on {pod.ifname}",
            RTM_NEWADDR,
            CREATE,
            packing.address32(index, pod.ip),
        ),
        _route_req(
            f"route {GATEWAY} scope link",
            RTM_NEWROUTE,
            CREATE,
            dst=GATEWAY,
            oif=index,
            scope=_RT_SCOPE_LINK,
        ),
        # REPLACE: the kernel may already hold an incomplete entry for the gateway.
        Request(
            f"neighbour {GATEWAY}",
            RTM_NEWNEIGH,
            REPLACE,
            packing.permanent_neighbour(index, GATEWAY, host_mac),
        ),
        _route_req(
            f"default route via {GATEWAY}",
            RTM_NEWROUTE,
            CREATE,
            dst=None,
            oif=index,
            scope=_RT_SCOPE_UNIVERSE,
            gateway=GATEWAY,
        ),
    ]


# --- replies --------------------------------------------------------------------------------


@attrs.frozen
class _Link:
    index: int
    flags: int
    name: str
    mac: str
    mtu: int
    peer_index: int | None


def _parse_link(msg: Message) -> _Link:
    return _Link(
        index=msg["index"],
        flags=msg["flags"],
        name=msg.get_attr("IFLA_IFNAME") or "",
        mac=msg.get_attr("IFLA_ADDRESS") or "",
        mtu=msg.get_attr("IFLA_MTU") or 0,
        peer_index=msg.get_attr("IFLA_LINK"),
    )


def _only_link(reply: Reply) -> _Link | None:
    for msg in reply.messages:
        if msg["header"]["type"] == RTM_NEWLINK:
            return _parse_link(msg)
    return None


def _is_route(
    msg: Message,
    dst: ipaddress.IPv4Address | None,
    gateway: ipaddress.IPv4Address | None,
    scope: int,
) -> bool:
    if msg["type"] != _RTN_UNICAST or msg["scope"] != scope:
        return False
    if dst is None:
        if msg["dst_len"] != 0:
            return False
    elif msg["dst_len"] != 32 or msg.get_attr("RTA_DST") != str(dst):
        return False
    return gateway is None or msg.get_attr("RTA_GATEWAY") == str(gateway)


def _has_address(msg: Message, ip: ipaddress.IPv4Address) -> bool:
    local = msg.get_attr("IFA_LOCAL")
    if local is None:
        local = msg.get_attr("IFA_ADDRESS")
    return bool(msg["prefixlen"] == 32 and local == str(ip))


def _is_gateway_neighbour(msg: Message, mac: str | None) -> bool:
    if msg.get_attr("NDA_DST") != str(GATEWAY) or not msg["state"] & _NUD_PERMANENT:
        return False
    return mac is None or msg.get_attr("NDA_LLADDR") == mac


def _is_rule(msg: Message, ip: ipaddress.IPv4Address, src: bool, table: int, priority: int) -> bool:
    rtable = msg.get_attr("FRA_TABLE")
    if rtable is None:
        rtable = msg["table"]
    prio = msg.get_attr("FRA_PRIORITY") or 0
    if msg["action"] != _FR_ACT_TO_TBL or rtable != table or prio != priority:
        return False
    if src:
        return bool(
            msg["src_len"] == 32 and msg["dst_len"] == 0 and msg.get_attr("FRA_SRC") == str(ip)
        )
    return bool(msg["dst_len"] == 32 and msg["src_len"] == 0 and msg.get_attr("FRA_DST") == str(ip))


# --- the datapath ---------------------------------------------------------------------------


class Datapath:
    """Wires pods to the node with routed veth pairs. Safe to use from several threads."""

    # One delete_links batch per group at a time in this process, whatever the instance: a
    # batch deletes the whole group, so it must not see another batch's half-moved links.
    _group_locks: ClassVar[dict[int, threading.Lock]] = {
        DELETE_GROUP + i: threading.Lock() for i in range(1 + DELETE_LANES)
    }

    def __init__(self, host_netns: str | None = None) -> None:
        """Work on the node side in ``host_netns`` (a path), or in the constructing thread's
        namespace when None. Raises NetnsNotFound / NotANetns for a bad path."""
        self._host_fd = current_netns_fd() if host_netns is None else open_netns(host_netns)
        self._own_fd = current_netns_fd()
        self._host_name = host_netns or "(own)"
        self._sockets = ThreadSockets(self._host_fd)
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"Datapath(host_netns={self._host_name!r}, {self._sockets!r})"

    def close(self) -> None:
        """Close every socket and the host namespace descriptor. Not while calls are running."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._sockets.close()
        os.close(self._host_fd)
        os.close(self._own_fd)

    def is_node_netns(self, path: str) -> bool:
        """Return whether ``path`` is the node's namespace (the host side's, or the one this
        datapath was made in): no pod may be wired into it."""
        return is_netns_of(path, (self._host_fd, self._own_fd))

    def _host(self) -> Rtnl:
        """Return this thread's host-namespace socket, opening it on first use."""
        if self._closed:
            raise DatapathClosed()
        return self._sockets.get()

    # -- wiring --

    def wire(self, pod: PodNet) -> WiredPod:
        """Create and configure the pod's veth pair; return its ends.

        Raises NetnsNotFound / NotANetns for a bad netns path, LinkExists when ``pod.ifname`` is
        taken in the pod, HostVethExists when ``pod.host_veth`` is taken on the host, and
        WireFailed for any later step. On failure nothing of this pod is left behind.
        """
        if self._closed:
            # Checked up front: the create request names the host namespace by descriptor.
            raise DatapathClosed()
        host_mac = _random_mac()
        with opened_in(pod.netns) as prtnl:
            try:
                created, linked = prtnl.transact(
                    [
                        _newveth(pod, host_mac, self._host_fd),
                        _getlink("read back veth", pod.ifname),
                    ]
                )
            except RequestFailed as e:
                raise WireFailed("create veth", e) from e
            if created.error == errno.EEXIST:
                # The read-back ran after the failed create: it finds a pre-existing pod link.
                if linked.error == 0:
                    raise LinkExists(pod.ifname)
                raise HostVethExists(pod.host_veth)
            if created.error:
                raise WireFailed("create veth", created.failure("create veth"))
            try:
                link = _only_link(linked)
                if link is None or link.peer_index is None:
                    raise WireFailed("read back veth", linked.failure("read back veth"))
                try:
                    self._wire_pod_side(prtnl, pod, link.index, host_mac)
                    self._wire_host_side(pod, link.peer_index)
                except RequestFailed as e:
                    raise WireFailed(e.op, e) from e
            except BaseException:
                # Deleting the pod end deletes the peer and every route through it; rules were
                # already removed by _wire_host_side. Best effort: the first error is the news.
                with contextlib.suppress(NetlinkError):
                    prtnl.one(_dellink(f"delete {pod.ifname}", pod.ifname))
                raise
            return WiredPod(
                pod_mac=link.mac,
                host_mac=host_mac,
                pod_ifindex=link.index,
                host_ifindex=link.peer_index,
            )

    @staticmethod
    def _wire_pod_side(prtnl: Rtnl, pod: PodNet, index: int, host_mac: str) -> None:
        requests = _pod_side(pod, index, host_mac)
        for req, reply in zip(requests, prtnl.transact(requests), strict=True):
            if reply.error:
                raise WireFailed(req.op, reply.failure(req.op))

    def _wire_host_side(self, pod: PodNet, host_index: int) -> None:
        """Bring the host end up, route to the pod, add its rules; on failure remove the rules
        this call added (the route goes with the link)."""
        rules = _rule_reqs(pod, RTM_NEWRULE, CREATE)
        requests = [
            _link_up(f"host veth {pod.host_veth} up", host_index),
            _route_req(
                f"host route {pod.ip}/32",
                RTM_NEWROUTE,
                CREATE,
                dst=pod.ip,
                oif=host_index,
                scope=_RT_SCOPE_LINK,
            ),
            *rules,
        ]
        hrtnl = self._host()
        replies = hrtnl.transact(requests)
        for req, reply in zip(requests, replies, strict=True):
            # An identical rule left by an earlier incarnation is the state we want.
            if reply.error and not (req.type == RTM_NEWRULE and reply.error == errno.EEXIST):
                added = [
                    undo
                    for undo, made in zip(
                        _rule_reqs(pod, RTM_DELRULE, ACKED), replies[2:], strict=True
                    )
                    if made.error == 0
                ]
                if added:
                    with contextlib.suppress(NetlinkError):
                        hrtnl.transact(added)
                raise WireFailed(req.op, reply.failure(req.op))

    def repair_host(self, pod: PodNet) -> list[str]:
        """Put back what is missing from a wired pod's host side (veth down, ``ip/32`` route,
        rules) and return what was put back, in ``check()``'s words; [] when nothing was
        missing or the host veth itself is gone (then the pod is GC's). Raises WireFailed.
        """
        hrtnl = self._host()
        missing: list[str] = []
        host = self._check_host(hrtnl, pod, missing)
        if host is None or not missing:
            return []
        requests = [
            _link_up(f"host veth {pod.host_veth} up", host.index),
            _route_req(
                f"host route {pod.ip}/32",
                RTM_NEWROUTE,
                REPLACE,
                dst=pod.ip,
                oif=host.index,
                scope=_RT_SCOPE_LINK,
            ),
            *_rule_reqs(pod, RTM_NEWRULE, CREATE),
        ]
        for req, r in zip(requests, hrtnl.transact(requests), strict=True):
            if r.error and not (req.type == RTM_NEWRULE and r.error == errno.EEXIST):
                raise WireFailed(req.op, r.failure(req.op))
        return missing

    # -- unwiring --

    def unwire_host(self, pod: PodNet) -> None:
        """Remove the pod's host route and rules. Idempotent: what is gone already is fine.

        Raises RequestFailed for any other kernel error.
        """
        hrtnl = self._host()
        link = hrtnl.one(_getlink(f"host veth {pod.host_veth}", pod.host_veth))
        host = _only_link(link)
        if link.error and link.error not in _GONE_LINK:
            raise link.failure(f"host veth {pod.host_veth}")
        requests = _rule_reqs(pod, RTM_DELRULE, ACKED)
        if host is not None:
            # Matching the oif: the IP may already route to another pod (a replayed DEL).
            requests.insert(
                0,
                _route_req(
                    f"host route {pod.ip}/32",
                    RTM_DELROUTE,
                    ACKED,
                    dst=pod.ip,
                    oif=host.index,
                    scope=_RT_SCOPE_LINK,
                ),
            )
        if not requests:
            return
        for req, reply in zip(requests, hrtnl.transact(requests), strict=True):
            gone = _GONE_RULE if req.type == RTM_DELRULE else _GONE_ROUTE
            if reply.error and reply.error not in gone:
                raise reply.failure(req.op)

    def delete_link(self, host_veth: str) -> None:
        """Delete a veth pair by its host end. Idempotent (``delete_links`` of one name).

        Raises RequestFailed for a kernel error other than "no such device".
        """
        self.delete_links([host_veth])

    def delete_links(self, names: Sequence[str], *, group: int = DELETE_GROUP) -> None:
        """Delete the host links ``names`` (and so their veth peers) with one kernel wait.

        Each link that exists is moved to ``group``, then the group is deleted with one request
        (~20 ms in the kernel for the whole batch, as for one link). Names that do not exist
        are fine, so this is idempotent. One batch per group at a time in this process.

        Raises RequestFailed for a kernel error other than "no such device"; the links that
        could be deleted are gone even then.
        """
        with self._group_locks[group]:
            parked, refused = self.park_links(names, group=group)
            failed = list(refused.values())
            try:
                self.delete_parked(list(parked), group=group)
            except RequestFailed as e:
                failed.insert(0, e)
        if failed:
            raise failed[0]

    def park_links(
        self, names: Sequence[str], *, group: int
    ) -> tuple[dict[str, int], dict[str, RequestFailed]]:
        """Move the host links ``names`` that exist into link group ``group``. Return those
        moved, by name, with their ifindex, and by name the kernel's refusals other than "no
        such device" (those links were not moved). The caller owns ``group``: nothing else may
        be in it, and only one batch at a time.

        Raises RequestFailed when the socket fails.
        """
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}, {}
        hrtnl = self._host()
        requests: list[Request] = []
        for name in wanted:
            requests += [
                _set_group(f"delete {name}", name, group),
                _getlink(f"read back {name}", name),
            ]
        replies = hrtnl.transact(requests)
        parked: dict[str, int] = {}
        failed: dict[str, RequestFailed] = {}
        for name, moved, read in zip(wanted, replies[::2], replies[1::2], strict=True):
            if moved.error:
                if moved.error not in _GONE_LINK:
                    failed[name] = moved.failure(f"delete {name}")
                continue
            link = _only_link(read)
            if link is not None:
                parked[name] = link.index
        return parked, failed

    def delete_parked(self, names: Sequence[str], *, group: int) -> None:
        """Delete link group ``group``, where ``park_links`` put ``names``, with one request.

        Returns once the kernel acknowledged it (the links are unlisted, and RTM_DELLINK
        broadcast, ~15-20 ms before that). Raises RequestFailed like ``delete_links``.
        """
        if not names:
            return
        hrtnl = self._host()
        reply = hrtnl.one(_delete_group("delete link group", group))
        if reply.error and reply.error not in _GONE_LINK:
            failed = [reply.failure("delete link group")]
            failed[:0] = self._delete_one_by_one(hrtnl, list(names))
            raise failed[0]

    @staticmethod
    def _delete_one_by_one(hrtnl: Rtnl, names: list[str]) -> list[RequestFailed]:
        """Fallback when the group delete fails: a link the kernel cannot delete (EOPNOTSUPP,
        e.g. a physical one named by mistake) fails the whole group. Delete each link on its own
        and put the ones that stay back in the default group, so they do not poison the next
        batch. Return the failures."""
        failed: list[RequestFailed] = []
        requests = [_dellink(f"delete {name}", name) for name in names]
        stuck: list[Request] = []
        for req, reply, name in zip(requests, hrtnl.transact(requests), names, strict=True):
            if reply.error and reply.error not in _GONE_LINK:
                failed.append(reply.failure(req.op))
                stuck.append(_set_group(f"reset group of {name}", name, 0))
        if stuck:
            with contextlib.suppress(NetlinkError):
                hrtnl.transact(stuck)
        return failed

    def delete_pod_link(self, netns: str, ifname: str) -> None:
        """Delete a pod's veth pair by its pod end. Idempotent.

        A namespace path that is missing, or no longer a namespace (the runtime unmounted it),
        took the link with it: that is success. Raises RequestFailed for a kernel error.
        """
        try:
            with opened_in(netns) as prtnl:
                reply = prtnl.one(_dellink(f"delete {ifname}", ifname))
        except (NetnsNotFound, NotANetns):
            return
        if reply.error and reply.error not in _GONE_LINK:
            raise reply.failure(f"delete {ifname}")

    # -- inspection --

    def check(self, pod: PodNet) -> list[str]:
        """Return what is missing or wrong compared with what ``wire`` makes; [] when none.

        Raises NetnsNotFound / NotANetns when the pod namespace is gone or not a namespace, and
        RequestFailed for an unexpected kernel error.
        """
        problems: list[str] = []
        host_problems: list[str] = []
        with opened_in(pod.netns) as prtnl:
            host = self._check_host(self._host(), pod, host_problems)
            self._check_pod(prtnl, pod, host, problems)
        return problems + host_problems

    @staticmethod
    def _check_host(hrtnl: Rtnl, pod: PodNet, problems: list[str]) -> _Link | None:
        reply = hrtnl.one(_getlink("host veth", pod.host_veth))
        host = _only_link(reply)
        if reply.error and reply.error not in _GONE_LINK:
            raise reply.failure(f"host veth {pod.host_veth}")
        if host is None:
            problems += [f"host veth {pod.host_veth}", f"host route {pod.ip}/32"]
        else:
            if not host.flags & _IFF_UP:
                problems.append(f"link {pod.host_veth} down")
            routes = hrtnl.dump(_route_dump(host.index))
            if not any(_is_route(m, pod.ip, None, _RT_SCOPE_LINK) for m in routes):
                problems.append(f"host route {pod.ip}/32")
        if pod.table is not None:
            query = fibmsg()
            query["family"] = socket.AF_INET
            # Every pod has rules: decode only those that mention this pod's address.
            rules = hrtnl.dump(Request("rules", RTM_GETRULE, DUMP, query, match=pod.ip.packed))
            if not any(_is_rule(m, pod.ip, True, pod.table, RULE_FROM_PRIORITY) for m in rules):
                problems.append(_rule_from_name(pod))
            if not any(_is_rule(m, pod.ip, False, RT_TABLE_MAIN, RULE_TO_PRIORITY) for m in rules):
                problems.append(_rule_to_name(pod))
        return host

    @staticmethod
    def _check_pod(prtnl: Rtnl, pod: PodNet, host: _Link | None, problems: list[str]) -> None:
        reply = prtnl.one(_getlink("pod link", pod.ifname))
        link = _only_link(reply)
        if reply.error and reply.error not in _GONE_LINK:
            raise reply.failure(f"pod link {pod.ifname}")
        if link is None:
            problems.append(f"pod link {pod.ifname}")
            return
        if host is not None and link.peer_index != host.index:
            problems.append(f"pod link {pod.ifname} paired with {pod.host_veth}")
        if not link.flags & _IFF_UP:
            problems.append(f"link {pod.ifname} down")
        if link.mtu != pod.mtu:
            problems.append(f"mtu {pod.mtu} on {pod.ifname}")
        addr_query = ifaddrmsg()
        addr_query["family"] = socket.AF_INET
        addr_query["index"] = link.index
        addrs = prtnl.dump(Request("addresses", RTM_GETADDR, DUMP, addr_query))
        if not any(_has_address(m, pod.ip) for m in addrs):
            problems.append(f"address {pod.ip}/32 on {pod.ifname}")
        routes = prtnl.dump(_route_dump(link.index))
        if not any(_is_route(m, GATEWAY, None, _RT_SCOPE_LINK) for m in routes):
            problems.append(f"route {GATEWAY} scope link")
        if not any(_is_route(m, None, GATEWAY, _RT_SCOPE_UNIVERSE) for m in routes):
            problems.append(f"default route via {GATEWAY}")
        neigh_query = ndmsg()
        neigh_query["family"] = socket.AF_INET
        neigh_query["attrs"] = [("NDA_IFINDEX", link.index)]
        neighbours = prtnl.dump(Request("neighbours", RTM_GETNEIGH, DUMP, neigh_query))
        want_mac = host.mac if host is not None else None
        if not any(_is_gateway_neighbour(m, want_mac) for m in neighbours):
            problems.append(f"neighbour {GATEWAY}")

    def host_veths(self) -> dict[str, int]:
        """Return every host link named with HOST_VETH_PREFIX, by name, with its ifindex."""
        query = _ifinfmsg(("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "veth")]}))
        found: dict[str, int] = {}
        links = Request("links", RTM_GETLINK, DUMP, query, keep=_LINK_KEEP)
        for msg in self._host().dump(links):
            link = _parse_link(msg)
            if link.name.startswith(HOST_VETH_PREFIX):
                found[link.name] = link.index
        return found

    def link_exists(self, name: str) -> bool:
        """Return whether a link called ``name`` exists in the host namespace."""
        reply = self._host().one(_getlink(f"link {name}", name))
        if reply.error and reply.error not in _GONE_LINK:
            raise reply.failure(f"link {name}")
        return reply.error == 0
