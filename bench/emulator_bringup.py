"""How long bringing up an emulated VPC with N nodes takes: ``python -m bench.emulator_bringup``.

Measures, per run: ``Vpc.start()`` (router + internet namespaces, EC2 API and IMDS servers) and
adding N nodes (RunInstances, namespace, eth0 cabled and routed), then teardown. Needs root.
Importing the emulator (moto) and the first bring-up are reported apart.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def once(Vpc: Any, nodes: int, instance_type: str) -> tuple[float, float, float]:
    started = time.perf_counter()
    vpc = Vpc.start()
    up = time.perf_counter()
    try:
        subnet = vpc.add_subnet("10.0.1.0/24")
        for _ in range(nodes):
            vpc.add_node(instance_type, subnet)
        ready = time.perf_counter()
    finally:
        vpc.stop()
    return up - started, ready - up, time.perf_counter() - ready


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--instance-type", default="m5.large")
    args = parser.parse_args()
    import_started = time.perf_counter()
    from cloud.emulator import Vpc

    imported = time.perf_counter() - import_started
    first = once(Vpc, args.nodes, args.instance_type)
    print(
        f"import cloud.emulator (moto, werkzeug): {imported * 1000:.0f} ms; "
        f"first bring-up: {sum(first[:2]) * 1000:.0f} ms"
    )
    rows = [once(Vpc, args.nodes, args.instance_type) for _ in range(args.runs)]
    for label, column in zip(
        ("start", f"{args.nodes} nodes", "stop"), zip(*rows, strict=True), strict=True
    ):
        print(
            f"{label:>10}: median {statistics.median(column) * 1000:6.0f} ms  "
            f"(min {min(column) * 1000:.0f}, max {max(column) * 1000:.0f})"
        )
    total = [start + add for start, add, _ in rows]
    print(
        f"{'bring-up':>10}: median {statistics.median(total) * 1000:6.0f} ms for {args.nodes} nodes"
    )


if __name__ == "__main__":
    main()
