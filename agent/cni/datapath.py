"""The netlink datapath run in worker threads, as the async CNI service expects it.

Each call runs netlink.veth.Datapath in a worker thread (setns switches only that thread);
``abandon_on_cancel`` stays off, so a cancelled caller still waits for the kernel work to
finish and never leaves it half done behind its back.
"""

from __future__ import annotations

import anyio

from netlink.veth import Datapath, PodNet, WiredPod


class ThreadedDatapath:
    def __init__(self, datapath: Datapath, *, threads: int = 8) -> None:
        self._dp = datapath
        self._limiter = anyio.CapacityLimiter(threads)

    async def wire(self, pod: PodNet) -> WiredPod:
        return await anyio.to_thread.run_sync(self._dp.wire, pod, limiter=self._limiter)

    async def check(self, pod: PodNet) -> list[str]:
        return await anyio.to_thread.run_sync(self._dp.check, pod, limiter=self._limiter)

    async def unwire_host(self, pod: PodNet) -> None:
        await anyio.to_thread.run_sync(self._dp.unwire_host, pod, limiter=self._limiter)

    async def delete_link(self, host_veth: str) -> None:
        await anyio.to_thread.run_sync(self._dp.delete_link, host_veth, limiter=self._limiter)

    async def delete_links(self, host_veths: list[str]) -> None:
        await anyio.to_thread.run_sync(self._dp.delete_links, host_veths, limiter=self._limiter)

    async def repair_host(self, pod: PodNet) -> list[str]:
        return await anyio.to_thread.run_sync(self._dp.repair_host, pod, limiter=self._limiter)

    async def host_veths(self) -> dict[str, int]:
        return await anyio.to_thread.run_sync(self._dp.host_veths, limiter=self._limiter)

    async def link_exists(self, name: str) -> bool:
        return await anyio.to_thread.run_sync(self._dp.link_exists, name, limiter=self._limiter)
