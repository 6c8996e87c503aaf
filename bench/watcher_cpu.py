"""CPU the netlink watcher spends while 500 pods come and go.

    .venv/bin/python -m bench.watcher_cpu [--pods 500] [--backend asyncio|trio] [--window 0.03]

A node namespace watched in-process and a namespace holding the pod ends are made first (not
measured). The churn runs in ``ip -batch`` processes, so this process's CPU time (getrusage
RUSAGE_SELF) is the watcher's: per pod a veth pair with the host end named like podwire's,
brought up, and a ``/32 scope link`` route to it; then every host end is deleted. The counter
stops once the watcher has delivered the last route and the last deletion. Needs root; every
object lives in namespaces this script makes and removes.
"""

from __future__ import annotations

import argparse
import resource
import time
from ipaddress import IPv4Address

import anyio

from netlink.watcher import Batch, LinkEvent, RouteEvent, Watcher
from tests.netns import netns


def cpu_s() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def churn(pods: int, window: float) -> dict[str, float]:
    with netns("benchnode") as node, netns("benchpods") as peers:
        names = [f"pwvbench{i:06d}" for i in range(pods)]
        base = IPv4Address("10.200.0.0")
        create = []
        for i, name in enumerate(names):
            create += [
                f"link add {name} type veth peer name p{i} netns {peers.name}",
                f"link set {name} up",
                f"route add {base + i}/32 dev {name} scope link",
            ]
        delete = [f"link del {name}" for name in names]
        watcher = Watcher(netns=node.path, window=window)
        items = watcher.subscribe(max_buffer=10_000)
        async with anyio.create_task_group() as tg:
            await tg.start(watcher.serve)
            await items.receive()  # the start Resync
            cpu0, wall0 = cpu_s(), time.perf_counter()
            events0, batches0 = watcher.events, watcher.batches
            routes = gone = 0

            async def run(lines: list[str]) -> None:
                await anyio.run_process(
                    ["ip", "-n", node.name, "-batch", "-"], input="\n".join(lines).encode()
                )

            await run(create)
            async for item in items:
                if isinstance(item, Batch):
                    routes += sum(
                        isinstance(e, RouteEvent)
                        and e.kind == "new"
                        and e.prefixlen == 32
                        and e.table == 254
                        for e in item.events
                    )
                if routes >= pods:
                    break
            await run(delete)
            async for item in items:
                if isinstance(item, Batch):
                    gone += sum(
                        isinstance(e, LinkEvent)
                        and e.kind == "del"
                        and e.name.startswith("pwvbench")
                        for e in item.events
                    )
                if gone >= pods:
                    break
            (user1, sys1), wall = cpu_s(), time.perf_counter() - wall0
            user, system = user1 - cpu0[0], sys1 - cpu0[1]
            cpu = user + system
            events, batches = watcher.events - events0, watcher.batches - batches0
            overruns = watcher.overruns
            tg.cancel_scope.cancel()
    return {
        "pods": pods,
        "cpu_ms": cpu * 1000,
        "user_ms": user * 1000,
        "sys_ms": system * 1000,
        "wall_ms": wall * 1000,
        "events": events,
        "batches": batches,
        "overruns": overruns,
        "us_per_event": cpu * 1e6 / max(events, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--window", type=float, default=0.03)
    args = parser.parse_args()
    r = anyio.run(churn, args.pods, args.window, backend=args.backend)
    print(
        f"watcher, {r['pods']:.0f}-pod churn ({args.backend}): cpu {r['cpu_ms']:.0f} ms "
        f"(user {r['user_ms']:.0f}, sys {r['sys_ms']:.0f}) over "
        f"{r['wall_ms']:.0f} ms wall; {r['events']:.0f} events in {r['batches']:.0f} batches "
        f"({r['us_per_event']:.0f} us/event), overruns {r['overruns']:.0f}"
    )


if __name__ == "__main__":
    main()
