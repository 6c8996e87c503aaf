"""Branch links compared on the emulated VPC: SG-pod ADD latency and TCP throughput pod -> VM.

    .venv/bin/python -m bench.branch_link [--kinds vlan,macvlan] [--adds 20] [--runs 3]

For each kind of branch link -- ``vlan`` (802.1Q; on a kernel without VLAN devices the agent
makes it a veth tagged by eBPF, ``netlink.dot1q``, and the VPC carries EC2's tagged frames),
``macvlan`` (untagged frames told apart by MAC: ``Vpc.start(branch_frames="mac")``) -- a VPC,
an m5.4xlarge node running the agent with [security_groups] enabled, and a VM whose group
admits the pods' group:

1. ADD of an SG pod (plugin exec'd as a runtime does; each makes and associates a branch ENI
   through EC2) with the trunk warm: p50/p95 over ``--adds`` pods, and the mean of the ADD's
   ``wire`` phase (the datapath alone, from the agent's podwire_cni_phase_seconds).
2. TCP throughput (iperf3, 1 stream) from an SG pod (through its branch link and the trunk)
   and from an ordinary pod (through its ENI) to the VM, ``--runs`` runs per kind, kinds
   interleaved.

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
from tests.harness import Node
from tests.netns import Netns

RESULTS = Path(__file__).resolve().parent / "results"
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


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
    def __init__(self, kind: str, region: str) -> None:
        self.kind = kind
        frames = "mac" if kind == "macvlan" else "802.1q"
        # one region each: the emulators of one process share moto's backends by region
        self.vpc = Vpc.start("10.0.0.0/16", region=region, branch_frames=frames)  # type: ignore[arg-type]
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
        settings = {
            "imds_url": vnode.imds_url,
            "ec2_endpoint": vnode.ec2_url,
            "region": vpc.region,
            "refill_interval": 1.0,
        }
        self.node = Node(
            netns=vnode.netns,
            primary_ip=vnode.primary_ip,
            aws=settings,
            env=CREDS,
            cooldown=0.0,
            tag=f"bl{self.kind[:3]}",
            extra_config=(
                f'[security_groups]\nenabled = true\nbranch_link = "{self.kind}"\n'
                "branch_cooldown = 1.0\nbranch_wait = 20.0\n"
            ),
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
    parser.add_argument("--kinds", default="vlan,macvlan")
    parser.add_argument("--adds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    regions = ("us-east-1", "us-west-2", "eu-west-1")
    beds: dict[str, Bed] = {}
    results: dict[str, Any] = {}
    try:
        for kind, region in zip(kinds, regions, strict=False):
            beds[kind] = Bed(kind, region)
        sg_pods: dict[str, Netns] = {}
        plain_pods: dict[str, Netns] = {}
        for kind, bed in beds.items():
            bed.add(bed.app), bed.add(None)  # warm both paths
            s0, n0 = wire_phase(bed.node)
            took = [bed.add(bed.app)[1] for _ in range(args.adds)]
            s1, n1 = wire_phase(bed.node)
            sg_pods[kind], _ = bed.add(bed.app)
            plain_pods[kind], _ = bed.add(None)
            results[kind] = {
                "link": bed.resolved,
                "add_ms_p50": statistics.median(took),
                "add_ms_p95": pct(took, 0.95),
                "wire_ms_mean": (s1 - s0) / (n1 - n0) * 1000,
            }
        runs: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.runs):
            for kind, bed in beds.items():
                server = Netns(bed.vm.netns, create=False)
                for label, pod in (("sg", sg_pods[kind]), ("plain", plain_pods[kind])):
                    gbps = iperf(pod, server, bed.vm.primary_ip, "tcp", 1, args.seconds)
                    runs[f"{kind}/{label}"].append(gbps)
        for key, values in runs.items():
            kind, label = key.split("/")
            results[kind][f"tcp_gbps_{label}_median"] = statistics.median(values)
            results[kind][f"tcp_gbps_{label}_runs"] = values
    finally:
        for bed in beds.values():
            bed.close()

    print(f"{'':<44}" + "".join(f"{k + ' (' + results[k]['link'] + ')':>20}" for k in kinds))
    for label, key, fmt in (
        ("SG-pod ADD p50 (ms), trunk warm", "add_ms_p50", ".1f"),
        ("SG-pod ADD p95 (ms)", "add_ms_p95", ".1f"),
        ("  of which wire phase, mean (ms)", "wire_ms_mean", ".1f"),
        ("TCP SG pod -> VM, median (Gbit/s)", "tcp_gbps_sg_median", ".2f"),
        ("TCP ordinary pod -> VM, median (Gbit/s)", "tcp_gbps_plain_median", ".2f"),
    ):
        print(f"{label:<44}" + "".join(f"{results[k][key]:>20{fmt}}" for k in kinds))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "branch_link.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
