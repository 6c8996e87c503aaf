"""GC against the real kernel: a CniService over a netlink Datapath whose host is a test namespace.

Pods are namespaces made by the test. The GC's clock is the CNI service's, which most tests
drive by hand (two looks a grace apart, cooldown passing) so no assertion depends on real time;
waits for the kernel are event-driven (the watcher) with generous timeouts. The agent itself is
not involved: the daemon does not start GC yet.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import anyio
import attrs
import pytest

from agent.checkpoint import Snapshot
from agent.cni.datapath import ThreadedDatapath
from agent.cni.service import CniService
from agent.cni.spec import CniError, CniRequest, validate
from agent.gc import GcPolicy, GcService, KernelGc
from agent.pool.ipam import IpPool
from cloud.provider import AddressBlock
from cloud.static import usable_hosts
from netlink import Datapath, PodNet
from netlink.watcher import Batch, Watcher
from tests.netns import Netns
from tests.unit.fakes import FakeProvider

pytestmark = [pytest.mark.root, pytest.mark.anyio]

MakeNetns = Callable[[str], Netns]
NODE_IP = "10.99.0.1"
WAIT = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # production's backend; the GC core also runs on trio in tests/unit


@pytest.fixture
def node(make_netns: MakeNetns) -> Netns:
    ns = make_netns("gcnode")
    ns.sysctl("net.ipv4.ip_forward", "1")
    ns.run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
    return ns


@attrs.define
class Rig:
    node: Netns
    cni: CniService
    gc: GcService
    watcher: Watcher
    dp: Datapath
    t: list[float]  # the CNI service's (and so GC's) clock, when driven by hand

    def req(
        self, command: str, ns: Netns, cid: str | None = None, ifname: str = "eth0"
    ) -> CniRequest:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid or ns.name,
            "CNI_NETNS": ns.path,
            "CNI_IFNAME": ifname,
            "CNI_PATH": "/opt/cni/bin",
        }
        return validate(env, {"cniVersion": "1.0.0", "name": "podwire", "type": "podwire"})

    async def add(self, ns: Netns, cid: str | None = None, ifname: str = "eth0") -> str:
        result = await self.cni.add(self.req("ADD", ns, cid, ifname))
        return str(result["ips"][0]["address"]).split("/")[0]

    async def look(self, at: float) -> tuple[int, int, int]:
        self.t[0] = at
        report = await self.gc.run_once()
        assert report.errors == ()
        return report.released, report.veths, report.rules


@asynccontextmanager
async def rig(
    node: Netns,
    tmp_path: Path,
    *,
    ips: tuple[IPv4Address, ...],
    policy: GcPolicy,
    manual_clock: bool = True,
    cooldown: float = 30.0,
    interval: float = 60.0,
) -> AsyncIterator[Rig]:
    t = [0.0]
    dp = Datapath(node.path)
    threaded = ThreadedDatapath(dp)
    cni = CniService(
        pool=IpPool(cooldown=cooldown),
        datapath=threaded,
        provider=FakeProvider([AddressBlock(owner="10.77.0.0/16", ips=ips)]),
        checkpoint_path=tmp_path / "state.json",
        mtu=1500,
        add_wait=0.0,
        clock=(lambda: t[0]) if manual_clock else anyio.current_time,
    )
    watcher = Watcher(netns=node.path)
    gc = GcService(
        cni, KernelGc(threaded, watcher.dump_rules), policy=policy, interval=interval, jitter=0.5
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(watcher.serve)
            await tg.start(cni.run)
            await cni.restore(Snapshot())
            yield Rig(node=node, cni=cni, gc=gc, watcher=watcher, dp=dp, t=t)
            tg.cancel_scope.cancel()
    finally:
        dp.close()


def pings(src: Netns, dst: str) -> bool:
    return src.run("ping", "-c1", "-W2", "-q", dst, check=False).returncode == 0


def links(ns: Netns) -> set[str]:
    out = ns.run("ip", "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


async def until_gone(watcher_items: object, node: Netns, names: set[str]) -> None:
    """Wait (event-driven) until none of ``names`` is a link of ``node``."""
    items = watcher_items
    with anyio.fail_after(WAIT):
        remaining = names & links(node)
        async for item in items:  # type: ignore[attr-defined]
            if isinstance(item, Batch):
                remaining -= {e.name for e in item.links_gone()}
            if not remaining or not (names & links(node)):
                return


async def test_a_deleted_pod_netns_is_released_after_grace_and_its_ip_reused_after_cooldown(
    node: Netns, make_netns: MakeNetns, tmp_path: Path
) -> None:
    only = IPv4Address("10.77.0.5")
    policy = GcPolicy(missing_grace=10.0, orphan_grace=None)
    async with rig(node, tmp_path, ips=(only,), policy=policy) as r:
        pa, pb = make_netns("gcpoda"), make_netns("gcpodb")
        assert await r.add(pa) == str(only)
        assert pings(node, str(only))

        await anyio.run_process(["ip", "netns", "del", pa.name])  # the sandbox went, no DEL
        assert await r.look(0.0) == (0, 0, 0)  # seen missing: remembered, not collected
        assert r.gc.suspects == 1
        assert await r.look(9.999) == (0, 0, 0)
        assert await r.look(10.0) == (1, 0, 0)
        assert r.cni.allocations == {} and r.cni.pool.holder(only) is None

        with pytest.raises(CniError) as info:  # the only address is cooling down
            await r.add(pb)
        assert info.value.code == 11
        r.t[0] = 40.0
        assert await r.add(pb) == str(only)
        assert pings(node, str(only)) and pings(pb, NODE_IP)
        assert r.gc.suspects == 0 and await r.look(41.0) == (0, 0, 0)


async def test_stray_pwv_veths_and_our_rules_go_foreign_ones_stay(
    node: Netns, make_netns: MakeNetns, tmp_path: Path
) -> None:
    ips = usable_hosts(IPv4Network("10.77.0.0/28"))
    async with rig(node, tmp_path, ips=ips, policy=GcPolicy(orphan_grace=None)) as r:
        live = make_netns("gclive")
        live_ip = await r.add(live)
        for cmd in (
            "link add pwvleak00000001 type veth peer name leakpeer1",
            "link add vethforeign1 type veth peer name foreignpeer1",
            "link add pwxnotours0001 type veth peer name notourspeer1",
            "rule add from 10.77.0.99 lookup 5 priority 1536",
            "rule add to 10.77.0.99 lookup main priority 512",
            "rule add from 10.77.0.98 lookup 5 priority 1537",
            "rule add iif vethforeign1 lookup 5 priority 512",
            "rule add fwmark 0x80/0x80 lookup main priority 1024",
            f"rule add from {live_ip} lookup 7 priority 1536",  # its address is allocated
        ):
            node.run("ip", *cmd.split())
        items = r.watcher.subscribe(max_buffer=1000)
        assert await r.look(0.0) == (0, 0, 0)
        assert await r.look(10.0) == (0, 1, 2)
        await until_gone(items, node, {"pwvleak00000001"})

        left = links(node)
        assert "pwvleak00000001" not in left and "leakpeer1" not in left
        assert {"vethforeign1", "pwxnotours0001"} <= left
        assert any(name.startswith("pwv") for name in left), "the live pod's veth stays"
        rules = node.run("ip", "rule").stdout
        assert "10.77.0.99" not in rules
        assert "from 10.77.0.98 lookup 5" in rules
        assert "iif vethforeign1 lookup 5" in rules
        assert "fwmark 0x80/0x80 lookup main" in rules
        assert f"from {live_ip} lookup 7" in rules
        assert pings(node, live_ip)
        assert await r.look(20.0) == (0, 0, 0)


async def test_three_hundred_pod_namespaces_deleted_at_once_are_all_collected(
    node: Netns, make_netns: MakeNetns, tmp_path: Path
) -> None:
    ips = usable_hosts(IPv4Network("10.77.0.0/23"))
    pods = [make_netns(f"gc{i}") for i in range(300)]
    policy = GcPolicy(missing_grace=10.0, orphan_grace=None)
    async with rig(node, tmp_path, ips=ips, policy=policy) as r:
        limiter = anyio.CapacityLimiter(16)

        async def add(ns: Netns) -> None:
            async with limiter:
                await r.add(ns)

        async with anyio.create_task_group() as tg:
            for ns in pods:
                tg.start_soon(add, ns)
        assert len(r.cni.allocations) == 300
        veths = {a.host_veth for a in r.cni.allocations.values()}
        items = r.watcher.subscribe(max_buffer=1000)

        await anyio.run_process(
            ["ip", "-batch", "-"], input="\n".join(f"netns del {ns.name}" for ns in pods).encode()
        )
        await r.look(0.0)
        assert await r.look(10.0) == (300, 0, 0)
        assert r.cni.allocations == {} and r.cni.pool.assigned == 0
        await until_gone(items, node, veths)
        assert not any(name.startswith("pwv") for name in links(node))
        assert "10.77." not in node.run("ip", "route").stdout


async def test_an_unheld_pod_netns_is_torn_down_and_unmounted_when_configured(
    node: Netns, make_netns: MakeNetns, tmp_path: Path
) -> None:
    ips = usable_hosts(IPv4Network("10.77.0.0/28"))
    policy = GcPolicy(orphan_grace=60.0, own_netns_mounts=True, netns_dirs=("/run/netns",))
    async with rig(node, tmp_path, ips=ips, policy=policy) as r:
        kept, orphan = make_netns("gcheld"), make_netns("gcorphan")
        holders = [
            kept.popen(["sleep", "600"]),
            orphan.popen(["sleep", "600"]),
        ]
        try:
            kept_ip, orphan_ip = await r.add(kept), await r.add(orphan)
            assert await r.look(0.0) == (0, 0, 0) and r.gc.suspects == 0  # both held
            holders[1].send_signal(signal.SIGKILL)
            holders[1].wait()
            assert await r.look(100.0) == (0, 0, 0)  # unheld from now on
            assert await r.look(159.999) == (0, 0, 0)
            assert await r.look(160.0) == (1, 0, 0)
            assert r.gc.last is not None and r.gc.last.unmounted == 1
            assert not os.path.lexists(orphan.path)
            assert set(r.cni.allocations) == {r.req("ADD", kept).key}
            assert r.cni.pool.holder(IPv4Address(orphan_ip)) is None
            assert pings(node, kept_ip)
            assert (
                kept.path
                in subprocess.run(
                    ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True
                ).stdout
            )
        finally:
            for p in holders:
                p.kill()
                p.wait()


async def test_gc_in_a_loop_during_add_del_churn_collects_nothing_live(
    node: Netns, make_netns: MakeNetns, tmp_path: Path
) -> None:
    ips = usable_hosts(IPv4Network("10.77.0.0/24"))
    # As aggressive as it gets: no grace at all, a look every 10 ms. Only the in-flight skip
    # and the re-checks under the key locks stand between GC and a live pod.
    policy = GcPolicy(missing_grace=0.0, orphan_grace=None)
    async with rig(
        node, tmp_path, ips=ips, policy=policy, manual_clock=False, cooldown=0.0, interval=0.01
    ) as r:
        live = [make_netns(f"gcl{i}") for i in range(20)]
        # A fresh namespace per sandbox, as runtimes do: 8 workers x 12 ADD/DEL rounds + 1 ADD.
        sandboxes = [[make_netns(f"gcc{w}x{k}") for k in range(13)] for w in range(8)]
        for ns in live:
            await r.add(ns)
        async with anyio.create_task_group() as tg:
            await tg.start(r.gc.serve)

            async def cycle(mine: list[Netns]) -> None:
                for ns in mine[:-1]:
                    await r.add(ns)
                    await r.cni.delete(r.req("DEL", ns))
                await r.add(mine[-1])

            async with anyio.create_task_group() as workers:
                for mine in sandboxes:
                    workers.start_soon(cycle, mine)
            runs = r.gc.totals.runs
            with anyio.fail_after(WAIT):  # and a few looks after the churn settled
                while r.gc.totals.runs < runs + 5:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

        print(r.gc)
        assert r.gc.totals.runs > 10 and r.gc.totals.released == 0
        assert len(r.cni.allocations) == len(live) + len(sandboxes)
        for a in r.cni.allocations.values():
            pod = PodNet(netns=a.netns, ifname=a.ifname, host_veth=a.host_veth, ip=a.ip, mtu=1500)
            assert await anyio.to_thread.run_sync(r.dp.check, pod) == [], a.key
            assert pings(node, str(a.ip)), a.key
