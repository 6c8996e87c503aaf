"""Branch links on the emulated VPC: SG-pod ADD latency and TCP throughput pod -> VM, next to an
ordinary pod's on the same node.

    .venv/bin/python -m bench.branch_link [--adds 30] [--runs 5] [--seconds 5]

A VPC carrying EC2's 802.1Q frames on trunk cables, an m5.4xlarge node running the agent with
[security_groups] enabled (``branch_link = "vlan"``: a VLAN device, or on a kernel without them
a veth tagged by eBPF, ``netlink.dot1q``; the table says which) and a VM admitting the subnet:

1. ADD (plugin exec'd as a runtime does) of an SG pod -- each makes and associates a branch ENI
   through EC2, trunk warm -- and of an ordinary pod: p50/p95 over ``--adds`` pods each, and
   the mean of the ADD's ``wire`` phase (the datapath alone, from the agent's
   podwire_cni_phase_seconds).
2. TCP throughput (iperf3, 1 stream) to the VM from an SG pod (its branch link, the trunk) and
   from an ordinary pod (its ENI), ``--runs`` runs each, interleaved.

Prints a table and writes bench/results/branch_link.json. Needs root; touches only namespaces
it makes. The machine is shared: read the figures as ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import boto3

from bench.datapath import iperf
from cloud.emulator import Vpc
from tests.harness import Node, aws_node
from tests.netns import Netns

RESULTS = Path(__file__).resolve().parent / "results"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wire_phase(node: Node) -> tuple[float, float]:
    """(sum, count) of the ADD's ``wire`` phase so far."""
    total = count = 0.0
    for line in node.ctl("metrics").stdout.splitlines():
        if 'command="ADD"' in line and 'phase="wire"' in line:
            if line.startswith("podwire_cni_phase_seconds_sum"):
                total = float(line.split()[-1])
            elif line.startswith("podwire_cni_phase_seconds_count"):
                count = float(line.split()[-1])
    return total, count


class Bed:
    def __init__(self) -> None:
        self.vpc = Vpc.start("10.0.0.0/16")
        try:
            self._build()
        except BaseException:
            self.vpc.stop()
            raise

    def _build(self) -> None:
        vpc = self.vpc
        subnet = vpc.add_subnet("10.0.0.0/18")
        ec2 = boto3.client("ec2", **vpc.client_kwargs())
        self.app = ec2.create_security_group(GroupName="app", Description="app", VpcId=vpc.vpc_id)[
            "GroupId"
        ]
        vm_group = ec2.create_security_group(GroupName="vm", Description="vm", VpcId=vpc.vpc_id)[
            "GroupId"
        ]
        ec2.authorize_security_group_ingress(
            GroupId=vm_group,
            IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}],
        )
        self.vm = vpc.add_instance(subnet, security_groups=[vm_group])
        vnode = vpc.add_node("m5.4xlarge", subnet)
        section = {
            "enabled": True,
            "branch_link": "vlan",
            "branch_cooldown": 1.0,
            "branch_wait": 20.0,
        }
        self.node = aws_node(
            vpc,
            vnode,
            aws={"refill_interval": 1.0},
            security_groups=section,
            cooldown=0.0,
            tag="blink",
        )
        self.node.start(timeout=60)
        self.resolved = self.node.call("agent.status")["security_groups"]["link"]

    def conf(self, group: str | None) -> dict[str, Any]:
        if group is None:
            return self.node.plugin_conf()
        notes = {"podwire.io/security-groups": group}
        return self.node.plugin_conf(runtimeConfig={"io.kubernetes.cri.pod-annotations": notes})

    def add(self, group: str | None) -> tuple[Netns, float]:
        pod = self.node.new_pod("b")
        c = self.conf(group)
        start = time.perf_counter()
        r = self.node.add(pod, conf=c)
        took = (time.perf_counter() - start) * 1000
        assert r.code == 0, r
        return pod, took

    def close(self) -> None:
        self.node.close()
        self.vpc.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    bed = Bed()
    try:
        results["link"] = bed.resolved
        pods: dict[str, Netns] = {}
        for label, group in (("sg", bed.app), ("plain", None)):
            bed.add(group)  # warm the path
            s0, n0 = wire_phase(bed.node)
            took = [bed.add(group)[1] for _ in range(args.adds)]
            s1, n1 = wire_phase(bed.node)
            results[f"add_ms_p50_{label}"] = statistics.median(took)
            results[f"add_ms_p95_{label}"] = pct(took, 0.95)
            results[f"wire_ms_mean_{label}"] = (s1 - s0) / (n1 - n0) * 1000
            pods[label], _ = bed.add(group)
        runs: dict[str, list[float]] = defaultdict(list)
        server = Netns(bed.vm.netns, create=False)
        for _ in range(args.runs):
            for label, pod in pods.items():
                runs[label].append(iperf(pod, server, bed.vm.primary_ip, "tcp", 1, args.seconds))
        for label, values in runs.items():
            results[f"tcp_gbps_median_{label}"] = statistics.median(values)
            results[f"tcp_gbps_runs_{label}"] = values
    finally:
        bed.close()

    print(f"branch links: {results['link']}")
    print(f"{'':<40}{'SG pod':>12}{'ordinary':>12}")
    for label, key, fmt in (
        ("ADD p50 (ms), trunk warm", "add_ms_p50", ".1f"),
        ("ADD p95 (ms)", "add_ms_p95", ".1f"),
        ("  of which wire phase, mean (ms)", "wire_ms_mean", ".1f"),
        ("TCP pod -> VM, median (Gbit/s)", "tcp_gbps_median", ".2f"),
    ):
        print(f"{label:<40}{results[key + '_sg']:>12{fmt}}{results[key + '_plain']:>12{fmt}}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "branch_link.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
