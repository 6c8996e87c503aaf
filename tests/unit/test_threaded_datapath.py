"""Where ThreadedDatapath runs each call: an ordinary pod's wire and a round's parking inline
when nothing else is in flight, everything else (and those during another call) on a worker."""

from __future__ import annotations

import threading
from ipaddress import IPv4Address
from typing import Any, cast

import anyio
import attrs
import pytest

from agent.cni.datapath import ThreadedDatapath
from netlink.veth import Datapath, PodNet, WiredPod
from netlink.vlan import BranchLink

pytestmark = pytest.mark.anyio

POD = PodNet(netns="/x", ifname="eth0", host_veth="pwv1", ip=IPv4Address("10.0.0.2"), mtu=1500)


class Recorder:
    """Records the thread of each wire; ``host_veths`` blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def wire(self, pod: PodNet) -> WiredPod:
        self.threads.append(threading.current_thread())
        return WiredPod(pod_mac="m", host_mac="h", pod_ifindex=2, host_ifindex=3)

    def park_links(self, names: list[str], *, group: int) -> tuple[dict[str, int], dict[str, Any]]:
        self.threads.append(threading.current_thread())
        return {n: 7 for n in names}, {}

    def host_veths(self) -> dict[str, int]:
        self.entered.set()
        assert self.release.wait(30)
        return {}


async def test_wire_runs_inline_only_while_nothing_else_is_in_flight() -> None:
    rec = Recorder()
    dp = ThreadedDatapath(cast(Datapath, rec))
    here = threading.current_thread()
    await dp.wire(POD)
    assert rec.threads == [here]

    branch = cast(BranchLink, object.__new__(BranchLink))  # never looked at by the recorder
    await dp.wire(attrs.evolve(POD, branch=branch))
    assert rec.threads[-1] is not here  # a branch pod's wiring is longer: a worker

    async with anyio.create_task_group() as tg:
        tg.start_soon(dp.host_veths)
        await anyio.to_thread.run_sync(rec.entered.wait, 30)
        await dp.wire(POD)  # another call holds a worker: this one goes to a worker too
        rec.release.set()
    assert rec.threads[-1] is not here
    await dp.wire(POD)
    assert rec.threads[-1] is here


async def test_parking_runs_inline_only_while_nothing_else_is_in_flight() -> None:
    rec = Recorder()
    dp = ThreadedDatapath(cast(Datapath, rec))
    here = threading.current_thread()
    assert await dp.park_links(["pwv1"], 5) == ({"pwv1": 7}, {})
    assert rec.threads == [here]
    async with anyio.create_task_group() as tg:
        tg.start_soon(dp.host_veths)
        await anyio.to_thread.run_sync(rec.entered.wait, 30)
        await dp.park_links(["pwv2"], 5)
        rec.release.set()
    assert rec.threads[-1] is not here
