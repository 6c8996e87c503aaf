"""The netlink datapath run in worker threads, as the async CNI service expects it.

Each call runs netlink.veth.Datapath in a worker thread (setns switches only that thread);
``abandon_on_cancel`` stays off, so a cancelled caller still waits for the kernel work to
finish and never leaves it half done behind its back.

Two exceptions run on the calling (event loop) thread while no other call is in flight: an
ordinary pod's ``wire``, and ``park_links`` (a deletion round's first half: links moved into
its group, a few hundred microseconds of kernel work). The hand-off to a worker and back cost
~0.6 ms of a ~2.5 ms wire phase here (the worker's wake-up and the GIL going back and forth),
against ~1.2 ms of kernel work that blocks the loop instead. With a call in flight (a burst, a
round waiting for RCU, a branch pod's longer wiring) the kernel may hold rtnl for another
request, so they go to a worker as before; the group deletion itself, which waits ~15-20 ms
for RCU, always does. The loop thread enters the pod's namespace only to open a socket there,
with no await inside (``netlink.ns.entered``).
"""

from __future__ import annotations

from functools import partial

import anyio

from netlink.dot1q.links import Support
from netlink.errors import RequestFailed
from netlink.requests import Link
from netlink.veth import Datapath, PodNet, WiredPod
from netlink.vlan import IifRule, LocalRules


class ThreadedDatapath:
    def __init__(self, datapath: Datapath, *, threads: int = 8) -> None:
        self._dp = datapath
        self._limiter = anyio.CapacityLimiter(threads)

    def is_node_netns(self, path: str) -> bool:
        return self._dp.is_node_netns(path)

    async def wire(self, pod: PodNet) -> WiredPod:
        if pod.branch is None and self._limiter.borrowed_tokens == 0:
            return self._dp.wire(pod)  # see the module docstring
        return await anyio.to_thread.run_sync(self._dp.wire, pod, limiter=self._limiter)

    async def check(self, pod: PodNet) -> list[str]:
        return await anyio.to_thread.run_sync(self._dp.check, pod, limiter=self._limiter)

    async def unwire_host(self, pod: PodNet) -> None:
        await anyio.to_thread.run_sync(self._dp.unwire_host, pod, limiter=self._limiter)

    async def park_links(
        self, names: list[str], group: int
    ) -> tuple[dict[str, int], dict[str, RequestFailed]]:
        if self._limiter.borrowed_tokens == 0:
            return self._dp.park_links(names, group=group)  # see the module docstring
        return await anyio.to_thread.run_sync(
            partial(self._dp.park_links, names, group=group), limiter=self._limiter
        )

    async def delete_parked(self, names: list[str], group: int) -> None:
        await anyio.to_thread.run_sync(
            partial(self._dp.delete_parked, names, group=group), limiter=self._limiter
        )

    async def repair_host(self, pod: PodNet) -> list[str]:
        return await anyio.to_thread.run_sync(self._dp.repair_host, pod, limiter=self._limiter)

    async def host_veths(self) -> dict[str, int]:
        return await anyio.to_thread.run_sync(self._dp.host_veths, limiter=self._limiter)

    async def link_exists(self, name: str) -> bool:
        return await anyio.to_thread.run_sync(self._dp.link_exists, name, limiter=self._limiter)

    # -- branch ENIs (security groups for pods): node-wide state and what GC looks at --

    async def move_local_rule(self) -> bool:
        return await anyio.to_thread.run_sync(self._dp.move_local_rule, limiter=self._limiter)

    async def restore_local_rule(self) -> bool:
        return await anyio.to_thread.run_sync(self._dp.restore_local_rule, limiter=self._limiter)

    async def local_rules(self) -> LocalRules:
        return await anyio.to_thread.run_sync(self._dp.local_rules, limiter=self._limiter)

    async def branch_links(self) -> dict[str, Link]:
        return await anyio.to_thread.run_sync(self._dp.branch_links, limiter=self._limiter)

    async def vlan_support(self) -> Support:
        return await anyio.to_thread.run_sync(self._dp.vlan_support, limiter=self._limiter)

    async def sync_dot1q(self, parents: list[int], dry_run: bool = False) -> list[str]:
        return await anyio.to_thread.run_sync(
            partial(self._dp.sync_dot1q, parents, dry_run=dry_run), limiter=self._limiter
        )

    async def iif_rules(self) -> list[IifRule]:
        return await anyio.to_thread.run_sync(self._dp.iif_rules, limiter=self._limiter)

    async def delete_iif_rules(self, rules: list[IifRule]) -> None:
        await anyio.to_thread.run_sync(self._dp.delete_iif_rules, rules, limiter=self._limiter)

    async def strict_chains(self) -> dict[str, str]:
        return await anyio.to_thread.run_sync(self._dp.strict_chains, limiter=self._limiter)

    async def delete_strict_chains(self, host_veths: list[str]) -> None:
        await anyio.to_thread.run_sync(
            self._dp.delete_strict_chains, host_veths, limiter=self._limiter
        )
