"""The agent's Kubernetes service on fakes (trio's virtual clock): service accounts watched in
exactly the namespaces whose policies select by them, an ADD waiting for its pod, and the static
provider following the Node's pod CIDRs."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import pytest
import trio
import trio.testing

from agent.kube.ranges import NodeCidrsUnavailable, NodePodCidrs
from agent.kube.service import KubeService
from tests.unit.kube_fakes import FakeCollections, node, pod, policy, service_account

pytestmark = pytest.mark.trio


async def started(kube: KubeService, nursery: trio.Nursery) -> None:
    await nursery.start(kube.run)
    for r in kube.reflectors():
        await r.synced.wait()


async def test_service_accounts_follow_the_policies(autojump_clock: trio.testing.MockClock) -> None:
    fc = FakeCollections()
    fc.sa_api.put(service_account("web", "shop", tier="front"))
    fc.sa_api.put(service_account("db", "bank", tier="data"))
    fc.policies_api.put(policy("by-pod", "other", pod_selector={}))
    kube = KubeService(fc, "n1")
    seen: list[str] = []
    kube.subscribe(lambda name, changes: seen.append(name))
    async with trio.open_nursery() as n:
        await started(kube, n)
        assert kube.service_accounts == {}  # no policy selects by service account yet
        fc.policies_api.put(policy("by-sa", "shop", service_account_selector={}))
        await trio.testing.wait_all_tasks_blocked()
        assert set(kube.service_accounts) == {"shop"}
        await kube.service_accounts["shop"].synced.wait()
        assert kube.service_accounts_known("shop") and not kube.service_accounts_known("bank")
        assert kube.service_account("shop", "web").labels == {"tier": "front"}
        assert kube.service_account("bank", "db") is None
        fc.sa_api.put(service_account("web", "shop", tier="back"))
        await trio.testing.wait_all_tasks_blocked()
        assert kube.service_account("shop", "web").labels == {"tier": "back"}
        assert "serviceaccounts" in seen and "securitygrouppolicies" in seen
        fc.policies_api.delete(("shop", "by-sa"))
        await trio.testing.wait_all_tasks_blocked()
        assert kube.service_accounts == {} and kube.service_account("shop", "web") is None
        n.cancel_scope.cancel()


async def test_wait_pod(autojump_clock: trio.testing.MockClock) -> None:
    fc = FakeCollections()
    kube = KubeService(fc, "n1", policies=False, node=False)
    async with trio.open_nursery() as n:
        await started(kube, n)
        t0 = trio.current_time()

        async def create_later() -> None:
            await trio.sleep(0.5)
            fc.pods_api.put(pod("late", uid="u-old"))
            await trio.sleep(0.5)
            fc.pods_api.delete(("default", "late"))
            fc.pods_api.put(pod("late", uid="u-new"))

        n.start_soon(create_later)
        got = await kube.wait_pod("default", "late", "u-new", timeout=5)
        assert got is not None and got.uid == "u-new"
        assert trio.current_time() - t0 == pytest.approx(1.0)
        assert await kube.wait_pod("default", "never", "", timeout=3) is None
        assert trio.current_time() - t0 == pytest.approx(4.0)
        # while the watch is not connected nothing new can arrive: no waiting
        fc.pods_api.down = True
        fc.pods_api.cut()
        await trio.testing.wait_all_tasks_blocked()
        t1 = trio.current_time()
        assert await kube.wait_pod("default", "never", "", timeout=3) is None
        assert trio.current_time() == t1
        n.cancel_scope.cancel()


async def test_node_pod_cidrs(autojump_clock: trio.testing.MockClock) -> None:
    fc = FakeCollections()
    kube = KubeService(fc, "n1", policies=False)
    cidrs = NodePodCidrs(kube, wait=10)
    async with trio.open_nursery() as n:
        await n.start(kube.run)
        # no Node yet: inventory waits, then says why it cannot answer
        with pytest.raises(NodeCidrsUnavailable, match="no such Node"):
            await cidrs.inventory()

        async def register() -> None:
            await trio.sleep(2)
            fc.nodes_api.put(node("n1"))
            await trio.sleep(2)
            fc.nodes_api.put(node("n1", ["10.9.1.0/24"]))  # the IPAM controller assigns it

        n.start_soon(register)
        t0 = trio.current_time()
        blocks = await cidrs.inventory()
        assert trio.current_time() - t0 == pytest.approx(4.0)
        assert [b.owner for b in blocks] == ["10.9.1.0/24"] and len(blocks[0].ips) == 254
        assert cidrs.facts().pod_cidrs == (IPv4Network("10.9.1.0/24"),)

        feed = cidrs.watch_ranges()
        got: list[Any] = []

        async def follow() -> None:
            async for ranges in feed:
                got.append(ranges)

        n.start_soon(follow)
        # deleted and registered again with another CIDR (podCIDRs cannot change in place)
        fc.nodes_api.delete(("", "n1"))
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and cidrs.ranges == (IPv4Network("10.9.1.0/24"),)  # kept meanwhile
        fc.nodes_api.put(node("n1", [], uid="u2"))
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        fc.nodes_api.put(node("n1", ["10.9.7.0/24"], uid="u2"))
        await trio.testing.wait_all_tasks_blocked()
        assert got == [(IPv4Network("10.9.7.0/24"),)]
        n.cancel_scope.cancel()
