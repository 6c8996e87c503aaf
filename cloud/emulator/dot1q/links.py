"""VLAN links on the node side, as the agent makes them for branch ENIs: ``vlan.eth.<vid>``,
parent the trunk ENI's link, MAC the branch's.

Where the kernel has 802.1Q devices that is exactly what is made (``type vlan``). This kernel
has none (CONFIG_VLAN_8021Q is not set), so there the link is a veth end of that name and MAC
(its peer idles) whose egress program tags each frame and sends it out of the parent, while the
parent's ingress program untags frames of the link's VLAN id and delivers them on the link
(``programs``): the same frames on the cable, the same link to route through.
"""

from __future__ import annotations

import functools

import orjson

from cloud.emulator.dot1q import kernel
from cloud.emulator.dot1q.programs import Branch, demux, tagger
from cloud.emulator.errors import FabricError
from cloud.emulator.netns import Namespace


@functools.cache
def kernel_has_vlan_devices() -> bool:
    """Whether ``ip link add ... type vlan`` works on this kernel (probed once, in a namespace
    made for it)."""
    probe = Namespace.create("vlanprobe")
    try:
        probe.ip_batch(["link add link lo name pwprobe type vlan id 1"])
    except FabricError:
        return False
    finally:
        probe.delete()
    return True


class VlanLinks:
    """The VLAN links on ``parent`` inside one namespace, by VLAN id."""

    def __init__(self, netns: Namespace, parent: str, *, native: bool | None = None) -> None:
        self.netns = netns
        self.parent = parent
        self.native = kernel_has_vlan_devices() if native is None else native
        self.links: dict[int, str] = {}

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
        else:
            peer = f"{name[:14]}p"
            self.netns.ip_batch(
                [
                    f"link add {name} address {mac} type veth peer name {peer}",
                    f"link set {peer} up",
                    f"link set {name} up",
                ]
            )
            index = self._ifindexes()
            kernel.attach(
                self.netns.path,
                index[name],
                "egress",
                tagger(vlan_id, index[self.parent]),
                "pw_vlan_tag",
            )
        self.links[vlan_id] = name
        if not self.native:
            self._set_demux()
        return name

    def remove(self, vlan_id: int) -> None:
        """Delete the link of ``vlan_id``."""
        name = self.links.pop(vlan_id)
        self.netns.ip_batch([f"link del {name}"])
        if not self.native:
            self._set_demux()

    def _set_demux(self) -> None:
        index = self._ifindexes()
        if not self.links:
            kernel.detach(self.netns.path, index[self.parent])
            return
        branches = [Branch(vlan_id=v, ifindex=index[n]) for v, n in sorted(self.links.items())]
        kernel.attach(
            self.netns.path, index[self.parent], "ingress", demux(branches), "pw_vlan_demux"
        )

    def _ifindexes(self) -> dict[str, int]:
        links = orjson.loads(self.netns.ip_text("-j", "link", "show"))
        return {link["ifname"]: int(link["ifindex"]) for link in links}

    def __repr__(self) -> str:
        kind = "vlan" if self.native else "veth+ebpf"
        return f"VlanLinks({self.netns.name}, {self.parent}, {kind}, {sorted(self.links)})"
