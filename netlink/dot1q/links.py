"""802.1Q links on kernels without VLAN devices: a veth end tagged by eBPF.

Theory of operation.

* A link is a veth pair in one namespace: ``<name>`` with the branch's MAC, the parent's MTU,
  up, and the alias ``podwire 802.1Q id <vid> on ifindex <parent>``; and its peer
  ``<name>p``, up and idle (a veth has carrier only while its peer is up). The link's egress
  program (``programs.tagger``) pushes the tag and sends every frame out of the parent, so
  nothing ever reaches the peer. Routes, neighbours, rules and sockets see an ordinary link.
* The parent's ingress program (``programs.demux``) delivers a frame tagged with a link's VLAN
  id on that link, untagged; every other frame goes on as before (untagged ones are the
  parent's own). It is the one object links share, and its content is a function of the
  kernel's state: the links that are up and whose alias names this parent. ``sync`` looks
  and re-renders it whenever a link is made, set down before its deletion, or found deleted,
  under one process-wide lock so that two syncs never interleave a look and an attach; a
  link set down leaves the demultiplexer at once.
* Checks compare tags (``programs.tags``): the program on a link's egress must be exactly
  ``tagger(vid, parent)``, the parent's exactly ``demux(its live links)``. What differs is a
  problem in CHECK's words, and ``repair`` attaches the right programs again.
* ``support`` tells, without creating anything, whether the kernel has real VLAN devices
  (then use those: ``type vlan``) and whether it can load tc programs.

Every function takes the rtnetlink socket of the namespace to work in (``netlink.rtnl``).
"""

from __future__ import annotations

import errno
import re
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import Final

import attrs
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_NEWLINK, RTM_SETLINK

from netlink.dot1q import kernel, tc
from netlink.dot1q.programs import Branch, demux, tagger, tags
from netlink.dot1q.tc import BpfFilter
from netlink.errors import NetlinkError, RequestFailed
from netlink.packing import ifinfomsg, nla, nla_str
from netlink.requests import GONE_LINK, LINK_KEEP, dellink, getlink, link_msg, only_link
from netlink.rtnl import ACKED, CREATE, DUMP, Message, Request, Rtnl

ALIAS_PREFIX: Final = "podwire 802.1Q"
TAGGER: Final = "pw_dot1q_tag"  # program object names (15 characters at most)
DEMUX: Final = "pw_dot1q_demux"
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_IFALIAS = 1, 3, 4, 18, 20
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
# What a look at the links decodes of each: name and alias (index and flags are the header's).
_LIVE_KEEP = frozenset({IFLA_IFNAME, IFLA_IFALIAS})
_ALIAS = re.compile(rf"^{ALIAS_PREFIX} id (\d{{1,4}}) on ifindex (\d+)$")

# One sync at a time in this process: a sync looks at the links, then attaches the program it
# computed from what it saw; another sync in between would be overwritten with an older view.
_SYNC_LOCK = threading.Lock()


@attrs.frozen(kw_only=True)
class Dot1qLink:
    """The link of VLAN ``vlan_id`` on link ``parent`` (an ifindex)."""

    name: str
    vlan_id: int
    mac: str
    parent: int

    @property
    def peer(self) -> str:
        return f"{self.name[:14]}p"

    @property
    def alias(self) -> str:
        return f"{ALIAS_PREFIX} id {self.vlan_id} on ifindex {self.parent}"


def parse_alias(alias: str) -> tuple[int, int] | None:
    """(VLAN id, parent ifindex) of a link alias written here; None for any other text."""
    m = _ALIAS.match(alias)
    return (int(m.group(1)), int(m.group(2))) if m else None


@attrs.frozen(kw_only=True)
class LiveLink:
    """One of these links as the kernel shows it."""

    name: str
    index: int
    vlan_id: int
    parent: int
    up: bool


def ranges(values: Iterable[int]) -> str:
    """``1-3,7``: sorted, runs collapsed ("none" for none)."""
    out: list[str] = []
    ordered = sorted(set(values))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out) or "none"


def tagger_label(link: Dot1qLink) -> str:
    return f"{TAGGER} vlan {link.vlan_id}"


def demux_label(vlans: Iterable[int]) -> str:
    """The demultiplexer's filter name: for people (``tc filter show``) and reports; what it
    holds is verified by the program's tag, never read from here."""
    label = f"{DEMUX} vlans {ranges(vlans)}"
    return label if len(label) <= tc.NAME_MAX else label[: tc.NAME_MAX - 3] + "..."


def demux_for(links: Sequence[LiveLink]) -> tuple[bytes, tuple[int, ...]]:
    """The demultiplexer program of ``links`` (the up links on one parent) and the VLAN ids it
    holds. Two links claiming one VLAN id: the older (lower ifindex) gets its frames."""
    chosen: dict[int, LiveLink] = {}
    for link in sorted(links, key=lambda x: x.index):
        chosen.setdefault(link.vlan_id, link)
    branches = [Branch(vlan_id=v, ifindex=chosen[v].index) for v in sorted(chosen)]
    return demux(branches), tuple(sorted(chosen))


# --- looking --------------------------------------------------------------------------------


def live_links(rtnl: Rtnl) -> list[LiveLink]:
    """Every link of the namespace carrying one of our aliases. Raises RequestFailed."""
    # Only messages holding the alias text are decoded: a node's hundreds of pod veths are not.
    dump = Request(
        "links", RTM_GETLINK, DUMP, ifinfomsg(), match=ALIAS_PREFIX.encode(), keep=_LIVE_KEEP
    )
    return links_of(rtnl.dump(dump))


def links_of(messages: Iterable[Message]) -> list[LiveLink]:
    out = []
    for m in messages:
        parsed = parse_alias(m.get_attr("IFLA_IFALIAS") or "")
        if parsed is None:
            continue
        out.append(
            LiveLink(
                name=m.get_attr("IFLA_IFNAME") or "",
                index=m["index"],
                vlan_id=parsed[0],
                parent=parsed[1],
                up=bool(m["flags"] & 1),
            )
        )
    return out


def _ours(filters: Sequence[BpfFilter]) -> BpfFilter | None:
    return next((f for f in filters if f.ours), None)


@attrs.frozen(kw_only=True)
class Demux:
    """A parent's demultiplexer: what is attached (None: nothing of ours) and what should be."""

    parent: int
    attached: BpfFilter | None
    program: bytes
    vlans: tuple[int, ...]  # what it should hold

    @property
    def exact(self) -> bool:
        """Attached and exactly the program of the live links (none attached when none)."""
        if not self.vlans:
            return self.attached is None
        return self.attached is not None and self.attached.tag in tags(self.program)

    def describe(self) -> str:
        found = self.attached.name if self.attached is not None else "nothing"
        return (
            f"802.1Q demultiplexer on ifindex {self.parent} for VLANs {ranges(self.vlans)} "
            f"(found: {found})"
        )


def look(rtnl: Rtnl, parent: int, links: Sequence[LiveLink] | None = None) -> Demux:
    """The demultiplexer of ``parent`` as it is and as it should be. Raises RequestFailed."""
    found = live_links(rtnl) if links is None else links
    program, vlans = demux_for([x for x in found if x.parent == parent and x.up])
    return Demux(
        parent=parent,
        attached=_ours(kernel.filters(rtnl, parent, "ingress")),
        program=program,
        vlans=vlans,
    )


# --- changing -------------------------------------------------------------------------------


def sync(rtnl: Rtnl, parent: int) -> Demux | None:
    """Make ``parent``'s demultiplexer exactly the one of its live links: attach it, replace
    it, or remove ours when no link is left. Returns the state found when it had to change
    anything (None when it was right). Raises RequestFailed, ProgramRefused."""
    with _SYNC_LOCK:
        state = look(rtnl, parent)
        if state.exact:
            return None
        if state.vlans:
            kernel.attach(rtnl, parent, "ingress", state.program, DEMUX, demux_label(state.vlans))
        else:
            req = tc.delete_filter(parent, "ingress")
            reply = rtnl.one(req)
            if reply.error not in (0, errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise reply.failure(req.op)
        return state


def sync_all(rtnl: Rtnl, parents: Iterable[int] = ()) -> list[Demux]:
    """``sync`` every parent named by a link's alias and every one in ``parents`` (where the
    last link may be gone); return the states that had to change."""
    wanted = set(parents) | {x.parent for x in live_links(rtnl)}
    changed = []
    for parent in sorted(wanted):
        state = sync(rtnl, parent)
        if state is not None:
            changed.append(state)
    return changed


def stale(rtnl: Rtnl, parents: Iterable[int] = ()) -> list[Demux]:
    """What ``sync_all`` would change, changing nothing."""
    found = live_links(rtnl)
    wanted = set(parents) | {x.parent for x in found}
    states = [look(rtnl, parent, found) for parent in sorted(wanted)]
    return [s for s in states if not s.exact]


def _new_veth(link: Dot1qLink, mtu: int) -> Request:
    """The veth pair, the link's end up; packed by hand (pyroute2 spends ~1 ms on this)."""
    peer = ifinfomsg(nla_str(IFLA_IFNAME, link.peer), nla(IFLA_MTU, struct.pack("=I", mtu)))
    info = nla(IFLA_INFO_KIND, b"veth\0") + nla(IFLA_INFO_DATA, nla(VETH_INFO_PEER, peer))
    body = ifinfomsg(
        nla_str(IFLA_IFNAME, link.name),
        nla(IFLA_ADDRESS, bytes.fromhex(link.mac.replace(":", ""))),
        nla(IFLA_MTU, struct.pack("=I", mtu)),
        nla(IFLA_LINKINFO, info),
        up=True,
    )
    return Request(f"create {link.name} (veth)", RTM_NEWLINK, CREATE, body)


def _set_alias_and_peer_up(link: Dot1qLink) -> list[Request]:
    # The alias is not applied by a create: set it on its own, in the same batch.
    alias = ifinfomsg(nla_str(IFLA_IFNAME, link.name), nla_str(IFLA_IFALIAS, link.alias))
    peer = ifinfomsg(nla_str(IFLA_IFNAME, link.peer), up=True)
    return [
        Request(f"alias of {link.name}", RTM_SETLINK, ACKED, alias),
        Request(f"{link.peer} up", RTM_SETLINK, ACKED, peer),
    ]


def attach_tagger(rtnl: Rtnl, link: Dot1qLink, index: int) -> None:
    """Put the link's egress program (back) on ``index``. Raises RequestFailed,
    ProgramRefused."""
    kernel.attach(
        rtnl, index, "egress", tagger(link.vlan_id, link.parent), TAGGER, tagger_label(link)
    )


def create(rtnl: Rtnl, link: Dot1qLink) -> int:
    """Make ``link`` afresh (a link left with its name is deleted first), its programs
    attached and the parent's demultiplexer synced; return its ifindex. On failure nothing of
    it is left. Raises RequestFailed, ProgramRefused."""
    gone, parent = rtnl.transact(
        [
            dellink(f"delete stale {link.name}", link.name),
            Request(
                f"parent ifindex {link.parent}",
                RTM_GETLINK,
                ACKED,
                ifinfomsg(index=link.parent),
                keep=LINK_KEEP,
            ),
        ]
    )
    if gone.error and gone.error not in GONE_LINK:
        raise gone.failure(f"delete stale {link.name}")
    found = only_link(parent)
    if found is None:
        raise parent.failure(f"parent ifindex {link.parent} of {link.name}")
    requests = [_new_veth(link, found.mtu), *_set_alias_and_peer_up(link)]
    requests.append(getlink(f"read back {link.name}", link.name))
    replies = rtnl.transact(requests)
    try:
        for req, reply in zip(requests[:-1], replies[:-1], strict=True):
            if reply.error:
                raise reply.failure(req.op)
        made = only_link(replies[-1])
        if made is None:
            raise replies[-1].failure(f"read back {link.name}")
        attach_tagger(rtnl, link, made.index)
        sync(rtnl, link.parent)
    except BaseException:
        _undo(rtnl, link)
        raise
    return made.index


def _undo(rtnl: Rtnl, link: Dot1qLink) -> None:
    try:
        rtnl.one(dellink(f"delete {link.name}", link.name))
        sync(rtnl, link.parent)
    except NetlinkError:
        pass  # best effort: the first error is the news


def delete(rtnl: Rtnl, link: Dot1qLink) -> None:
    """Delete ``link`` (gone already is fine) and sync its parent's demultiplexer. Raises
    RequestFailed, ProgramRefused."""
    reply = rtnl.one(dellink(f"delete {link.name}", link.name))
    if reply.error and reply.error not in GONE_LINK:
        raise reply.failure(f"delete {link.name}")
    sync(rtnl, link.parent)


def problems(rtnl: Rtnl, link: Dot1qLink, index: int) -> list[str]:
    """What is wrong with ``link`` (at ``index``) as an 802.1Q link -- its alias, its tagger,
    its parent's demultiplexer -- in CHECK's words; [] when nothing. Its name, MAC and state
    are the caller's to check. Raises RequestFailed."""
    out = []
    found = live_links(rtnl)
    mine = next((x for x in found if x.index == index), None)
    if mine is None or (mine.vlan_id, mine.parent) != (link.vlan_id, link.parent):
        # made for another VLAN or trunk (a trunk attached again has a new ifindex): the
        # caller's "link ..." problems have the link made afresh
        out.append(f"link {link.name} not 802.1Q id {link.vlan_id} on ifindex {link.parent}")
    attached = _ours(kernel.filters(rtnl, index, "egress"))
    if attached is None or attached.tag not in tags(tagger(link.vlan_id, link.parent)):
        out.append(f"802.1Q tagger on {link.name}")
    state = look(rtnl, link.parent, found)
    if not state.exact or link.vlan_id not in state.vlans:
        out.append(f"802.1Q demultiplexer on ifindex {link.parent}")
    return out


def repair(rtnl: Rtnl, link: Dot1qLink, index: int) -> None:
    """Attach the link's tagger again and sync its parent. Raises RequestFailed,
    ProgramRefused."""
    attach_tagger(rtnl, link, index)
    sync(rtnl, link.parent)


# --- what the kernel can do -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Support:
    """What this kernel offers for 802.1Q links."""

    vlan_devices: bool  # ``type vlan`` (CONFIG_VLAN_8021Q)
    ebpf: str  # why tc programs cannot be loaded; "" when they can

    @property
    def kind(self) -> str | None:
        """``vlan`` (real VLAN devices), ``ebpf`` (the veth links here) or None (neither)."""
        if self.vlan_devices:
            return "vlan"
        return "ebpf" if not self.ebpf else None

    def describe(self) -> str:
        if self.vlan_devices:
            return "802.1Q VLAN devices"
        if not self.ebpf:
            return "802.1Q through eBPF under tc (this kernel has no VLAN devices)"
        return f"no 802.1Q: this kernel has no VLAN devices and {self.ebpf}"


def support(rtnl: Rtnl) -> Support:
    """Probe the kernel of ``rtnl``'s namespace; creates nothing. A ``vlan`` link asked for
    without a parent is refused with EINVAL where the kind exists and EOPNOTSUPP ("Unknown
    device type") where it does not. Raises RequestFailed."""
    probe = link_msg(
        ("IFLA_IFNAME", "pwprobe.vlan"),
        ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "vlan")]}),
    )
    reply = rtnl.one(Request("probe vlan devices", RTM_NEWLINK, CREATE, probe))
    if reply.error == 0:  # never seen: a kernel that made a parentless VLAN link
        rtnl.one(dellink("delete pwprobe.vlan", "pwprobe.vlan"))
    if reply.error not in (0, errno.EINVAL, errno.EOPNOTSUPP):
        raise RequestFailed("probe vlan devices", reply.error, reply.detail)
    return Support(vlan_devices=reply.error != errno.EOPNOTSUPP, ebpf=kernel.can_load())
