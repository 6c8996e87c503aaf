"""Per-pod cost of the routed-veth datapath: wire, check, unwire_host, delete_link, delete_links.

    .venv/bin/python -m bench.wire_cost [--pods 100] [--threads 4] [--batch 50]

A node namespace and the pod namespaces are made first (not timed); then each of N pods is wired,
checked, unwired and deleted one at a time from one thread, timing every call; then N fresh pods
are wired by a thread pool (wall time, pods/s) and deleted again, in batches of B, by
delete_links. Prints min/p50/p95/max in ms. Needs root; every object lives in namespaces this
script makes and removes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from typing import TypeVar

from netlink import Datapath, PodNet, host_veth_name
from tests.netns import Netns, unique_name

T = TypeVar("T")


def pods_in(namespaces: list[Netns], base: IPv4Address, table: int | None) -> list[PodNet]:
    return [
        PodNet(
            netns=ns.path,
            ifname="eth0",
            host_veth=host_veth_name("bench", ns.name, "eth0"),
            ip=base + i,
            mtu=9001,
            table=table,
        )
        for i, ns in enumerate(namespaces)
    ]


def timed(call: Callable[[T], object], args: Sequence[T]) -> list[float]:
    costs = []
    for arg in args:
        start = time.perf_counter()
        call(arg)
        costs.append((time.perf_counter() - start) * 1000)
    return costs


def row(name: str, costs: list[float]) -> str:
    ordered = sorted(costs)
    p95 = ordered[round(0.95 * (len(ordered) - 1))]
    return (
        f"{name:<17}{ordered[0]:>9.3f}{statistics.median(ordered):>9.3f}"
        f"{p95:>9.3f}{ordered[-1]:>9.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=50, help="links per delete_links call")
    parser.add_argument("--table", type=int, default=2, help="ENI table; 0 for main, no rules")
    args = parser.parse_args()
    table = args.table or None

    made: list[Netns] = []
    try:
        node = Netns(unique_name("bnode"))
        made.append(node)
        serial = [Netns(unique_name("bpod")) for _ in range(args.pods)]
        made += serial
        parallel = [Netns(unique_name("bpar")) for _ in range(args.pods)]
        made += parallel
        datapath = Datapath(node.path)
        try:
            pods = pods_in(serial, IPv4Address("10.1.0.10"), table)
            wire = timed(datapath.wire, pods)
            check = timed(datapath.check, pods)
            assert all(datapath.check(p) == [] for p in pods[:3])
            unwire = timed(datapath.unwire_host, pods)
            delete = timed(lambda p: datapath.delete_link(p.host_veth), pods)

            more = pods_in(parallel, IPv4Address("10.2.0.10"), table)
            with ThreadPoolExecutor(max_workers=args.threads) as pool:
                start = time.perf_counter()
                list(pool.map(datapath.wire, more))
                wall = time.perf_counter() - start
            names = [p.host_veth for p in more]
            batches = [names[i : i + args.batch] for i in range(0, len(names), args.batch)]
            delete_batch = timed(datapath.delete_links, batches)
            assert datapath.host_veths() == {}
        finally:
            datapath.close()
    finally:
        for ns in reversed(made):
            ns.close()

    rules = f"table {table}, 2 rules" if table else "main table, no rules"
    print(f"{args.pods} pods, one thread, {rules} (ms)")
    print(f"{'':<17}{'min':>9}{'p50':>9}{'p95':>9}{'max':>9}")
    for name, costs in (
        ("wire", wire),
        ("check", check),
        ("unwire_host", unwire),
        ("delete_link", delete),
    ):
        print(row(name, costs))
    print(row(f"delete_links/{args.batch}", delete_batch), f" ({len(delete_batch)} calls)")
    print(
        f"wire x{args.pods} on {args.threads} threads: {wall * 1000:.1f} ms wall, "
        f"{args.pods / wall:.0f} pods/s"
    )


if __name__ == "__main__":
    main()
