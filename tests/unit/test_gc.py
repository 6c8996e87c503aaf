"""GC: the pure planner as row tables, the executor and the serve loop on trio's virtual clock."""

from __future__ import annotations

import random
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import anyio
import pytest
import trio
import trio.testing

from agent.checkpoint import Allocation, Snapshot
from agent.cni.service import CniService
from agent.cni.spec import CniRequest, PodKey, validate
from agent.gc import (
    GcPlan,
    GcPolicy,
    GcService,
    Observations,
    PolicyRule,
    Sightings,
    collect,
    plan,
    policy_rule,
)
from agent.netns_holders import NetnsFact, under
from agent.pool.ipam import IpPool
from cloud.provider import AddressBlock
from cloud.static import usable_hosts
from netlink.names import host_veth_name
from netlink.watcher import Batch, LinkEvent, Resync, RuleEvent
from tests.unit.fakes import FakeDatapath, FakeNetnsProbe, FakeProvider

POLICY = GcPolicy()  # missing grace 10 s, orphan grace 60 s, mounts not ours


def alloc(cid: str, ip: str = "10.0.1.5", netns: str | None = None) -> Allocation:
    return Allocation(
        network="podwire",
        container_id=cid,
        ifname="eth0",
        ip=IPv4Address(ip),
        netns=netns or f"/run/netns/{cid}",
        host_veth=host_veth_name("podwire", cid, "eth0"),
        owner="10.0.1.0/24",
    )


A = alloc("a")
HEALTHY = NetnsFact(exists=True, held=True)
NONE: frozenset[PodKey] = frozenset()


def seen(
    *allocs: Allocation,
    netns: dict[str, NetnsFact] | None = None,
    veths: tuple[str, ...] | None = None,
    rules: tuple[PolicyRule, ...] = (),
) -> Observations:
    """An observation where every allocation is healthy unless told otherwise."""
    facts = {a.netns: HEALTHY for a in allocs} | (netns or {})
    return Observations(
        netns=facts,
        host_veths=frozenset(veths if veths is not None else {a.host_veth for a in allocs}),
        rules=rules,
    )


# --- planner: releases ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "first", "now", "released"),
    [
        # missing: first seen at 100, grace 10
        ("veth gone", None, 100.0, False),  # first look: remembered, never collected
        ("veth gone", 100.0, 109.999, False),
        ("veth gone", 100.0, 110.0, True),  # exactly at grace
        ("veth gone", 100.0, 500.0, True),
        ("netns gone", None, 100.0, False),
        ("netns gone", 100.0, 109.999, False),
        ("netns gone", 100.0, 110.0, True),
        # unheld: grace 60
        ("netns unheld", None, 100.0, False),
        ("netns unheld", 100.0, 159.999, False),
        ("netns unheld", 100.0, 160.0, True),
    ],
)
def test_release_after_two_looks_a_grace_apart(
    what: str, first: float | None, now: float, released: bool
) -> None:
    if what == "veth gone":
        obs = seen(A, veths=())
        before = Sightings(missing={A.key: first}) if first is not None else Sightings()
    elif what == "netns gone":
        obs = seen(A, netns={A.netns: NetnsFact(exists=False)}, veths=())
        before = Sightings(missing={A.key: first}) if first is not None else Sightings()
    else:
        obs = seen(A, netns={A.netns: NetnsFact(exists=True, held=False)})
        before = Sightings(unheld={A.key: first}) if first is not None else Sightings()
    p = plan([A], obs, NONE, now, POLICY, before)
    assert p.release == ((A.key,) if released else ())
    if released:
        assert p.releases[0].cause == what
    remembered = p.sightings.unheld if what == "netns unheld" else p.sightings.missing
    assert remembered == ({} if released else {A.key: first if first is not None else now})
    grace = 60.0 if what == "netns unheld" else 10.0
    assert p.next_due == (None if released else (first if first is not None else now) + grace)


def test_netns_gone_wins_over_veth_gone_in_the_reason() -> None:
    obs = seen(A, netns={A.netns: NetnsFact(exists=False)}, veths=())
    p = plan([A], obs, NONE, 10.0, POLICY, Sightings(missing={A.key: 0.0}))
    assert p.releases[0].cause == "netns gone"
    assert "pod netns /run/netns/a is gone (for 10 s)" in p.describe()[0]


def test_a_healthy_look_forgets_the_suspect() -> None:
    p = plan([A], seen(A), NONE, 105.0, POLICY, Sightings(missing={A.key: 100.0}))
    assert p.release == () and p.sightings == Sightings() and p.next_due is None


def test_an_unknown_namespace_is_never_acted_on() -> None:
    obs = Observations(netns={}, host_veths=frozenset({A.host_veth}))
    p = plan([A], obs, NONE, 1000.0, POLICY, Sightings(unheld={A.key: 0.0}))
    assert p.release == () and p.sightings == Sightings()


def test_orphan_grace_none_disables_unheld_collection() -> None:
    obs = seen(A, netns={A.netns: NetnsFact(exists=True, held=False)})
    policy = GcPolicy(orphan_grace=None)
    p = plan([A], obs, NONE, 1000.0, policy, Sightings(unheld={A.key: 0.0}))
    assert p.release == () and p.sightings == Sightings()


@pytest.mark.parametrize(
    ("own", "path", "unmount"),
    [
        (False, "/run/netns/cni-1", False),  # default: the runtime owns its mounts
        (True, "/run/netns/cni-1", True),
        (True, "/var/run/netns/cni-1", False),  # not a configured directory
        (True, "/run/netns/sub/cni-1", False),  # only directly inside
        (True, "/run/netns/../netns/cni-1", False),
        (True, "/proc/42/ns/net", False),
    ],
)
def test_unmount_only_when_owned_and_inside_the_netns_dirs(
    own: bool, path: str, unmount: bool
) -> None:
    a = alloc("a", netns=path)
    obs = seen(a, netns={path: NetnsFact(exists=True, held=False)})
    p = plan([a], obs, NONE, 60.0, GcPolicy(own_netns_mounts=own), Sightings(unheld={a.key: 0}))
    assert p.release == (a.key,)
    assert p.unmount == ((path,) if unmount else ())


def test_in_flight_keys_are_skipped_and_forgotten() -> None:
    b = alloc("b", "10.0.1.6")
    obs = seen(A, b, veths=())  # both veths gone
    before = Sightings(missing={A.key: 0.0, b.key: 0.0})
    p = plan([A, b], obs, frozenset({A.key}), 100.0, POLICY, before)
    assert p.release == (b.key,)
    assert p.in_flight == (A.key,)
    assert A.key not in p.sightings.missing
    # a callable works as well (KeyLocks.busy)
    p2 = plan([A, b], obs, lambda k: k == b.key, 100.0, POLICY, before)
    assert p2.release == (A.key,) and p2.in_flight == (b.key,)


def test_an_in_flight_allocations_veth_and_rules_are_not_strays() -> None:
    rules = (PolicyRule(priority=1536, ip=A.ip, table=2),)
    obs = seen(A, rules=rules)
    p = plan([A], obs, frozenset({A.key}), 100.0, POLICY, Sightings())
    assert p.veths == {} and p.rules == {}


# --- planner: strays ------------------------------------------------------------------------

STRAY = host_veth_name("podwire", "gone", "eth0")


@pytest.mark.parametrize(
    ("name", "first", "now", "planned"),
    [
        (STRAY, None, 50.0, False),
        (STRAY, 50.0, 59.999, False),
        (STRAY, 50.0, 60.0, True),
        ("pwvanything", 0.0, 60.0, True),  # the prefix is what makes it ours
        ("eth0", 0.0, 1e9, False),
        ("veth1234", 0.0, 1e9, False),
        ("pw-node", 0.0, 1e9, False),
        ("cali123", 0.0, 1e9, False),
        (A.host_veth, 0.0, 1e9, False),  # owned by an allocation
    ],
)
def test_stray_veths(name: str, first: float | None, now: float, planned: bool) -> None:
    obs = seen(A, veths=(A.host_veth, name))
    before = Sightings(veths={name: first}) if first is not None else Sightings()
    p = plan([A], obs, NONE, now, POLICY, before)
    assert p.delete_veths == ((name,) if planned else ())
    assert p.release == ()


def rule(priority: int, ip: str, table: int = 254) -> PolicyRule:
    return PolicyRule(priority=priority, ip=IPv4Address(ip), table=table)


@pytest.mark.parametrize(
    ("r", "first", "now", "planned"),
    [
        (rule(1536, "10.0.1.9", 2), None, 0.0, False),
        (rule(1536, "10.0.1.9", 2), 0.0, 9.999, False),
        (rule(1536, "10.0.1.9", 2), 0.0, 10.0, True),
        (rule(512, "10.0.1.9"), 0.0, 10.0, True),
        (rule(1536, "10.0.1.5", 2), 0.0, 1e9, False),  # A's address
        (rule(512, "10.0.1.5"), 0.0, 1e9, False),
        (rule(1024, "10.0.1.9"), 0.0, 1e9, False),  # other priorities are never ours
        (rule(32765, "10.0.1.9", 2), 0.0, 1e9, False),
        (rule(1535, "10.0.1.9", 2), 0.0, 1e9, False),
        (rule(10, "10.0.1.9", 101), 0.0, 1e9, False),
    ],
)
def test_stray_rules(r: PolicyRule, first: float | None, now: float, planned: bool) -> None:
    obs = seen(A, rules=(r,))
    before = Sightings(rules={r: first}) if first is not None else Sightings()
    p = plan([A], obs, NONE, now, POLICY, before)
    assert p.delete_rules == ((r,) if planned else ())


def rev(**kw: object) -> RuleEvent:
    return RuleEvent(kind="new", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            rev(priority=1536, table=2, src=IPv4Address("10.0.1.9"), src_len=32),
            rule(1536, "10.0.1.9", 2),
        ),
        (
            rev(priority=512, table=254, dst=IPv4Address("10.0.1.9"), dst_len=32),
            rule(512, "10.0.1.9"),
        ),
        # shapes the datapath never makes are never ours, even at our priorities
        (rev(priority=512, table=100, dst=IPv4Address("10.0.1.9"), dst_len=32), None),
        (rev(priority=1536, table=2, src=IPv4Address("10.0.1.0"), src_len=24), None),
        (rev(priority=1536, table=2, src=IPv4Address("10.0.1.9"), src_len=32, fwmark=0x80), None),
        (rev(priority=1536, table=2, src=IPv4Address("10.0.1.9"), src_len=32, iifname="x"), None),
        (
            rev(
                priority=1536,
                table=2,
                src=IPv4Address("10.0.1.9"),
                src_len=32,
                dst=IPv4Address("1.1.1.1"),
                dst_len=32,
            ),
            None,
        ),
        (rev(priority=1024, table=254, fwmark=0x80, fwmask=0x80), None),
        (rev(priority=0, table=255), None),
    ],
)
def test_only_rule_shapes_the_datapath_makes_are_observed(
    event: RuleEvent, expected: PolicyRule | None
) -> None:
    assert policy_rule(event) == expected


def test_under() -> None:
    assert under("/run/netns/x", ["/run/netns"])
    assert not under("/run/netns", ["/run/netns"])
    assert not under("run/netns/x", ["run/netns"])


def test_describe_gives_a_reason_per_item() -> None:
    r = rule(512, "10.0.1.9")
    obs = seen(
        A,
        netns={A.netns: NetnsFact(exists=True, held=False)},
        veths=(A.host_veth, STRAY),
        rules=(r,),
    )
    before = Sightings(unheld={A.key: 0.0}, veths={STRAY: 0.0}, rules={r: 0.0})
    p = plan([A], obs, NONE, 60.0, GcPolicy(own_netns_mounts=True), before)
    assert p.describe() == [
        f"release podwire/a/eth0 (10.0.1.5): no process in pod netns {A.netns} (for 60 s)",
        f"unmount {A.netns}: namespace of a released pod",
        f"delete veth {STRAY}: no allocation names it (for 60 s)",
        "delete rule 512: to 10.0.1.9 lookup 254: no allocation holds 10.0.1.9 (for 60 s)",
    ]


# --- executor and service over fakes --------------------------------------------------------

CONF = {"cniVersion": "1.0.0", "name": "podwire", "type": "podwire"}


def req(command: str, cid: str) -> CniRequest:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": f"/run/netns/{cid}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
    }
    return validate(env, CONF)


def service(tmp_path: Path, cooldown: float = 30.0) -> tuple[CniService, FakeDatapath]:
    dp = FakeDatapath()
    provider = FakeProvider(
        [AddressBlock(owner="10.0.1.0/28", ips=usable_hosts(IPv4Network("10.0.1.0/28")))]
    )
    svc = CniService(
        pool=IpPool(cooldown=cooldown),
        datapath=dp,
        provider=provider,
        checkpoint_path=tmp_path / "state.json",
        mtu=1500,
        add_wait=0.0,
    )
    return svc, dp


async def add(svc: CniService, dp: FakeDatapath, probe: FakeNetnsProbe, cid: str) -> Allocation:
    dp.netns.add(f"/run/netns/{cid}")
    probe.held.add(f"/run/netns/{cid}")
    await svc.add(req("ADD", cid))
    return svc.allocations[req("ADD", cid).key]


@pytest.mark.anyio
async def test_collect_rechecks_under_the_lock(tmp_path: Path) -> None:
    svc, dp = service(tmp_path)
    probe = FakeNetnsProbe(dp)
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.restore(Snapshot())
        a = await add(svc, dp, probe, "a")
        b = await add(svc, dp, probe, "b")
        c = await add(svc, dp, probe, "c")
        dp.pods.pop(a.host_veth)
        pod_b = dp.pods.pop(b.host_veth)
        dp.pods.pop(c.host_veth)
        obs = await _observe(svc, dp, probe)
        now = svc.clock()
        p = plan(
            svc.allocations.values(),
            obs,
            NONE,
            now + 10,
            POLICY,
            Sightings(missing={a.key: now, b.key: now, c.key: now}),
        )
        assert set(p.release) == {a.key, b.key, c.key}
        dp.pods[b.host_veth] = pod_b  # b's veth is back by the time GC acts
        async with svc.locks.hold(c.key):  # c has an operation in flight when acting
            dry = await collect(svc, dp, p, dry_run=True, probe_netns=probe)
            assert (dry.released, dry.dry_run) == (3, True)
            assert set(svc.allocations) == {a.key, b.key, c.key}
            report = await collect(svc, dp, p, probe_netns=probe)
        assert (report.released, report.changed, report.skipped_busy) == (1, 1, 1)
        assert set(svc.allocations) == {b.key, c.key}
        assert svc.pool.holder(a.ip) is None
        tg.cancel_scope.cancel()


async def _observe(svc: CniService, dp: FakeDatapath, probe: FakeNetnsProbe) -> Observations:
    from agent.gc import observe

    return await observe(list(svc.allocations.values()), dp, probe_netns=probe)


@pytest.mark.anyio
async def test_collect_strays_spares_what_an_allocation_took_meanwhile(tmp_path: Path) -> None:
    svc, dp = service(tmp_path)
    probe = FakeNetnsProbe(dp)
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.restore(Snapshot())
        a = await add(svc, dp, probe, "a")
        stray = host_veth_name("podwire", "gone", "eth0")
        dp.pods[stray] = dp.pods[a.host_veth]
        dp.rules = [
            rev(priority=1536, table=2, src=IPv4Address("10.0.1.9"), src_len=32),
            rev(priority=512, table=254, dst=IPv4Address("10.0.1.9"), dst_len=32),
            rev(priority=1536, table=2, src=a.ip, src_len=32),
            rev(priority=1024, table=254, fwmark=0x80, fwmask=0x80),
        ]
        p = GcPlan(
            at=0.0,
            veths={stray: "test", a.host_veth: "test: owned by now"},
            rules={
                rule(1536, "10.0.1.9", 2): "t",
                rule(512, "10.0.1.9"): "t",
                rule(1536, str(a.ip), 2): "t: held by now",
            },
        )
        report = await collect(svc, dp, p, probe_netns=probe)
        assert (report.veths, report.rules, report.changed) == (1, 2, 2)
        with anyio.fail_after(5):
            while stray in dp.pods:  # deleted by the CNI service's background deleter
                await anyio.sleep(0.01)
        assert a.host_veth in dp.pods
        assert [r.priority for r in dp.rules] == [1536, 1024]
        # the stray rule's address cools down: no ADD is handed it while the rule goes
        assert IPv4Address("10.0.1.9") in dict(svc.pool.cooling_items())
        tg.cancel_scope.cancel()


async def runs_reach(gc: GcService, n: int) -> None:
    with anyio.fail_after(1000):
        while gc.totals.runs < n:
            await anyio.sleep(0.001)


@pytest.mark.trio
async def test_serve_looks_on_a_jittered_timer(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    svc, dp = service(tmp_path)
    probe = FakeNetnsProbe(dp)
    gc = GcService(svc, dp, interval=5.0, jitter=0.0, probe_netns=probe)
    async with trio.open_nursery() as nursery:
        await svc.restore(Snapshot())
        t0 = trio.current_time()
        await nursery.start(gc.serve)
        looks = []
        for k in range(4):
            await trio.sleep_until(t0 + 5 * k + 0.001)
            assert gc.last is not None
            looks.append(gc.last.at - t0)
        assert looks == pytest.approx([0, 5, 10, 15], abs=1e-9)
        nursery.cancel_scope.cancel()

    seeded = GcService(svc, dp, interval=5.0, jitter=0.2, probe_netns=probe, rng=random.Random(7))
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(seeded.serve)
        await runs_reach(seeded, 20)
        # 20 looks, each 4-6 s after the previous one
        assert 19 * 4 <= seeded.last.at - t0 <= 19 * 6  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_serve_releases_a_vanished_veth_exactly_at_grace(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    svc, dp = service(tmp_path)
    probe = FakeNetnsProbe(dp)
    gc = GcService(svc, dp, policy=POLICY, interval=300.0, jitter=0.0, probe_netns=probe)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        await svc.restore(Snapshot())
        a = await add(svc, dp, probe, "a")
        b = await add(svc, dp, probe, "b")
        await nursery.start(gc.serve)
        await runs_reach(gc, 1)
        assert gc.suspects == 0

        t0 = trio.current_time()
        dp.pods.pop(a.host_veth)  # the pod's veth vanished, no DEL
        gc.on_watch(
            Batch(events=(LinkEvent(kind="del", index=10, name=a.host_veth, mac="", up=False),))
        )
        await trio.sleep(0.001)
        assert gc.totals.runs == 2 and gc.suspects == 1  # looked at t0 when poked: remembered
        assert gc.last is not None and gc.last.at == t0

        await trio.sleep_until(t0 + 10 - 0.001)
        assert a.key in svc.allocations, "not before the grace"
        await runs_reach(gc, 3)
        assert a.key not in svc.allocations
        assert gc.last.at == pytest.approx(t0 + 10, abs=1e-9) and gc.last.released == 1
        assert b.key in svc.allocations and gc.totals.released == 1 and gc.suspects == 0
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_serve_tears_down_an_unheld_netns_after_its_grace_and_ip_cools(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    svc, dp = service(tmp_path, cooldown=30.0)
    probe = FakeNetnsProbe(dp)
    gc = GcService(svc, dp, policy=POLICY, interval=7.0, jitter=0.0, probe_netns=probe)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        await svc.restore(Snapshot())
        a = await add(svc, dp, probe, "a")
        t0 = trio.current_time()
        probe.held.discard(a.netns)  # the sandbox died; its netns mount stays
        await nursery.start(gc.serve)  # first look at t0, then every 7 s
        await trio.sleep_until(t0 + 60 - 0.001)
        assert a.key in svc.allocations and gc.totals.runs == 9  # 0, 7, ..., 56
        await runs_reach(gc, 10)
        assert a.key not in svc.allocations
        assert gc.last is not None and gc.last.at == pytest.approx(t0 + 60, abs=1e-9)
        assert a.netns in dp.netns, "the runtime's mount is not ours to remove"
        assert a.ip in dict(svc.pool.cooling_items())
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_serve_replays_the_spool_and_keeps_going_after_a_failed_look(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    svc, dp = service(tmp_path)
    probe = FakeNetnsProbe(dp)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    failures = [OSError("proc unreadable")]

    async def flaky(paths: Sequence[str]) -> dict[str, NetnsFact]:
        if failures:
            raise failures.pop()
        return await probe(paths)

    gc = GcService(svc, dp, interval=5.0, jitter=0.0, probe_netns=flaky, spool_dir=spool_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        await svc.restore(Snapshot())
        a = await add(svc, dp, probe, "a")
        (spool_dir / "1.json").write_bytes(
            b'{"env": {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "a", "CNI_IFNAME": "eth0",'
            b' "CNI_NETNS": "", "CNI_PATH": "/opt/cni/bin"}, "config": '
            b'{"cniVersion": "1.0.0", "name": "podwire", "type": "podwire"}}'
        )
        await nursery.start(gc.serve)
        await runs_reach(gc, 1)  # the first look failed and was retried by the timer
        assert not failures and a.key not in svc.allocations
        assert not list(spool_dir.iterdir())
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_on_watch_pokes_for_a_live_pods_veth_going_and_for_resyncs(tmp_path: Path) -> None:
    svc, dp = service(tmp_path)
    probe = FakeNetnsProbe(dp)
    gc = GcService(svc, dp)
    await svc.restore(Snapshot())
    a = await add(svc, dp, probe, "a")
    other = LinkEvent(kind="del", index=3, name="eth1", mac="", up=False)
    new = LinkEvent(kind="new", index=4, name="pwvabc", mac="", up=True)
    deleted = LinkEvent(kind="del", index=4, name="pwvabc", mac="", up=False)  # by a DEL
    gc.on_watch(Batch(events=(other, new, deleted)))
    assert not gc._poked.is_set()  # no look per DEL
    vanished = LinkEvent(kind="del", index=5, name=a.host_veth, mac="", up=False)
    gc.on_watch(Batch(events=(vanished,)))
    assert gc._poked.is_set()
    gc._poked = anyio.Event()
    gc.on_watch(Resync(reason="overrun", links=(), addrs=(), routes=(), rules=()))
    assert gc._poked.is_set()
