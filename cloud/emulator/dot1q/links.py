"""VLAN links on the node side of emulator tests, made as the agent makes them for branch
ENIs (``vlan.eth.<vid>``, parent the trunk ENI's link, MAC the branch's): a real ``type vlan``
device where the kernel has one, else ``netlink.dot1q``'s veth tagged by eBPF -- the same
frames on the cable, the same link to route through.
"""

from __future__ import annotations

import errno
import functools

from cloud.emulator.errors import VlanError
from cloud.emulator.netns import Namespace
from netlink.dot1q import links
from netlink.errors import NetlinkError
from netlink.requests import getlink, only_link
from netlink.rtnl import opened_in


@functools.cache
def kernel_has_vlan_devices() -> bool:
    """Whether ``type vlan`` links can be made here (probed once, in a namespace made for
    it; nothing is created)."""
    probe = Namespace.create("vlanprobe")
    try:
        with opened_in(probe.path) as rtnl:
            return links.support(rtnl).vlan_devices
    finally:
        probe.delete()


class VlanLinks:
    """The VLAN links on ``parent`` inside one namespace, by VLAN id."""

    def __init__(self, netns: Namespace, parent: str, *, native: bool | None = None) -> None:
        self.netns = netns
        self.parent = parent
        self.native = kernel_has_vlan_devices() if native is None else native
        self.links: dict[int, links.Dot1qLink | str] = {}

    def add(self, vlan_id: int, mac: str, name: str | None = None) -> str:
        """Make the link for ``vlan_id`` with ``mac`` (up, no address) and return its name
        (default ``vlan.eth.<vlan_id>``). Raises FabricError or VlanError."""
        name = name or f"vlan.eth.{vlan_id}"
        if self.native:
            self.netns.ip_batch(
                [
                    f"link add link {self.parent} name {name} address {mac} type vlan id {vlan_id}",
                    f"link set {name} up",
                ]
            )
            self.links[vlan_id] = name
            return name
        try:
            with opened_in(self.netns.path) as rtnl:
                parent = only_link(rtnl.one(getlink(f"link {self.parent}", self.parent)))
                if parent is None:
                    raise VlanError(f"link {self.parent}", errno.ENODEV, "no such link")
                link = links.Dot1qLink(name=name, vlan_id=vlan_id, mac=mac, parent=parent.index)
                links.create(rtnl, link)
        except NetlinkError as e:
            raise VlanError(f"create {name}", getattr(e, "errno", 0), str(e)) from e
        self.links[vlan_id] = link
        return name

    def remove(self, vlan_id: int) -> None:
        """Delete the link of ``vlan_id``."""
        link = self.links.pop(vlan_id)
        if isinstance(link, str):
            self.netns.ip_batch([f"link del {link}"])
            return
        try:
            with opened_in(self.netns.path) as rtnl:
                links.delete(rtnl, link)
        except NetlinkError as e:
            raise VlanError(f"delete {link.name}", getattr(e, "errno", 0), str(e)) from e

    def __repr__(self) -> str:
        kind = "vlan" if self.native else "veth+ebpf"
        return f"VlanLinks({self.netns.name}, {self.parent}, {kind}, {sorted(self.links)})"
