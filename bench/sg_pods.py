"""Security groups for pods, measured on the emulated VPC.

    .venv/bin/python -m bench.sg_pods

1. SG-pod ADD latency (plugin exec'd as a runtime does) with the trunk attached: every ADD
   makes and associates a branch ENI (min/p50/p95/max over N pods), next to an ordinary pod's
   ADD on the same node.
2. EC2 calls per SG pod over a churn of 30 SG pods up and down (branch create + associate,
   cooldown, disassociate + delete), counted from the agent's own metrics.
3. A burst of 18 SG pods on an m5.xlarge (its branch limit): time until all answered, with
   0 and with 100 ms added to every EC2 call (kubelet-style retries on code 11 included).

eni mode (``[security_groups] mode = "eni"``), in the same run, next to branch mode:

4. SG-pod ADD latency with a warm set (its margin is there before each ADD), against branch
   mode's (above) and an ordinary pod's on the same eni-mode node.
5. EC2 calls per SG pod over a churn 0 -> 50 -> 0 with three sets, by action.
6. A burst of 18 SG pods in three sets of 6 on an m5.xlarge with 100 ms added to every EC2
   call, in eni mode and in branch mode (the same three groups), time until all answered.

Prints a table and writes bench/results/sg_pods.json. Needs root; touches only namespaces it
makes. Branch links carry 802.1Q as on EC2 (on a kernel without VLAN devices, veths tagged by
eBPF: netlink/dot1q; bench/branch_link.py measures the datapath's own share).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import time
from pathlib import Path
from typing import Any

import boto3

from bench.aws_pool import summary
from cloud.aws.ec2 import EC2_ACTIONS_USED as ACTIONS
from cloud.emulator import Vpc
from tests.harness import CniResult, Node, aws_node

RESULTS = Path(__file__).resolve().parent / "results"


def sg_node(vpc: Vpc, instance_type: str, subnet: Any, tag: str, cooldown: float) -> Node:
    vnode = vpc.add_node(instance_type, subnet)
    section = {"enabled": True, "branch_cooldown": cooldown, "branch_wait": 20.0}
    node = aws_node(
        vpc,
        vnode,
        aws={"refill_interval": 1.0},
        security_groups=section,
        cooldown=0.0,
        tag=tag,
    )
    node.start(timeout=60)
    return node


def conf(node: Node, group: str | None) -> dict[str, Any]:
    if group is None:
        return node.plugin_conf()
    return node.plugin_conf(
        runtimeConfig={"io.kubernetes.cri.pod-annotations": {"podwire.io/security-groups": group}}
    )


def add_retrying(node: Node, pod: Any, group: str | None) -> CniResult:
    c = conf(node, group)
    while True:
        r = node.add(pod, conf=c)
        if r.code == 0 or r.doc["code"] != 11:
            return r
        time.sleep(0.1)


def timed_add(node: Node, group: str | None, name: str = "b") -> float:
    """One ADD of a new pod (with ``group``, or none), in ms; it must succeed."""
    pod = node.new_pod(name)
    c = conf(node, group)
    start = time.perf_counter()
    r = node.add(pod, conf=c)
    elapsed = (time.perf_counter() - start) * 1000
    assert r.code == 0, r
    return elapsed


def timed_adds(node: Node, n: int, group: str | None) -> list[float]:
    return [timed_add(node, group) for _ in range(n)]


def ec2_calls(node: Node) -> float:
    total = 0.0
    for line in node.ctl("metrics").stdout.splitlines():
        if line.startswith("podwire_ec2_requests_total{"):
            total += float(line.split()[-1])
    return total


def branches_settled(node: Node, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not node.call("agent.branches")["rows"]:
            return
        time.sleep(0.2)
    raise TimeoutError("branches did not all go")


def main(argv: list[str] | None = None) -> int:
    # no options: --help says what runs instead of running it
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    results: dict[str, Any] = {}
    with Vpc.start("10.0.0.0/16") as vpc:
        subnet = vpc.add_subnet("10.0.0.0/18")
        ec2 = boto3.client("ec2", **vpc.client_kwargs())
        app = ec2.create_security_group(GroupName="app", Description="app", VpcId=vpc.vpc_id)[
            "GroupId"
        ]
        # 1. ADD latency, trunk warm
        node = sg_node(vpc, "m5.4xlarge", subnet, "lat", cooldown=1.0)  # 54 branches
        try:
            timed_adds(node, 2, app), timed_adds(node, 2, None)  # warm both paths
            results["add_ms_sg"] = summary(timed_adds(node, 30, app))
            results["add_ms_ordinary"] = summary(timed_adds(node, 30, None))
        finally:
            node.close()

        # 2. EC2 calls per SG pod over a churn 0 -> 30 -> 0
        node = sg_node(vpc, "m5.4xlarge", subnet, "churn", cooldown=1.0)
        try:
            before = ec2_calls(node)
            pods = [node.new_pod("ch") for _ in range(30)]
            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                assert all(r.code == 0 for r in ex.map(lambda p: add_retrying(node, p, app), pods))
                assert all(
                    r.code == 0
                    for r in ex.map(lambda p: node.delete(p, conf=conf(node, None)), pods)
                )
            branches_settled(node)
            calls = ec2_calls(node) - before
            results["churn_ec2_calls"] = calls
            results["churn_ec2_calls_per_sg_pod"] = calls / 30
        finally:
            node.close()

        # 3. burst of 18 SG pods on an m5.xlarge, 0 and 100 ms per EC2 call
        for latency in (0.0, 0.1):
            for action in ACTIONS:
                vpc.faults.latency(action, latency)
            node = sg_node(vpc, "m5.xlarge", subnet, f"burst{int(latency * 1000)}", cooldown=1.0)
            try:
                pods = [node.new_pod("bu") for _ in range(18)]
                start = time.perf_counter()
                one = functools.partial(add_retrying, node, group=app)
                with concurrent.futures.ThreadPoolExecutor(18) as ex:
                    assert all(r.code == 0 for r in ex.map(one, pods))
                results[f"burst_18_s_at_{int(latency * 1000)}ms_per_call"] = (
                    time.perf_counter() - start
                )
            finally:
                node.close()
                vpc.faults.clear()

        eni_mode(vpc, subnet, ec2, app, results)

    a, o = results["add_ms_sg"], results["add_ms_ordinary"]
    print(f"{'':<38}{'SG pod':>8}{'ordinary':>10}")
    for k in ("min", "p50", "p95", "max"):
        print(f"{'ADD ' + k + ' (ms), trunk warm':<38}{a[k]:>8.1f}{o[k]:>10.1f}")
    print(
        f"{'EC2 calls per SG pod, 0->30->0':<38}{results['churn_ec2_calls_per_sg_pod']:>8.2f}"
        f"   ({results['churn_ec2_calls']:.0f} calls)"
    )
    for ms in (0, 100):
        key = f"burst_18_s_at_{ms}ms_per_call"
        print(f"{f'18 SG pods at once, +{ms} ms/call':<38}{results[key]:>7.2f}s")
    print_eni_mode(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sg_pods.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


# --- eni mode ---------------------------------------------------------------------------------


def eni_node(vpc: Vpc, instance_type: str, subnet: Any, tag: str, **sg: Any) -> Node:
    """A node in eni mode: short set cooldown and ENI age, so a churn settles in seconds."""
    vnode = vpc.add_node(instance_type, subnet)
    section = {"enabled": True, "mode": "eni", "set_cooldown": 1.0, "branch_wait": 20.0, **sg}
    node = aws_node(
        vpc,
        vnode,
        aws={"refill_interval": 1.0, "min_eni_age": 1.0},
        security_groups=section,
        cooldown=0.0,
        tag=tag,
    )
    node.start(timeout=60)
    return node


def _until(what: str, check: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _set_row(node: Node, group: str) -> dict[str, Any] | None:
    rows = {r["set"]: r for r in node.call("agent.sets")["rows"]}
    return rows.get(group)


def _set_free(node: Node, group: str) -> int:
    row = _set_row(node, group)
    return int(row["free"]) if row and not row["waiting"] else 0


def _shared_free(node: Node) -> int:
    return int(node.call("agent.status")["pool"]["available"])


def warm_adds(node: Node, n: int, group: str | None) -> list[float]:
    """ADD latencies of ``n`` pods, each started once its set (or the shared pool) has a free
    address: the warm case (the waits are not timed)."""
    out = []
    for _ in range(n):
        if group is None:
            _until("shared pool warm", lambda: _shared_free(node) > 0)
        elif _set_row(node, group) is not None:  # a set no pod asked for yet has no ENI
            _until("set warm", lambda: _set_free(node, group) > 0)
        out.append(timed_add(node, group, "w"))
    return out


def ec2_calls_by_action(node: Node) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in node.ctl("metrics").stdout.splitlines():
        if line.startswith("podwire_ec2_requests_total{"):
            action = line.split('action="')[1].split('"')[0]
            out[action] = out.get(action, 0.0) + float(line.split()[-1])
    return out


def burst(node: Node, groups: list[str], per_group: int) -> float:
    pods = [(node.new_pod("bu"), g) for g in groups for _ in range(per_group)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(pods)) as ex:
        done = list(ex.map(lambda pg: add_retrying(node, pg[0], pg[1]), pods))
    elapsed = time.perf_counter() - start
    assert all(r.code == 0 for r in done), [r for r in done if r.code]
    return elapsed


def eni_mode(vpc: Vpc, subnet: Any, ec2: Any, app: str, results: dict[str, Any]) -> None:
    """The eni-mode figures (4-6 of the module docstring) into ``results``."""
    sets = [app] + [
        ec2.create_security_group(GroupName=n, Description=n, VpcId=vpc.vpc_id)["GroupId"]
        for n in ("web", "batch")
    ]
    # 4. ADD latency with a warm set, and an ordinary pod's on the same node
    node = eni_node(vpc, "m5.4xlarge", subnet, "elat")
    try:
        warm_adds(node, 2, app), warm_adds(node, 2, None)  # the set exists, both paths warm
        results["eni_add_ms_sg_warm"] = summary(warm_adds(node, 30, app))
        results["eni_add_ms_ordinary"] = summary(warm_adds(node, 30, None))
    finally:
        node.close()

    # 5. EC2 calls per SG pod over a churn 0 -> 50 -> 0 with three sets
    node = eni_node(vpc, "m5.4xlarge", subnet, "echurn")  # 8 ENIs x 29 addresses
    try:
        before = ec2_calls_by_action(node)
        pods = [(node.new_pod("ech"), sets[i % 3]) for i in range(50)]
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            assert all(r.code == 0 for r in ex.map(lambda pg: add_retrying(node, *pg), pods))
            assert all(
                r.code == 0
                for r in ex.map(lambda pg: node.delete(pg[0], conf=conf(node, None)), pods)
            )
        _until("sets gone", lambda: not node.call("agent.sets")["rows"], timeout=180)
        after = ec2_calls_by_action(node)
        by_action = {k: after[k] - before.get(k, 0.0) for k in after if after[k] > before.get(k, 0)}
        results["eni_churn_ec2_calls_by_action"] = by_action
        results["eni_churn_ec2_calls"] = sum(by_action.values())
        results["eni_churn_ec2_calls_per_sg_pod"] = sum(by_action.values()) / 50
    finally:
        node.close()

    # 6. 18 SG pods in three sets at once on an m5.xlarge, +100 ms per EC2 call: eni, branch
    for action in ACTIONS:
        vpc.faults.latency(action, 0.1)
    try:
        for mode in ("eni", "branch"):
            if mode == "eni":  # the primary + three sets: every slot (shared_reserve 0)
                node = eni_node(vpc, "m5.xlarge", subnet, "eburst", shared_reserve=0)
            else:
                node = sg_node(vpc, "m5.xlarge", subnet, "bburst", cooldown=1.0)
            try:
                results[f"burst_18_three_groups_s_at_100ms_{mode}"] = burst(node, sets, 6)
            finally:
                node.close()
    finally:
        vpc.faults.clear()


def print_eni_mode(results: dict[str, Any]) -> None:
    e, o, b = results["eni_add_ms_sg_warm"], results["eni_add_ms_ordinary"], results["add_ms_sg"]
    print(f"\n{'eni mode':<38}{'SG, warm set':>13}{'branch SG':>11}{'ordinary':>10}")
    for k in ("min", "p50", "p95", "max"):
        print(f"{'ADD ' + k + ' (ms)':<38}{e[k]:>13.1f}{b[k]:>11.1f}{o[k]:>10.1f}")
    calls = results["eni_churn_ec2_calls_by_action"]
    print(
        f"{'EC2 calls per SG pod, 0->50->0, 3 sets':<38}"
        f"{results['eni_churn_ec2_calls_per_sg_pod']:>8.2f}   ({results['eni_churn_ec2_calls']:.0f}"
        f" calls: {', '.join(f'{k} {v:.0f}' for k, v in sorted(calls.items()))})"
    )
    for mode in ("eni", "branch"):
        key = f"burst_18_three_groups_s_at_100ms_{mode}"
        print(f"{f'18 SG pods, 3 groups, +100 ms/call, {mode}':<38}{results[key]:>7.2f}s")


if __name__ == "__main__":
    raise SystemExit(main())
