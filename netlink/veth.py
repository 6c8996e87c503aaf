"""Routed-veth pod datapath: wire a pod to the node, check it, unwire it, delete links in bulk.

Theory of operation. A pod gets a veth pair created by a netlink socket that lives in the pod's
namespace, with the peer placed straight into the host namespace (IFLA_NET_NS_FD): creating in
the host and moving costs ~30 ms. The pod end is created up with its MTU in the same request (the
peer cannot be: it has no partner yet when the kernel configures it). The pod side then gets
``ip/32``, ``169.254.1.1 dev <if> scope link``, a permanent neighbour for 169.254.1.1 with the
host veth's MAC, and ``default via 169.254.1.1``; the host side gets the veth up,
``ip/32 dev <veth> scope link`` and, for IPs of a secondary ENI, the two policy rules.

Speed. Requests go in batches over ``netlink.rtnl`` (pyroute2's IPRoute costs ~0.7 ms per
object and ~0.4 ms per request). Every request of wire() is packed with struct
(``netlink.packing``; pyroute2's marshalling is ~0.05-0.3 ms a message, the nested veth create
the dearest); checks and dumps keep pyroute2's classes. wire() is three round trips: create +
read back the link (pod), address/routes/neighbour (pod), up/route/rules (host). The host MAC
is chosen here rather than read back, which also keeps udev's MACAddressPolicy from rewriting
it under the pod's permanent neighbour entry.

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
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETADDR,
    RTM_GETNEIGH,
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
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from netlink import packing, vlan
from netlink.dot1q import links as dot1q_links
from netlink.errors import (
    DatapathClosed,
    HostVethExists,
    LinkExists,
    NetlinkError,
    NetnsNotFound,
    NotANetns,
    ProgramRefused,
    RequestFailed,
    WireFailed,
)
from netlink.names import HOST_VETH_PREFIXES
from netlink.nftables import Nft
from netlink.ns import current_netns_fd, entered, is_netns_of, open_netns
from netlink.requests import (
    FR_ACT_TO_TBL,
    GONE_LINK,
    GONE_ROUTE,
    GONE_RULE,
    IFF_UP,
    LINK_KEEP,
    LINK_KEEP_KIND,
    NUD_PERMANENT,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    Link,
    delete_group,
    dellink,
    dump_links,
    getlink,
    is_route,
    link_msg,
    link_up,
    only_link,
    route_dump,
    route_req,
    rule_req,
    set_group,
)
from netlink.rtnl import (
    ACKED,
    CREATE,
    DUMP,
    REPLACE,
    Message,
    Request,
    Rtnl,
    ThreadSockets,
    opened_in,
)
from netlink.vlan import BranchLink

GATEWAY = ipaddress.IPv4Address("169.254.1.1")
RULE_FROM_PRIORITY = 1536
RULE_TO_PRIORITY = 512
# The link groups links are parked in just before the whole group is deleted: DELETE_GROUP for
# delete_links, the next DELETE_LANES for agent.cni.deleter's concurrent rounds. Reserved:
# nothing else on the node may put a link in them, or the next batch deletes that link too (or,
# for a link the kernel cannot delete, fails and falls back to one request per link).
DELETE_GROUP = 0x70770001
DELETE_LANES = 4


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
    # A pod with its own branch ENI (security groups for pods): reached through the VLAN link
    # of ``netlink.vlan``. In strict mode ``table`` is None (no 512/1536 rules, iif rules
    # instead); in standard mode it is the branch's table.
    branch: BranchLink | None = None

    @property
    def host_table(self) -> int:
        """Where the host route ``ip/32 dev <host veth>`` goes: main, or a strict branch's
        table."""
        b = self.branch
        return b.table if b is not None and b.strict else RT_TABLE_MAIN


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
    return raw.hex(":")


def _rule_reqs(pod: PodNet, mtype: int, flags: int) -> list[Request]:
    if pod.table is None:
        return []
    return [
        rule_req(
            _rule_from_name(pod),
            mtype,
            flags,
            pod.ip,
            src=True,
            table=pod.table,
            priority=RULE_FROM_PRIORITY,
        ),
        rule_req(
            _rule_to_name(pod),
            mtype,
            flags,
            pod.ip,
            src=False,
            table=RT_TABLE_MAIN,
            priority=RULE_TO_PRIORITY,
        ),
    ]


def _host_rule_reqs(pod: PodNet, mtype: int, flags: int) -> list[Request]:
    """The rules wiring adds: 512/1536 for a pod with a table, the iif rules in strict mode."""
    reqs = _rule_reqs(pod, mtype, flags)
    b = pod.branch
    if b is not None and b.strict:
        reqs += vlan.iif_rules(b, pod.host_veth, mtype, flags)
    return reqs


def _branch_rules_all_modes(pod: PodNet, b: BranchLink) -> list[Request]:
    """Deletions of every rule either mode makes for a branch pod (a DEL must clean up after a
    mode switch too, as VPC CNI's teardown does)."""
    standard = attrs.evolve(pod, table=b.table)
    return [
        *_rule_reqs(standard, RTM_DELRULE, ACKED),
        *vlan.iif_rules(b, pod.host_veth, RTM_DELRULE, ACKED),
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
        route_req(
            f"route {GATEWAY} scope link",
            RTM_NEWROUTE,
            CREATE,
            dst=GATEWAY,
            oif=index,
            scope=RT_SCOPE_LINK,
        ),
        # REPLACE: the kernel may already hold an incomplete entry for the gateway.
        Request(
            f"neighbour {GATEWAY}",
            RTM_NEWNEIGH,
            REPLACE,
            packing.permanent_neighbour(index, GATEWAY, host_mac),
        ),
        route_req(
            f"default route via {GATEWAY}",
            RTM_NEWROUTE,
            CREATE,
            dst=None,
            oif=index,
            scope=RT_SCOPE_UNIVERSE,
            gateway=GATEWAY,
        ),
    ]


# --- replies --------------------------------------------------------------------------------


def _has_address(msg: Message, ip: ipaddress.IPv4Address) -> bool:
    local = msg.get_attr("IFA_LOCAL")
    if local is None:
        local = msg.get_attr("IFA_ADDRESS")
    return bool(msg["prefixlen"] == 32 and local == str(ip))


def _is_gateway_neighbour(msg: Message, mac: str | None) -> bool:
    if msg.get_attr("NDA_DST") != str(GATEWAY) or not msg["state"] & NUD_PERMANENT:
        return False
    return mac is None or msg.get_attr("NDA_LLADDR") == mac


def _is_rule(msg: Message, ip: ipaddress.IPv4Address, src: bool, table: int, priority: int) -> bool:
    rtable = msg.get_attr("FRA_TABLE")
    if rtable is None:
        rtable = msg["table"]
    prio = msg.get_attr("FRA_PRIORITY") or 0
    if msg["action"] != FR_ACT_TO_TBL or rtable != table or prio != priority:
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
        self._host_path = host_netns
        self._nft_backend: Nft | None = None
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
        if self._nft_backend is not None:
            self._nft_backend.close()
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
                        getlink("read back veth", pod.ifname),
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
                link = only_link(linked)
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
                    prtnl.one(dellink(f"delete {pod.ifname}", pod.ifname))
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
        """Bring the host end up, route to the pod, add its rules (and a branch pod's VLAN link,
        table and strict-mode forward); on failure remove what this call added (routes go with
        their links)."""
        hrtnl = self._host()
        b = pod.branch
        branch_index = self._make_branch_link(hrtnl, b) if b is not None else None
        rules = _host_rule_reqs(pod, RTM_NEWRULE, CREATE)
        requests = [
            link_up(f"host veth {pod.host_veth} up", host_index),
            route_req(
                f"host route {pod.ip}/32" + (f" table {pod.host_table}" if b else ""),
                RTM_NEWROUTE,
                CREATE,
                dst=pod.ip,
                oif=host_index,
                scope=RT_SCOPE_LINK,
                table=pod.host_table,
            ),
            *rules,
        ]
        if b is not None and branch_index is not None:
            requests += vlan.table_routes(b, branch_index, RTM_NEWROUTE, REPLACE)
        replies = hrtnl.transact(requests)
        failed: NetlinkError | None = None
        for req, reply in zip(requests, replies, strict=True):
            # An identical rule left by an earlier incarnation is the state we want.
            if reply.error and not (req.type == RTM_NEWRULE and reply.error == errno.EEXIST):
                failed = WireFailed(req.op, reply.failure(req.op))
                break
        if failed is None and b is not None and b.strict:
            try:
                self._nft_run(vlan.render_local_fwd(pod.host_veth, b))
            except NetlinkError as e:
                failed = WireFailed("strict local forward", e)
        if failed is None:
            return
        added = [
            undo
            for undo, made in zip(
                _host_rule_reqs(pod, RTM_DELRULE, ACKED), replies[2 : 2 + len(rules)], strict=True
            )
            if made.error == 0
        ]
        if b is not None:
            added.append(dellink(f"delete {b.name}", b.name))
        with contextlib.suppress(NetlinkError):
            hrtnl.transact(added)
            if b is not None and b.kind == "ebpf":
                dot1q_links.sync(hrtnl, b.trunk_index)
        raise failed

    @staticmethod
    def _make_branch_link(hrtnl: Rtnl, b: BranchLink) -> int:
        """Create ``vlan.eth.<vid>`` afresh (a link left with that name is deleted first, as
        VPC CNI does) and return its ifindex. Raises RequestFailed, WireFailed (an ebpf link's
        program refused)."""
        if b.kind == "ebpf":
            try:
                return dot1q_links.create(hrtnl, vlan.dot1q_link(b))
            except ProgramRefused as e:
                raise WireFailed(f"802.1Q programs of {b.name}", e) from e
        gone, made, read = hrtnl.transact(
            [
                dellink(f"delete stale {b.name}", b.name),
                vlan.new_link(b),
                getlink(f"read back {b.name}", b.name),
            ]
        )
        if gone.error and gone.error not in GONE_LINK:
            raise gone.failure(f"delete stale {b.name}")
        if made.error:
            raise made.failure(f"create {b.name} ({b.kind} on ifindex {b.trunk_index})")
        link = only_link(read)
        if link is None:
            raise read.failure(f"read back {b.name}")
        return link.index

    def repair_host(self, pod: PodNet) -> list[str]:
        """Put back what is missing from a wired pod's host side (veth down, ``ip/32`` route,
        rules; a branch pod's VLAN link, table, rules and strict-mode forward) and return what
        was put back, in ``check()``'s words; [] when nothing was missing or the host veth
        itself is gone (then the pod is GC's). Raises WireFailed.
        """
        hrtnl = self._host()
        missing: list[str] = []
        host = self._check_host(hrtnl, pod, missing)
        if host is None or not missing:
            return []
        b = pod.branch
        requests = [
            link_up(f"host veth {pod.host_veth} up", host.index),
            route_req(
                f"host route {pod.ip}/32",
                RTM_NEWROUTE,
                REPLACE,
                dst=pod.ip,
                oif=host.index,
                scope=RT_SCOPE_LINK,
                table=pod.host_table,
            ),
            *_host_rule_reqs(pod, RTM_NEWRULE, CREATE),
        ]
        try:
            if b is not None:
                link_broken = any(m.startswith(f"link {b.name}") for m in missing)
                index = self._make_branch_link(hrtnl, b) if link_broken else None
                if index is None:
                    read = hrtnl.one(getlink(f"link {b.name}", b.name))
                    found = only_link(read)
                    if found is None:
                        raise read.failure(f"link {b.name}")
                    index = found.index
                requests += vlan.table_routes(b, index, RTM_NEWROUTE, REPLACE)
                if not link_broken and any(m.startswith("802.1Q ") for m in missing):
                    dot1q_links.repair(hrtnl, vlan.dot1q_link(b), index)
        except RequestFailed as e:
            raise WireFailed(e.op, e) from e
        except ProgramRefused as e:
            raise WireFailed(f"802.1Q programs of {b.name if b else pod.host_veth}", e) from e
        for req, r in zip(requests, hrtnl.transact(requests), strict=True):
            if r.error and not (req.type == RTM_NEWRULE and r.error == errno.EEXIST):
                raise WireFailed(req.op, r.failure(req.op))
        if b is not None and b.strict:
            try:
                self._nft_run(vlan.render_local_fwd(pod.host_veth, b))
            except NetlinkError as e:
                raise WireFailed("strict local forward", e) from e
        return missing

    # -- unwiring --

    def unwire_host(self, pod: PodNet) -> None:
        """Remove the pod's host route and rules (a branch pod's: both modes' rules, its
        strict-mode forward, and its VLAN link set down; the caller deletes that link).
        Idempotent: what is gone already is fine.

        Raises RequestFailed for any other kernel error.
        """
        hrtnl = self._host()
        link = hrtnl.one(getlink(f"host veth {pod.host_veth}", pod.host_veth))
        host = only_link(link)
        if link.error and link.error not in GONE_LINK:
            raise link.failure(f"host veth {pod.host_veth}")
        b = pod.branch
        requests = _rule_reqs(pod, RTM_DELRULE, ACKED) if b is None else []
        if b is not None:
            requests += _branch_rules_all_modes(pod, b)
            # Down at once, so nothing reaches the pod's old address meanwhile; deleting a
            # link waits in the kernel, so the caller batches the deletion.
            requests.append(
                Request(
                    f"{b.name} down",
                    RTM_SETLINK,
                    ACKED,
                    link_msg(("IFLA_IFNAME", b.name), down=True),
                )
            )
        if host is not None:
            # Matching the oif: the IP may already route to another pod (a replayed DEL).
            tables = [RT_TABLE_MAIN] if b is None else [RT_TABLE_MAIN, b.table]
            requests[:0] = [
                route_req(
                    f"host route {pod.ip}/32 table {table}",
                    RTM_DELROUTE,
                    ACKED,
                    dst=pod.ip,
                    oif=host.index,
                    scope=RT_SCOPE_LINK,
                    table=table,
                )
                for table in tables
            ]
        if requests:
            for req, reply in zip(requests, hrtnl.transact(requests), strict=True):
                if req.type == RTM_DELRULE:
                    gone = GONE_RULE
                elif req.type == RTM_SETLINK:
                    gone = GONE_LINK
                else:
                    gone = GONE_ROUTE
                if reply.error and reply.error not in gone:
                    raise reply.failure(req.op)
        if b is not None:
            if b.kind == "ebpf":  # the link is down: out of the trunk's demultiplexer now
                dot1q_links.sync(hrtnl, b.trunk_index)
            self._nft_run(vlan.render_local_fwd_removal([pod.host_veth]))

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
                set_group(f"delete {name}", name, group),
                getlink(f"read back {name}", name),
            ]
        replies = hrtnl.transact(requests)
        parked: dict[str, int] = {}
        failed: dict[str, RequestFailed] = {}
        for name, moved, read in zip(wanted, replies[::2], replies[1::2], strict=True):
            if moved.error:
                if moved.error not in GONE_LINK:
                    failed[name] = moved.failure(f"delete {name}")
                continue
            link = only_link(read)
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
        reply = hrtnl.one(delete_group("delete link group", group))
        if reply.error and reply.error not in GONE_LINK:
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
        requests = [dellink(f"delete {name}", name) for name in names]
        stuck: list[Request] = []
        for req, reply, name in zip(requests, hrtnl.transact(requests), names, strict=True):
            if reply.error and reply.error not in GONE_LINK:
                failed.append(reply.failure(req.op))
                stuck.append(set_group(f"reset group of {name}", name, 0))
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
                reply = prtnl.one(dellink(f"delete {ifname}", ifname))
        except (NetnsNotFound, NotANetns):
            return
        if reply.error and reply.error not in GONE_LINK:
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

    def _check_host(self, hrtnl: Rtnl, pod: PodNet, problems: list[str]) -> Link | None:
        reply = hrtnl.one(getlink("host veth", pod.host_veth))
        host = only_link(reply)
        if reply.error and reply.error not in GONE_LINK:
            raise reply.failure(f"host veth {pod.host_veth}")
        if host is None:
            problems += [f"host veth {pod.host_veth}", f"host route {pod.ip}/32"]
        else:
            if not host.flags & IFF_UP:
                problems.append(f"link {pod.host_veth} down")
            routes = hrtnl.dump(route_dump(host.index, table=pod.host_table))
            if not any(is_route(m, pod.ip, None, RT_SCOPE_LINK) for m in routes):
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
        if pod.branch is not None:
            self._check_branch(hrtnl, pod, pod.branch, problems)
        return host

    def _check_branch(self, hrtnl: Rtnl, pod: PodNet, b: BranchLink, problems: list[str]) -> None:
        reply = hrtnl.one(getlink(f"link {b.name}", b.name, keep=LINK_KEEP_KIND))
        if reply.error and reply.error not in GONE_LINK:
            raise reply.failure(f"link {b.name}")
        link = only_link(reply)
        problems += vlan.link_problems(b, link)
        if link is not None and b.kind == "ebpf":
            problems += dot1q_links.problems(hrtnl, vlan.dot1q_link(b), link.index)
        if link is not None:
            routes = hrtnl.dump(route_dump(link.index, table=b.table))
            problems += vlan.table_problems(b, link.index, routes)
        else:
            problems += vlan.table_problems(b, 0, [])
        if not b.strict:
            return
        query = fibmsg()
        query["family"] = socket.AF_INET
        found = set()
        for name in (b.name, pod.host_veth):
            dumped = hrtnl.dump(Request("rules", RTM_GETRULE, DUMP, query, match=name.encode()))
            found |= {(r.iifname, r.table) for r in vlan.iif_rules_of(dumped)}
        for name in (b.name, pod.host_veth):
            if (name, b.table) not in found:
                problems.append(vlan.iif_rule_name(name, b.table))
        if not self.local_rules().moved:
            problems.append(f"rule lookup local moved to {vlan.LOCAL_RULE_PRIORITY}")
        chains = self.strict_chains()
        if chains.get(pod.host_veth) != vlan.expected_fwd(b):
            problems.append(f"strict local forward on {pod.host_veth}")

    @staticmethod
    def _check_pod(prtnl: Rtnl, pod: PodNet, host: Link | None, problems: list[str]) -> None:
        reply = prtnl.one(getlink("pod link", pod.ifname))
        link = only_link(reply)
        if reply.error and reply.error not in GONE_LINK:
            raise reply.failure(f"pod link {pod.ifname}")
        if link is None:
            problems.append(f"pod link {pod.ifname}")
            return
        if host is not None and link.peer_index != host.index:
            problems.append(f"pod link {pod.ifname} paired with {pod.host_veth}")
        if not link.flags & IFF_UP:
            problems.append(f"link {pod.ifname} down")
        if link.mtu != pod.mtu:
            problems.append(f"mtu {pod.mtu} on {pod.ifname}")
        addr_query = ifaddrmsg()
        addr_query["family"] = socket.AF_INET
        addr_query["index"] = link.index
        addrs = prtnl.dump(Request("addresses", RTM_GETADDR, DUMP, addr_query))
        if not any(_has_address(m, pod.ip) for m in addrs):
            problems.append(f"address {pod.ip}/32 on {pod.ifname}")
        routes = prtnl.dump(route_dump(link.index))
        if not any(is_route(m, GATEWAY, None, RT_SCOPE_LINK) for m in routes):
            problems.append(f"route {GATEWAY} scope link")
        if not any(is_route(m, None, GATEWAY, RT_SCOPE_UNIVERSE) for m in routes):
            problems.append(f"default route via {GATEWAY}")
        neigh_query = ndmsg()
        neigh_query["family"] = socket.AF_INET
        neigh_query["attrs"] = [("NDA_IFINDEX", link.index)]
        neighbours = prtnl.dump(Request("neighbours", RTM_GETNEIGH, DUMP, neigh_query))
        want_mac = host.mac if host is not None else None
        if not any(_is_gateway_neighbour(m, want_mac) for m in neighbours):
            problems.append(f"neighbour {GATEWAY}")

    def host_veths(self) -> dict[str, int]:
        """Return every host link named with one of HOST_VETH_PREFIXES, by name, with its
        ifindex."""
        query = link_msg(("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "veth")]}))
        return {
            link.name: link.index
            for link in dump_links(self._host(), "links", query, LINK_KEEP)
            if link.name.startswith(HOST_VETH_PREFIXES)
        }

    # -- branch ENIs: node-wide state, and what GC looks at --

    def _nft(self) -> Nft:
        """The nftables backend of the host namespace, opened on first use."""
        with self._lock:
            if self._closed:
                raise DatapathClosed()
            if self._nft_backend is None:
                if self._host_path is None:
                    self._nft_backend = Nft.open()
                else:
                    self._nft_backend = Nft.open(netns_path=self._host_path)
            return self._nft_backend

    def _in_host(self) -> contextlib.AbstractContextManager[None]:
        # libnftables resolves interface names in the calling thread's namespace: the node's.
        return contextlib.nullcontext() if self._host_path is None else entered(self._host_fd)

    def _nft_run(self, script: str) -> None:
        nft = self._nft()
        with self._in_host():
            nft.run(script)

    def _rules(self) -> list[Message]:
        query = fibmsg()
        query["family"] = socket.AF_INET
        return self._host().dump(Request("rules", RTM_GETRULE, DUMP, query))

    def local_rules(self) -> vlan.LocalRules:
        """Where the ``lookup local`` rules of the host namespace are."""
        return vlan.local_rules_of(self._rules())

    def move_local_rule(self) -> bool:
        """Strict mode's node-wide step: ``lookup local`` from priority 0 to 20 (added at 20
        first, so the node is never without it). Idempotent; returns whether it changed
        anything. Raises RequestFailed."""
        return self._set_local_rule(vlan.LOCAL_RULE_PRIORITY, 0)

    def restore_local_rule(self) -> bool:
        """The reverse of ``move_local_rule``: back at 0, none at 20. Idempotent."""
        return self._set_local_rule(0, vlan.LOCAL_RULE_PRIORITY)

    def _set_local_rule(self, want: int, drop: int) -> bool:
        state = self.local_rules()
        requests = []
        if want not in state.priorities:
            requests.append(vlan.local_rule(RTM_NEWRULE, CREATE, want))
        if drop in state.priorities:
            requests.append(vlan.local_rule(RTM_DELRULE, ACKED, drop))
        for req, reply in zip(requests, self._host().transact(requests), strict=True):
            if reply.error and reply.error not in (errno.EEXIST, errno.ENOENT):
                raise reply.failure(req.op)
        return bool(requests)

    def branch_links(self) -> dict[str, Link]:
        """Every ``vlan.eth.<vid>`` link of the host namespace, by name."""
        return {
            link.name: link
            for link in dump_links(self._host(), "links", link_msg(), LINK_KEEP_KIND)
            if vlan.vlan_of_link(link.name) is not None
        }

    def vlan_support(self) -> dot1q_links.Support:
        """What the host namespace's kernel offers for branch links (creates nothing)."""
        return dot1q_links.support(self._host())

    def sync_dot1q(self, parents: Sequence[int], *, dry_run: bool = False) -> list[str]:
        """Make every trunk's 802.1Q demultiplexer exactly the one of its live ebpf links
        (``parents``: trunks whose last link may be gone); return what was (or, with
        ``dry_run``, would be) changed. Raises RequestFailed, ProgramRefused."""
        hrtnl = self._host()
        if dry_run:
            return [s.describe() for s in dot1q_links.stale(hrtnl, parents)]
        return [s.describe() for s in dot1q_links.sync_all(hrtnl, parents)]

    def iif_rules(self) -> list[vlan.IifRule]:
        """The ``iif X lookup T`` rules at priority 10 of the host namespace."""
        return vlan.iif_rules_of(self._rules())

    def delete_iif_rules(self, rules: Sequence[vlan.IifRule]) -> None:
        """Delete these priority-10 rules; already gone is fine. Raises RequestFailed."""
        requests = [
            vlan.iif_rule(
                vlan.iif_rule_name(r.iifname, r.table), RTM_DELRULE, ACKED, r.iifname, r.table
            )
            for r in rules
        ]
        for req, reply in zip(requests, self._host().transact(requests), strict=True):
            if reply.error and reply.error not in GONE_RULE:
                raise reply.failure(req.op)

    def strict_chains(self) -> dict[str, str]:
        """Our netdev ingress chains (one per strict pod's host veth) -> what each forwards."""
        nft = self._nft()
        with self._in_host():
            listing = nft.list_table_json(vlan.NFT_FAMILY, vlan.NFT_TABLE)
        return vlan.chains_of(listing)

    def delete_strict_chains(self, host_veths: Sequence[str]) -> None:
        """Delete these pods' netdev chains; already gone is fine. Raises NftError."""
        if host_veths:
            self._nft_run(vlan.render_local_fwd_removal(host_veths))

    def set_link_up(self, index: int, mtu: int) -> None:
        """Set a link's MTU and bring it up (the trunk ENI's link). Raises RequestFailed."""
        msg = link_msg(("IFLA_MTU", mtu), index=index, up=True)
        reply = self._host().one(Request(f"link {index} up", RTM_SETLINK, ACKED, msg))
        if reply.error:
            raise reply.failure(f"link {index} mtu {mtu} up")

    def link_exists(self, name: str) -> bool:
        """Return whether a link called ``name`` exists in the host namespace."""
        reply = self._host().one(getlink(f"link {name}", name))
        if reply.error and reply.error not in GONE_LINK:
            raise reply.failure(f"link {name}")
        return reply.error == 0
