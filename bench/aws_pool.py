"""The aws provider's warm pool, measured on the emulated VPC.

    .venv/bin/python -m bench.aws_pool

1. ADD latency (plugin exec'd as a runtime does) with the warm pool at its target, aws provider
   vs static provider, in the same run (min/p50/p95/max over N pods).
2. Time from an empty pool to 30 running pods with every EC2 call delayed by 100 ms
   (kubelet-style retries on code 11 included).
3. EC2 calls made per pod during a 0 -> 100 -> 0 churn (m5.4xlarge: 8 ENIs x 30 IPs), counted
   from the agent's own metrics.

Prints a table and writes bench/results/aws_pool.json. Needs root; touches only namespaces
it makes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import time
from pathlib import Path
from typing import Any

from cloud.aws.ec2 import EC2_ACTIONS_USED as ACTIONS
from cloud.emulator import Vpc
from tests import harness
from tests.harness import CniResult, Node

RESULTS = Path(__file__).resolve().parent / "results"


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "max": ordered[-1],
    }


def aws_node(vpc: Vpc, instance_type: str, subnet: Any, tag: str, **aws: Any) -> Node:
    vnode = vpc.add_node(instance_type, subnet)
    fast = {"min_eni_age": 1.0, "release_interval": 1.0, "refill_interval": 1.0}
    node = harness.aws_node(vpc, vnode, aws={**fast, **aws}, cooldown=0.0, tag=tag)
    node.start(timeout=60)
    return node


def add_retrying(node: Node, pod: Any) -> CniResult:
    while True:
        r = node.add(pod)
        if r.code == 0 or r.doc["code"] != 11:
            return r
        time.sleep(0.1)


def timed_adds(node: Node, n: int) -> list[float]:
    out = []
    for _ in range(n):
        pod = node.new_pod("b")
        start = time.perf_counter()
        r = node.add(pod)
        out.append((time.perf_counter() - start) * 1000)
        assert r.code == 0, r
    return out


def ec2_calls(node: Node) -> float:
    total = 0.0
    for line in node.ctl("metrics").stdout.splitlines():
        if line.startswith("podwire_ec2_requests_total{"):
            total += float(line.split()[-1])
    return total


def until_pool(node: Node, ok: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok(node.call("agent.pool")) and time.monotonic() < deadline:
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    # no options: --help says what runs instead of running it
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    results: dict[str, Any] = {}
    with Vpc.start("10.0.0.0/16") as vpc:
        subnet = vpc.add_subnet("10.0.0.0/18")
        # 1. ADD latency with a warm pool: aws vs static on the same machine, same run
        aws = aws_node(vpc, "m5.xlarge", subnet, "lat", warm_ip_target=40)
        until_pool(aws, lambda p: sum(o["free"] for o in p["owners"]) >= 40)
        static_vnode = vpc.add_node("m5.large", subnet, pod_cidr="10.0.200.0/24")
        static = Node(
            netns=static_vnode.netns,
            primary_ip=static_vnode.primary_ip,
            cidrs=("10.0.200.0/24",),
            cooldown=0.0,
            tag="stat",
        )
        static.start()
        try:
            timed_adds(aws, 3), timed_adds(static, 3)  # warm both
            results["add_ms_aws"] = summary(timed_adds(aws, 30))
            results["add_ms_static"] = summary(timed_adds(static, 30))
        finally:
            aws.close()
            static.close()

        # 2. empty pool -> 30 running pods, every EC2 call 100 ms slower
        for action in ACTIONS:
            vpc.faults.latency(action, 0.1)
        node = aws_node(vpc, "m5.xlarge", subnet, "cold", warm_eni_target=0, warm_ip_target=1)
        try:
            pods = [node.new_pod("c") for _ in range(30)]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                assert all(r.code == 0 for r in ex.map(lambda p: add_retrying(node, p), pods))
            results["empty_to_30_pods_s_at_100ms_per_call"] = time.perf_counter() - start
        finally:
            node.close()
            vpc.faults.clear()

        # 3. EC2 calls per pod during 0 -> 100 -> 0
        node = aws_node(vpc, "m5.4xlarge", subnet, "churn")
        try:
            before = ec2_calls(node)
            pods = [node.new_pod("ch") for _ in range(100)]
            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                assert all(r.code == 0 for r in ex.map(lambda p: add_retrying(node, p), pods))
                assert all(r.code == 0 for r in ex.map(node.delete, pods))
            until_pool(node, lambda p: len(p["owners"]) <= 2)
            calls = ec2_calls(node) - before
            results["churn_ec2_calls"] = calls
            results["churn_ec2_calls_per_pod"] = calls / 100
        finally:
            node.close()

    a, s = results["add_ms_aws"], results["add_ms_static"]
    print(f"{'':<34}{'aws':>8}{'static':>9}")
    for k in ("min", "p50", "p95", "max"):
        print(f"{'ADD ' + k + ' (ms), warm pool':<34}{a[k]:>8.1f}{s[k]:>9.1f}")
    print(
        f"{'empty pool -> 30 pods, 100 ms/call':<34}"
        f"{results['empty_to_30_pods_s_at_100ms_per_call']:>7.2f}s"
    )
    print(
        f"{'EC2 calls per pod, 0->100->0':<34}{results['churn_ec2_calls_per_pod']:>8.2f}"
        f"   ({results['churn_ec2_calls']:.0f} calls)"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "aws_pool.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
