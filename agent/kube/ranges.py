"""The static provider's pod CIDRs from the Node's ``spec.podCIDRs`` (kubenet, GKE's
routes-based mode: a controller assigns each Node its ranges and the network routes them there).

``NodePodCidrs`` is a ``cloud.provider.Provider`` (``inventory`` waits for the Node's view and
answers one block per CIDR) and a ``agent.pool.ranges.RangeSource`` (``watch_ranges`` yields
each new set), so the daemon's ``RangeFollower`` moves the pool exactly as it does for GCE alias
ranges: addresses a pod holds in a CIDR that left stay with it until its DEL, and are never
handed out again. Kubernetes forbids changing a Node's podCIDRs in place; they change when the
Node is deleted and registered again with new ones. While the Node is missing, or has no CIDRs,
the pool keeps what it has (logged): a Node being re-registered must not empty a running node.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from ipaddress import IPv4Address, IPv4Network

import anyio

from agent.kube.service import KubeService
from cloud.kube.errors import KubeError
from cloud.provider import AddressBlock, NodeFacts
from cloud.static import first_overlap, usable_hosts

log = logging.getLogger("podwire.kube")


class NodeCidrsUnavailable(KubeError):
    """The Node's pod CIDRs cannot be had yet (not listed, no such Node, none assigned)."""


class NodePodCidrs:
    """See the module docstring."""

    name = "static"
    can_grow = False

    def __init__(
        self, kube: KubeService, reserved: Sequence[IPv4Address] = (), *, wait: float = 30.0
    ) -> None:
        self.kube = kube
        self._reserved = tuple(reserved)
        self.wait = wait
        self._ranges: tuple[IPv4Network, ...] = ()

    def __repr__(self) -> str:
        cidrs = ", ".join(map(str, self._ranges)) or "-"
        return f"<NodePodCidrs {self.kube.node_name} {cidrs}>"

    @property
    def ranges(self) -> tuple[IPv4Network, ...]:
        return self._ranges

    @property
    def reserved(self) -> tuple[IPv4Address, ...]:
        return self._reserved

    def _read(self) -> tuple[IPv4Network, ...]:
        """The Node's CIDRs now; raises NodeCidrsUnavailable saying why there are none."""
        what = f"Node {self.kube.node_name} spec.podCIDRs"
        r = self.kube.node
        if r is None or not r.status.synced:
            reason = (
                r.status.last_error if r is not None and r.status.last_error else "not read yet"
            )
            raise NodeCidrsUnavailable(what, reason)
        node = self.kube.node_info()
        if node is None:
            raise NodeCidrsUnavailable(what, "no such Node (not registered yet?)")
        if not node.pod_cidrs:
            raise NodeCidrsUnavailable(what, "no pod CIDR assigned yet")
        overlap = first_overlap(node.pod_cidrs)
        if overlap is not None:
            raise NodeCidrsUnavailable(what, f"{overlap[1]} overlaps {overlap[0]}")
        return node.pod_cidrs

    async def inventory(self) -> Sequence[AddressBlock]:
        """One block per CIDR of the Node, waiting up to ``wait`` for them; raises
        NodeCidrsUnavailable (the daemon retries and reports why it is not ready)."""
        with anyio.move_on_after(self.wait):
            while True:
                try:
                    self._ranges = self._read()
                    break
                except NodeCidrsUnavailable:
                    await self.kube.changed()
        self._ranges = self._read()
        log.info("pod CIDRs from the Node: %s", ", ".join(map(str, self._ranges)))
        return [
            AddressBlock(owner=str(c), ips=usable_hosts(c, self._reserved)) for c in self._ranges
        ]

    def facts(self) -> NodeFacts:
        return NodeFacts(primary_ip=None, vpc_cidrs=(), pod_cidrs=self._ranges)

    async def watch_ranges(self) -> AsyncIterator[tuple[IPv4Network, ...]]:
        """Yield each new set of the Node's CIDRs, forever; a Node gone or without CIDRs keeps
        the last set (logged once)."""
        said = ""
        while True:
            try:
                ranges = self._read()
                said = ""
            except NodeCidrsUnavailable as e:
                ranges = self._ranges
                if str(e) != said:
                    said = str(e)
                    log.warning("%s; keeping the pod CIDRs the node has", e)
            if ranges != self._ranges:
                log.info(
                    "the Node's pod CIDRs changed: %s -> %s",
                    ", ".join(map(str, self._ranges)) or "none",
                    ", ".join(map(str, ranges)),
                )
                self._ranges = ranges
                yield ranges
                continue  # look again before waiting: a change may have landed meanwhile
            await self.kube.changed()
