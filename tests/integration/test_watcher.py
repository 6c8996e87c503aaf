"""The netlink watcher against the real kernel, with its socket inside a test namespace.

Objects are made with ``ip -n <ns>`` (or ``ip -batch``) so the event loop keeps reading while
they are made; the overrun test instead blocks the loop on purpose while it floods. Waits are
event-driven with generous timeouts; nothing asserts on elapsed real time.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import IPv4Address

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from netlink.watcher import (
    AddrEvent,
    Batch,
    Event,
    Item,
    LinkEvent,
    LinkWaitTimedOut,
    Resync,
    RouteEvent,
    RuleEvent,
    TcEvent,
    Watcher,
)
from tests.netns import Netns

pytestmark = [pytest.mark.root, pytest.mark.anyio]

MakeNetns = Callable[[str], Netns]
WAIT = 30.0  # generous: only reached when the event never comes


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def watching(
    ns: Netns, **kwargs: object
) -> AsyncIterator[tuple[Watcher, MemoryObjectReceiveStream[Item]]]:
    watcher = Watcher(netns=ns.path, **kwargs)  # type: ignore[arg-type]
    items = watcher.subscribe(max_buffer=1000)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.serve)
        first = items.receive_nowait()
        assert isinstance(first, Resync) and first.reason == "start"
        assert any(link.name == "lo" for link in first.links)
        yield watcher, items
        tg.cancel_scope.cancel()


async def ip(ns: Netns, *args: str) -> None:
    await anyio.run_process(["ip", "-n", ns.name, *args])


async def ip_batch(ns: Netns, lines: list[str]) -> None:
    await anyio.run_process(["ip", "-n", ns.name, "-batch", "-"], input="\n".join(lines).encode())


async def until(
    items: MemoryObjectReceiveStream[Item], want: Callable[[Event], bool]
) -> tuple[Event, list[Item]]:
    """Receive until an event matching ``want``; return it and every item received."""
    seen: list[Item] = []
    with anyio.fail_after(WAIT):
        async for item in items:
            seen.append(item)
            if isinstance(item, Batch):
                for e in item.events:
                    if want(e):
                        return e, seen
    raise AssertionError("stream ended")


async def test_links_addresses_routes_and_rules_are_reported(make_netns: MakeNetns) -> None:
    ns = make_netns("watch")
    async with watching(ns) as (_, items):
        await ip(
            ns,
            "link",
            "add",
            "pwvtest0",
            "address",
            "02:aa:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
        )
        e, _ = await until(items, lambda e: isinstance(e, LinkEvent) and e.name == "pwvtest0")
        assert isinstance(e, LinkEvent)
        assert (e.kind, e.mac, e.up, e.kind_of_link) == ("new", "02:aa:00:00:00:01", False, "veth")

        await ip(ns, "link", "set", "peer0", "up")
        await ip(ns, "link", "set", "pwvtest0", "up")
        e, _ = await until(
            items, lambda e: isinstance(e, LinkEvent) and e.name == "pwvtest0" and e.up
        )
        index = e.index  # type: ignore[union-attr]

        await ip(ns, "addr", "add", "10.1.0.1/24", "dev", "pwvtest0")
        e, _ = await until(items, lambda e: isinstance(e, AddrEvent))
        assert e == AddrEvent(
            kind="new", index=index, address=IPv4Address("10.1.0.1"), prefixlen=24, label="pwvtest0"
        )

        await ip(
            ns, "route", "add", "10.2.0.0/16", "via", "10.1.0.9", "dev", "pwvtest0", "table", "100"
        )
        e, _ = await until(items, lambda e: isinstance(e, RouteEvent) and e.table == 100)
        assert isinstance(e, RouteEvent)
        assert (e.kind, e.dst, e.prefixlen, e.oif, e.gateway) == (
            "new",
            IPv4Address("10.2.0.0"),
            16,
            index,
            IPv4Address("10.1.0.9"),
        )

        await ip(ns, "rule", "add", "from", "10.3.0.4", "lookup", "100", "priority", "1536")
        e, _ = await until(items, lambda e: isinstance(e, RuleEvent))
        assert e == RuleEvent(
            kind="new", priority=1536, table=100, src=IPv4Address("10.3.0.4"), src_len=32
        )
        await ip(ns, "rule", "add", "fwmark", "0x80/0x80", "lookup", "main", "priority", "1024")
        e, _ = await until(items, lambda e: isinstance(e, RuleEvent) and e.priority == 1024)
        assert isinstance(e, RuleEvent)
        assert (e.fwmark, e.fwmask, e.table) == (0x80, 0x80, 254)

        await ip(ns, "rule", "del", "priority", "1536")
        e, _ = await until(items, lambda e: isinstance(e, RuleEvent) and e.kind == "del")
        assert isinstance(e, RuleEvent) and e.priority == 1536

        await ip(ns, "route", "del", "10.2.0.0/16", "table", "100")
        e, _ = await until(items, lambda e: isinstance(e, RouteEvent) and e.kind == "del")
        assert isinstance(e, RouteEvent) and e.table == 100

        await ip(ns, "link", "del", "pwvtest0")
        e, _ = await until(
            items, lambda e: isinstance(e, LinkEvent) and e.kind == "del" and e.name == "pwvtest0"
        )
        assert isinstance(e, LinkEvent) and e.index == index


async def test_three_hundred_veths_deleted_at_once_come_in_a_few_batches(
    make_netns: MakeNetns,
) -> None:
    node, peers = make_netns("watchnode"), make_netns("watchpeers")
    names = [f"pwvburst{i:04d}" for i in range(300)]
    async with watching(node, window=0.03) as (_, items):
        await ip_batch(
            node,
            [
                f"link add {n} type veth peer name p{i} netns {peers.name}"
                for i, n in enumerate(names)
            ],
        )
        # Deleting the namespace that holds the peers deletes all 300 pairs in one go.
        await anyio.run_process(["ip", "netns", "del", peers.name])
        gone: set[str] = set()
        batches_with_deletions = 0
        with anyio.fail_after(WAIT):
            async for item in items:
                assert isinstance(item, Batch), "no overrun expected with the default buffer"
                deleted = {e.name for e in item.links_gone("pwvburst")}
                if deleted:
                    batches_with_deletions += 1
                    gone |= deleted
                if gone == set(names):
                    break
    print(f"300 deletions in {batches_with_deletions} batches")
    assert batches_with_deletions <= 20


async def test_overrun_delivers_a_resync_with_the_truth(make_netns: MakeNetns) -> None:
    ns = make_netns("watchflood")
    names = [f"pwvflood{i:04d}" for i in range(200)]
    async with watching(ns, rcvbuf=4096) as (watcher, items):
        # Blocking the event loop on purpose: the watcher cannot read while the kernel floods
        # its small buffer, so notifications are dropped and ENOBUFS is reported.
        subprocess.run(
            ["ip", "-n", ns.name, "-batch", "-"],
            check=True,
            input="\n".join(
                f"link add {n} type veth peer name q{i}" for i, n in enumerate(names)
            ).encode(),
        )
        resync = None
        with anyio.fail_after(WAIT):
            async for item in items:
                if isinstance(item, Resync):
                    resync = item
                    break
        assert resync is not None and resync.reason == "overrun"
        assert watcher.overruns >= 1
        assert {link.name for link in resync.links} >= set(names)
        assert {link.name for link in resync.links if link.kind_of_link == "veth"} == (
            set(names) | {f"q{i}" for i in range(200)}
        )
        assert all(link.kind == "new" for link in resync.links)


async def test_wait_link_finds_a_link_made_before_or_after_and_times_out_otherwise(
    make_netns: MakeNetns,
) -> None:
    ns = make_netns("watchmac")
    async with watching(ns) as (watcher, _):
        await ip(
            ns,
            "link",
            "add",
            "before",
            "address",
            "02:bb:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            "before1",
        )
        found = await watcher.wait_link(mac="02:BB:00:00:00:01", timeout=WAIT)
        assert found.name == "before"

        result: list[LinkEvent] = []

        async def wait_after() -> None:
            result.append(await watcher.wait_link(mac="02:bb:00:00:00:02", timeout=WAIT))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_after)
            with anyio.fail_after(WAIT):
                while not watcher._waiters:  # registered and looking: the link comes later
                    await anyio.sleep(0.01)
            await ip(
                ns,
                "link",
                "add",
                "after",
                "address",
                "02:bb:00:00:00:02",
                "type",
                "veth",
                "peer",
                "name",
                "after1",
            )
        assert result[0].name == "after"

        with pytest.raises(LinkWaitTimedOut) as info:
            await watcher.wait_link(mac="02:bb:00:00:00:03", timeout=0.3)
        assert isinstance(info.value, TimeoutError) and info.value.mac == "02:bb:00:00:00:03"


async def test_a_removed_tc_program_is_reported_and_a_deleted_link_is_not(
    make_netns: MakeNetns,
) -> None:
    """802.1Q links keep their programs under tc (netlink.dot1q): someone's ``tc qdisc del`` or
    ``tc filter del`` is an event; a link deleted with its programs is only a link event."""
    ns = make_netns("tc")
    await ip_batch(ns, ["link add w0 type veth peer name w1", "link add w2 type veth peer name w3"])
    for dev in ("w0", "w2"):
        await anyio.run_process(
            ["ip", "netns", "exec", ns.name, "tc", "qdisc", "add", "dev", dev, "clsact"]
        )
    index = int(ns.run("cat", "/sys/class/net/w0/ifindex").stdout)
    async with watching(ns) as (_, items):
        await ip(ns, "link", "del", "w2")
        gone, seen = await until(items, lambda e: isinstance(e, LinkEvent) and e.kind == "del")
        await anyio.run_process(
            ["ip", "netns", "exec", ns.name, "tc", "qdisc", "del", "dev", "w0", "clsact"]
        )
        removed, more = await until(items, lambda e: isinstance(e, TcEvent))
    assert removed == TcEvent(kind="del", index=index, parent=0xFFFFFFF1)
    events = [e for item in seen + more if isinstance(item, Batch) for e in item.events]
    assert gone in events and [e for e in events if isinstance(e, TcEvent)] == [removed]


async def test_a_lazy_window_is_read_at_once_when_someone_needs_events(
    make_netns: MakeNetns,
) -> None:
    # A window that never closes by itself: whatever is read here was read because someone
    # needed it (a wanted immediate callback, poked; a link waiter).
    ns = make_netns("watchlazy")
    async with watching(ns, window=3600.0) as (watcher, _):
        seen: list[str] = []
        want = [False]
        poke = watcher.add_immediate_callback(
            lambda events: seen.extend(e.name for e in events if isinstance(e, LinkEvent)),
            wanted=lambda: want[0],
        )
        await ip(ns, "link", "add", "lazy0", "type", "veth", "peer", "name", "lazy1")
        await anyio.sleep(0.2)  # a chance to read, which a lazy window does not take
        assert seen == []
        want[0] = True
        poke()
        with anyio.fail_after(WAIT):
            while "lazy0" not in seen:
                await anyio.sleep(0.01)
        want[0] = False
        await ip(ns, "link", "add", "lazy2", "type", "veth", "peer", "name", "lazy3")
        await anyio.sleep(0.2)
        assert "lazy2" not in seen
        # a link waiter registering while the window sleeps is served at once (its own poke)
        result: list[LinkEvent] = []

        async def wait_after() -> None:
            result.append(await watcher.wait_link(mac="02:cc:00:00:00:04", timeout=WAIT))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_after)
            with anyio.fail_after(WAIT):
                while not watcher._waiters:  # registered and looking: the link comes later
                    await anyio.sleep(0.01)
            await ip(ns, "link", "add", "lazy4", "address", "02:cc:00:00:00:04", "type", "veth",
                     "peer", "name", "lazy5")  # fmt: skip
        assert result[0].name == "lazy4"
        assert "lazy2" in seen  # read with the waiter's events, in kernel order
