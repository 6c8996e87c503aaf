"""The CNI verbs over a fake datapath, on both anyio backends and on trio's virtual clock."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import anyio
import pytest
import trio

from agent import checkpoint as ckpt
from agent.checkpoint import Allocation, Snapshot
from agent.cni.service import CniService, map_error
from agent.cni.spec import CniError, CniRequest, validate
from agent.pool.ipam import IpPool
from cloud.provider import AddressBlock
from cloud.static import usable_hosts
from netlink.errors import NetlinkError, NetnsNotFound
from netlink.names import host_veth_name
from tests.unit.fakes import FakeDatapath, FakeProvider

CONF = {"cniVersion": "1.0.0", "name": "podwire", "type": "podwire"}


def req(command: str, cid: str, netns: str = "/run/netns/p", **conf: object) -> CniRequest:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
    }
    return validate(env, {**CONF, **conf})


def service(
    tmp_path: Path, cidr: str = "10.0.1.0/28", cooldown: float = 30.0
) -> tuple[CniService, FakeDatapath]:
    dp = FakeDatapath()
    dp.netns.add("/run/netns/p")
    provider = FakeProvider([AddressBlock(owner=cidr, ips=usable_hosts(IPv4Network(cidr)))])
    svc = CniService(
        pool=IpPool(cooldown=cooldown),
        datapath=dp,
        provider=provider,
        checkpoint_path=tmp_path / "state.json",
        mtu=1500,
        add_wait=0.0,
    )
    return svc, dp


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def on_disk(svc: CniService) -> set[str]:
    return {a.container_id for a in ckpt.load(svc.checkpoint.path).allocations}


@pytest.mark.anyio
async def test_add_then_del(paths: Path) -> None:
    svc, dp = service(paths)
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.restore(Snapshot())
        result = await svc.add(req("ADD", "c1"))
        assert result["ips"][0]["address"] == "10.0.1.1/32"
        assert result["interfaces"][1]["sandbox"] == "/run/netns/p"
        assert on_disk(svc) == {"c1"}
        await svc.delete(req("DEL", "c1"))
        assert on_disk(svc) == set()  # recorded before DEL answered
        name = host_veth_name("podwire", "c1", "eth0")
        # undone before DEL answered: the veth pair and its route
        assert name in dp.deleted and name not in dp.pods and name not in dp.routes
        await svc.delete(req("DEL", "c1"))  # idempotent
        assert dp.deleted == [name]
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_add_same_key_twice_keeps_one_address(paths: Path) -> None:
    svc, _ = service(paths)
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.restore(Snapshot())
        first = await svc.add(req("ADD", "c1"))
        second = await svc.add(req("ADD", "c1"))
        assert first["ips"] == second["ips"]
        assert svc.pool.assigned == 1 and len(svc.allocations) == 1
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_failed_add_undoes_itself(paths: Path) -> None:
    svc, _ = service(paths)
    await svc.restore(Snapshot())
    with pytest.raises(NetnsNotFound):
        await svc.add(req("ADD", "c1", netns="/run/netns/gone"))
    assert svc.allocations == {} and on_disk(svc) == set()
    assert svc.pool.assigned == 0 and svc.pool.cooling == 1
    assert map_error(NetnsNotFound("/run/netns/gone")).code == 4


@pytest.mark.anyio
async def test_concurrent_adds_get_distinct_addresses(paths: Path) -> None:
    svc, _ = service(paths, cidr="10.0.1.0/24")
    await svc.restore(Snapshot())
    ips: list[str] = []

    async def one(i: int) -> None:
        ips.append((await svc.add(req("ADD", f"c{i}")))["ips"][0]["address"])

    async with anyio.create_task_group() as tg:
        for i in range(60):
            tg.start_soon(one, i)
    assert len(set(ips)) == 60 and on_disk(svc) == {f"c{i}" for i in range(60)}


@pytest.mark.trio
async def test_exhausted_pool_answers_11_at_once_and_cooldown_is_exact(
    paths: Path, autojump_clock: trio.testing.MockClock
) -> None:
    svc, _ = service(paths, cidr="10.0.1.0/30", cooldown=30.0)  # two addresses
    await svc.restore(Snapshot())
    await svc.add(req("ADD", "c1"))
    await svc.add(req("ADD", "c2"))
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.delete(req("DEL", "c1"))
        released_at = trio.current_time()
        start = trio.current_time()
        with pytest.raises(CniError) as e:
            await svc.add(req("ADD", "c3"))
        assert e.value.code == 11 and "1 cooling" in e.value.details
        assert trio.current_time() == start  # no waiting on a static pool
        await trio.sleep_until(released_at + 29.999)
        with pytest.raises(CniError):
            await svc.add(req("ADD", "c3"))
        await trio.sleep_until(released_at + 30.0)
        assert (await svc.add(req("ADD", "c3")))["ips"][0]["address"] == "10.0.1.1/32"
        tg.cancel_scope.cancel()


@pytest.mark.trio
async def test_wire_deadline_is_exact_and_undone(
    paths: Path, autojump_clock: trio.testing.MockClock
) -> None:
    svc, dp = service(paths)
    await svc.restore(Snapshot())
    dp.wire_delay = 60.0
    start = trio.current_time()
    with pytest.raises(TimeoutError):
        await svc.add(req("ADD", "c1"))
    assert trio.current_time() - start == svc.wire_timeout
    assert svc.allocations == {} and map_error(TimeoutError()).code == 11


@pytest.mark.trio
async def test_one_operation_per_key(paths: Path, autojump_clock: trio.testing.MockClock) -> None:
    svc, dp = service(paths)
    await svc.restore(Snapshot())
    dp.wire_delay = 1.0
    async with trio.open_nursery() as n:
        await n.start(svc.run)
        n.start_soon(svc.add, req("ADD", "c1"))
        await trio.sleep(0.1)
        await svc.delete(req("DEL", "c1"))  # waits for the ADD, then removes it
        assert trio.current_time() >= 1.0
        assert svc.allocations == {}
        n.cancel_scope.cancel()
    name = host_veth_name("podwire", "c1", "eth0")
    assert dp.calls[:3] == [f"wire {name}", "park 1", "delete batch 1"]


@pytest.mark.anyio
async def test_check_reports_what_is_missing(paths: Path) -> None:
    svc, dp = service(paths)
    await svc.restore(Snapshot())
    result = await svc.add(req("ADD", "c1"))
    await svc.check(req("CHECK", "c1", prevResult=result))
    dp.routes.clear()
    with pytest.raises(CniError) as e:
        await svc.check(req("CHECK", "c1", prevResult=result))
    assert e.value.code == 110 and "host route 10.0.1.1/32" in e.value.details
    with pytest.raises(CniError) as e:
        await svc.check(req("CHECK", "c2"))
    assert e.value.code == 3
    other = {**result, "ips": [{"address": "10.0.1.9/32"}]}
    with pytest.raises(CniError, match="prevResult"):
        await svc.check(req("CHECK", "c1", prevResult=other))


@pytest.mark.anyio
async def test_gc_releases_what_is_not_valid(paths: Path) -> None:
    svc, _ = service(paths)
    await svc.restore(Snapshot())
    for i in range(4):
        await svc.add(req("ADD", f"c{i}"))
    gc = validate(
        {"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"},
        {
            **CONF,
            "cniVersion": "1.1.0",
            "cni.dev/valid-attachments": [
                {"containerID": "c1", "ifname": "eth0"},
                {"containerID": "c3", "ifname": "eth0"},
            ],
        },
    )
    released = await svc.gc(gc)
    assert sorted(a.container_id for a in released) == ["c0", "c2"]
    assert on_disk(svc) == {"c1", "c3"} and svc.pool.cooling == 2


@pytest.mark.anyio
async def test_status(paths: Path) -> None:
    svc, _ = service(paths, cidr="10.0.1.0/31", cooldown=0.0)
    with pytest.raises(CniError) as e:
        svc.status()
    assert e.value.code == 50  # not restored yet
    await svc.restore(Snapshot())
    svc.status()
    await svc.add(req("ADD", "c1"))
    await svc.add(req("ADD", "c2"))
    with pytest.raises(CniError, match="no IP") as e:
        svc.status()
    assert e.value.details == "all 2 addresses in use"


@pytest.mark.anyio
async def test_restore_keeps_live_pods_and_drops_dead_ones(paths: Path) -> None:
    svc, dp = service(paths)
    live = Allocation(
        network="podwire",
        container_id="live",
        ifname="eth0",
        ip=IPv4Address("10.0.1.7"),
        netns="/run/netns/p",
        host_veth=host_veth_name("podwire", "live", "eth0"),
        owner="10.0.1.0/28",
    )
    dead = Allocation(
        network="podwire",
        container_id="dead",
        ifname="eth0",
        ip=IPv4Address("10.0.1.8"),
        netns="/run/netns/q",
        host_veth=host_veth_name("podwire", "dead", "eth0"),
        owner="10.0.1.0/28",
    )
    gone = Allocation(
        network="podwire",
        container_id="gone",
        ifname="eth0",
        ip=IPv4Address("192.0.2.1"),
        netns="/run/netns/r",
        host_veth="pwvffffffffffff",
        owner="old",
    )
    for a in (live, gone):
        dp.pods[a.host_veth] = None  # type: ignore[assignment]
    dropped = await svc.restore(Snapshot(allocations=(live, dead, gone)))
    assert {a.container_id for a, _ in dropped} == {"dead", "gone"}
    assert set(svc.allocations) == {live.key}
    assert svc.pool.holder(live.ip) == live.key and svc.pool.cooling == 1  # dead's IP cools
    assert on_disk(svc) == {"live"}
    # nothing hands the kept address out again
    for i in range(12):  # 14 addresses: one kept, one cooling
        got = await svc.add(req("ADD", f"n{i}"))
        assert got["ips"][0]["address"] != "10.0.1.7/32"


@pytest.mark.anyio
async def test_a_failing_deletion_fails_the_del_and_keeps_the_allocation(paths: Path) -> None:
    svc, dp = service(paths)
    real = dp.delete_parked

    async def broken(names: list[str], group: int) -> None:
        raise NetlinkError("kernel said no")

    dp.delete_parked = broken  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.restore(Snapshot())
        await svc.add(req("ADD", "c1"))
        with pytest.raises(NetlinkError, match="kernel said no"):
            await svc.delete(req("DEL", "c1"))
        assert on_disk(svc) == {"c1"} and svc.pool.assigned == 1  # nothing released yet
        assert (await svc.add(req("ADD", "c2")))["ips"]  # still serving
        dp.delete_parked = real  # type: ignore[method-assign]
        await svc.delete(req("DEL", "c1"))  # the runtime's retry
        assert on_disk(svc) == {"c2"}
        tg.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_lone_del_waits_for_the_kernel_only(
    paths: Path, autojump_clock: trio.testing.MockClock
) -> None:
    svc, dp = service(paths)
    async with trio.open_nursery() as n:
        await n.start(svc.run)
        await svc.restore(Snapshot())
        await svc.add(req("ADD", "c1"))
        start = trio.current_time()
        await svc.delete(req("DEL", "c1"))
        # the fake kernel's 20 ms, and no gathering window on top
        assert trio.current_time() - start == pytest.approx(0.02)
        assert host_veth_name("podwire", "c1", "eth0") in dp.deleted
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_concurrent_dels_share_deletions(
    paths: Path, autojump_clock: trio.testing.MockClock
) -> None:
    svc, dp = service(paths, cidr="10.0.1.0/24")
    async with trio.open_nursery() as n:
        await n.start(svc.run)
        await svc.restore(Snapshot())
        for i in range(30):
            await svc.add(req("ADD", f"c{i}"))
        start = trio.current_time()
        async with trio.open_nursery() as dels:
            for i in range(30):
                dels.start_soon(svc.delete, req("DEL", f"c{i}"))
        assert len(dp.deleted) == 30 and not dp.pods
        assert svc.deleter.rounds <= 2  # the first DEL's round, then all the others
        assert trio.current_time() - start <= 0.04 + 1e-9
        n.cancel_scope.cancel()


@pytest.mark.anyio
async def test_gc_deletes_the_veths_before_it_returns(paths: Path) -> None:
    svc, dp = service(paths)
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.restore(Snapshot())
        for i in range(3):
            await svc.add(req("ADD", f"c{i}"))
        gc = validate(
            {"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"},
            {**CONF, "cniVersion": "1.1.0", "cni.dev/valid-attachments": []},
        )
        await svc.gc(gc)
        assert not dp.pods and len(dp.deleted) == 3
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_requested_address_is_honoured_or_refused_clearly(paths: Path) -> None:
    svc, _ = service(paths)
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.restore(Snapshot())
        got = await svc.add(req("ADD", "c1", runtimeConfig={"ips": ["10.0.1.9/24"]}))
        assert got["ips"][0]["address"] == "10.0.1.9/32" and on_disk(svc) == {"c1"}
        with pytest.raises(CniError) as e:
            await svc.add(req("ADD", "c2", runtimeConfig={"ips": ["10.0.1.9"]}))
        assert e.value.code == 11 and "podwire/c1/eth0" in e.value.details
        with pytest.raises(CniError) as e:
            await svc.add(req("ADD", "c3", runtimeConfig={"ips": ["10.0.2.1"]}))
        assert e.value.code == 7 and "10.0.2.1" in e.value.details
        assert svc.pool.assigned == 1 and set(svc.allocations) == {req("ADD", "c1").key}
        # released: cooling for 30 s, but asked for by name it is handed out at once
        await svc.delete(req("DEL", "c1"))
        got = await svc.add(req("ADD", "c4", runtimeConfig={"ips": ["10.0.1.9"]}))
        assert got["ips"][0]["address"] == "10.0.1.9/32"
        # the same key asking again for another address moves to it
        got = await svc.add(req("ADD", "c4", runtimeConfig={"ips": ["10.0.1.10"]}))
        assert got["ips"][0]["address"] == "10.0.1.10/32"
        assert svc.pool.holder(IPv4Address("10.0.1.9")) is None and svc.pool.assigned == 1
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_the_nodes_own_netns_is_refused_and_nothing_touched(paths: Path) -> None:
    svc, dp = service(paths)
    dp.netns.add("/proc/self/ns/net")
    dp.node_netns.add("/proc/self/ns/net")
    await svc.restore(Snapshot())
    with pytest.raises(CniError) as e:
        await svc.add(req("ADD", "c1", netns="/proc/self/ns/net"))
    assert e.value.code == 4 and "node's own" in e.value.msg
    assert dp.calls == [] and svc.pool.assigned == 0 and svc.pool.cooling == 0
    assert svc.allocations == {} and svc.checkpoint.writes == 1  # restore's, nothing more
