"""CNI latency: podwire against Debian's ptp + host-local, invoked the same way, in one run.

    make bench            # or: .venv/bin/python -m bench.cni_latency [--pods 100]

Both plugins are executed as a runtime on the node would (CNI_* env, config on stdin, inside
the node's namespace via nsenter), for sequential ADD then DEL of N pods, then N ADDs at 8 and
at 32 in parallel (wall time). Also the agent's RSS with 250 pods. Prints a table with the
ratios and writes bench/results/cni_latency.json. Needs root; touches only namespaces it makes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.harness import Node
from tests.netns import Netns, unique_name

RESULTS = Path(__file__).resolve().parent / "results"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "min": min(values),
        "p50": statistics.median(values),
        "p95": pct(values, 0.95),
        "max": max(values),
    }


class Plugin:
    """How to run one CNI plugin on the node: its binary, config and CNI_PATH."""

    def __init__(self, node: Netns, binary: Path, conf: dict[str, Any], cni_path: str) -> None:
        self.node = node
        self.binary = binary
        self.conf = json.dumps(conf).encode()
        self.cni_path = cni_path

    def run(self, command: str, pod: Netns) -> float:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.name,
            "CNI_NETNS": pod.path,
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": "",
            "CNI_PATH": self.cni_path,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        start = time.perf_counter()
        proc = subprocess.run(
            ["nsenter", f"--net={self.node.path}", "--", str(self.binary)],
            env=env,
            input=self.conf,
            capture_output=True,
        )
        elapsed = (time.perf_counter() - start) * 1000
        if proc.returncode != 0:
            raise RuntimeError(
                f"{self.binary.name} {command} failed: {proc.stdout!r} {proc.stderr!r}"
            )
        return elapsed


def measure(plugin: Plugin, pods: int, parallel: tuple[int, ...]) -> dict[str, Any]:
    made: list[Netns] = []

    def fresh(n: int) -> list[Netns]:
        batch = [Netns(unique_name("bp")) for _ in range(n)]
        made.extend(batch)
        return batch

    try:
        batch = fresh(pods)
        adds = [plugin.run("ADD", p) for p in batch]
        dels = [plugin.run("DEL", p) for p in batch]
        out: dict[str, Any] = {"add_ms": summary(adds), "del_ms": summary(dels)}
        for width in parallel:
            batch = fresh(pods)
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(width) as ex:
                list(ex.map(lambda p: plugin.run("ADD", p), batch))
            out[f"parallel_{width}_ms"] = (time.perf_counter() - start) * 1000
            with concurrent.futures.ThreadPoolExecutor(width) as ex:
                list(ex.map(lambda p: plugin.run("DEL", p), batch))
        return out
    finally:
        for ns in made:
            ns.close()


def agent_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def rss_at(node: Node, plugin: Plugin, pods: int) -> int:
    batch = [node.new_pod("rss") for _ in range(pods)]
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda p: plugin.run("ADD", p), batch))
    assert node.proc is not None
    rss = agent_rss_kib(node.proc.pid)
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda p: plugin.run("DEL", p), batch))
    return rss


def row(name: str, ours: float, ref: float, target: str) -> str:
    return f"{name:<28}{ours:>10.1f}{ref:>12.1f}{ours / ref:>9.2f}x   {target}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--rss-pods", type=int, default=250)
    args = ap.parse_args(argv)
    parallel = (8, 32)

    node = Node(cidrs=("10.77.0.0/21",), cooldown=0.0, tag="bench")
    ref_dir = Path(tempfile.mkdtemp(prefix="podwire-ref-"))
    try:
        node.start()
        ours = Plugin(node.netns, node.bin_dir / "podwire", node.plugin_conf(), str(node.bin_dir))
        ref_conf = {
            "cniVersion": "1.0.0",
            "name": "ref",
            "type": "ptp",
            "ipMasq": False,
            "mtu": 1500,
            "ipam": {"type": "host-local", "subnet": "10.88.0.0/21", "dataDir": str(ref_dir)},
        }
        ref = Plugin(node.netns, Path("/usr/lib/cni/ptp"), ref_conf, "/usr/lib/cni")
        # warm both (page cache, first-exec costs) before measuring
        for plugin in (ours, ref):
            measure(plugin, 5, ())
        results: dict[str, Any] = {"pods": args.pods, "cpus": os.cpu_count()}
        results["podwire"] = measure(ours, args.pods, parallel)
        results["reference"] = measure(ref, args.pods, parallel)
        results["agent_rss_mib"] = rss_at(node, ours, args.rss_pods) / 1024
        results["rss_pods"] = args.rss_pods
    finally:
        node.close()
        shutil.rmtree(ref_dir, ignore_errors=True)

    p, r = results["podwire"], results["reference"]
    lines = [
        f"{'':<28}{'podwire':>10}{'ptp+h-local':>12}{'ratio':>10}   target",
        *(
            row(
                f"ADD {k} (ms)",
                p["add_ms"][k],
                r["add_ms"][k],
                "<= 1.0x at p50" if k == "p50" else "",
            )
            for k in ("min", "p50", "p95", "max")
        ),
        *(
            row(
                f"DEL {k} (ms)",
                p["del_ms"][k],
                r["del_ms"][k],
                "<= 0.5x at p50" if k == "p50" else "",
            )
            for k in ("min", "p50", "p95", "max")
        ),
        *(
            row(
                f"{args.pods} ADDs, {w} parallel (ms)",
                p[f"parallel_{w}_ms"],
                r[f"parallel_{w}_ms"],
                "<= 0.8x",
            )
            for w in parallel
        ),
        f"{f'agent RSS at {args.rss_pods} pods':<28}{results['agent_rss_mib']:>9.1f} MiB"
        f"{'':>12}   <= 60 MiB",
    ]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cni_latency.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS / 'cni_latency.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
