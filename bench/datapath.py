"""Datapath benchmark: pod-to-pod TCP and UDP bandwidth, as in the seeds' CNI benchmark.

    make bench-datapath        # or: .venv/bin/python -m bench.datapath [--seconds 5] [--rounds 3]

Four datapaths, each between two pods on one node and between pods on two emulated nodes
across the VPC router (``cloud.emulator``, static pod CIDRs routed to each node):

- ``veth``: the ceiling. On one node, two namespaces joined by a bare veth pair; across nodes,
  node to node over their primary ENIs and the router (no pod hop at all);
- ``podwire``: the agent's routed veth (the real agent and plugin, static provider);
- ``ptp``: Debian's ptp + host-local;
- ``bridge``: Debian's bridge + host-local on a ``cbr0`` bridge with the gateway on it, as
  GKE's routes-based nodes wire pods.

Each is measured with iperf3 (Debian's): TCP and UDP (unlimited rate), 1 and 8 streams, for
``--seconds`` each, receiver-side throughput; the table gives the ratio to the ceiling of the
same placement. The four are set up side by side and measured in turns, ``--rounds`` times
(each figure is the median), so load elsewhere on the machine lands on all of them alike.
Then the agent's idle CPU and RSS over ``--idle`` seconds with 100 pods. All
MTUs are 1500. Prints the tables and writes bench/results/datapath.json. Needs root; works only
inside namespaces it makes. Throughput on this 2-core machine is CPU-bound and moves with
whatever else runs: compare ratios within one run, on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from cloud.emulator import Vpc
from cloud.emulator.api import Node as VpcNode
from tests.harness import REFERENCE_PLUGINS, Node
from tests.netns import Netns, netns, unique_name, veth_between

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("veth", "podwire", "ptp", "bridge")
MODES = (("tcp", 1), ("tcp", 8), ("udp", 1), ("udp", 8))
PORT = 5201


class Endpoints:
    """Where one measurement runs: the server's namespace and address, the client's namespace,
    for one node and across two nodes."""

    def __init__(self) -> None:
        self.same: tuple[Netns, Netns, str] | None = None
        self.cross: tuple[Netns, Netns, str] | None = None


def iperf(client: Netns, server: Netns, ip: str, proto: str, streams: int, seconds: float) -> float:
    """Receiver-side throughput in Gbit/s of one iperf3 run from ``client`` to ``ip``."""
    srv = server.popen(
        ["iperf3", "-s", "-1", "-p", str(PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while f":{PORT} " not in server.run("ss", "-Hltn").stdout:
            if srv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"iperf3 server did not listen: {srv.stderr}")
            time.sleep(0.02)
        argv = ["iperf3", "-c", ip, "-p", str(PORT), "-t", str(seconds), "-P", str(streams), "-J"]
        if proto == "udp":
            argv += ["-u", "-b", "0"]
        out = client.run(*argv, check=False, timeout=seconds + 30)
        doc = json.loads(out.stdout)
        if "error" in doc or out.returncode != 0:
            raise RuntimeError(f"iperf3 {proto}x{streams} to {ip}: {doc.get('error')}")
        end = doc["end"]
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.wait(10)
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    if proto == "tcp":
        return float(end["sum_received"]["bits_per_second"]) / 1e9
    total = end["sum"]
    return float(total["bits_per_second"]) * (1 - float(total["lost_percent"]) / 100) / 1e9


# -- the four datapaths --------------------------------------------------------------------


@contextlib.contextmanager
def bare_veth(vpc: Vpc, a: VpcNode, b: VpcNode) -> Iterator[Endpoints]:
    ends = Endpoints()
    with netns("bv1") as p1, netns("bv2") as p2:
        veth_between(p1, "eth0", p2, "eth0")
        p1.run("ip", "addr", "add", "10.99.0.1/30", "dev", "eth0")
        p2.run("ip", "addr", "add", "10.99.0.2/30", "dev", "eth0")
        ends.same = (p1, p2, "10.99.0.2")
        ends.cross = (Netns(a.netns, create=False), Netns(b.netns, create=False), b.primary_ip)
        yield ends


@contextlib.contextmanager
def podwire(vpc: Vpc, a: VpcNode, b: VpcNode) -> Iterator[Endpoints]:
    nodes = [
        Node(netns=n.netns, primary_ip=n.primary_ip, cidrs=(str(n.pod_cidr),), tag="dp")
        for n in (a, b)
    ]
    try:
        for n in nodes:
            n.start()
        pods = [nodes[0].new_pod("dp"), nodes[0].new_pod("dp"), nodes[1].new_pod("dp")]
        ips = []
        for node, pod in zip((nodes[0], nodes[0], nodes[1]), pods, strict=True):
            res = node.add(pod)
            if res.code != 0:
                raise RuntimeError(f"podwire ADD failed: {res}")
            ips.append(res.ip)
        ends = Endpoints()
        ends.same = (pods[0], pods[1], ips[1])
        ends.cross = (pods[0], pods[2], ips[2])
        yield ends
    finally:
        for n in nodes:
            n.close()


class ReferencePlugin:
    """Debian's ptp or bridge with host-local, executed on a node as a runtime would."""

    def __init__(self, node: VpcNode, kind: str, state: Path) -> None:
        self.node = Netns(node.netns, create=False)
        self.node.sysctl("net.ipv4.ip_forward", "1")
        cidr = IPv4Network(str(node.pod_cidr))
        ipam = {
            "type": "host-local",
            "subnet": str(cidr),
            "dataDir": str(state),
            "routes": [{"dst": "0.0.0.0/0"}],
        }
        conf: dict[str, Any] = {"cniVersion": "1.0.0", "name": f"dp-{kind}", "type": kind}
        if kind == "bridge":
            conf |= {"bridge": "cbr0", "isGateway": True, "ipMasq": False, "mtu": 1500}
        else:
            conf |= {"ipMasq": False, "mtu": 1500}
        self.conf = json.dumps({**conf, "ipam": ipam}).encode()
        self.kind = kind
        self.pods: list[Netns] = []

    def _run(self, command: str, pod: Netns) -> subprocess.CompletedProcess[bytes]:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.name,
            "CNI_NETNS": pod.path,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(REFERENCE_PLUGINS),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        return subprocess.run(
            ["nsenter", f"--net={self.node.path}", "--", str(REFERENCE_PLUGINS / self.kind)],
            env=env,
            input=self.conf,
            capture_output=True,
            check=False,
        )

    def add(self) -> tuple[Netns, str]:
        pod = Netns(unique_name("dp"))
        self.pods.append(pod)
        proc = self._run("ADD", pod)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.kind} ADD failed: {proc.stdout!r} {proc.stderr!r}")
        return pod, str(json.loads(proc.stdout)["ips"][0]["address"]).split("/")[0]

    def close(self) -> None:
        for pod in self.pods:
            self._run("DEL", pod)
            pod.close()


@contextlib.contextmanager
def reference(kind: str, a: VpcNode, b: VpcNode, state: Path) -> Iterator[Endpoints]:
    plugins = [ReferencePlugin(n, kind, state / n.instance_id) for n in (a, b)]
    try:
        (p1, _), (p2, ip2), (p3, ip3) = plugins[0].add(), plugins[0].add(), plugins[1].add()
        ends = Endpoints()
        ends.same = (p1, p2, ip2)
        ends.cross = (p1, p3, ip3)
        yield ends
    finally:
        for p in plugins:
            p.close()


# -- idle agent ----------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agent_pid(node: Node) -> int:
    """The agent's own pid (``ip netns exec`` execs it, so the Popen pid is the agent's)."""
    assert node.proc is not None
    return node.proc.pid


def idle_agent(pods: int, seconds: float) -> dict[str, float]:
    node = Node(cidrs=("10.78.0.0/22",), tag="idle")
    try:
        node.start()
        for _ in range(pods):
            res = node.add(node.new_pod("idle"))
            if res.code != 0:
                raise RuntimeError(f"ADD failed: {res}")
        pid = agent_pid(node)
        time.sleep(5)  # let the ADD burst's work (GC, SNAT deltas) settle
        cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = proc_cpu_seconds(pid), time.monotonic()
        return {
            "pods": pods,
            "seconds": round(t1 - t0, 1),
            "cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 3),
            "rss_mib": round(proc_rss_mib(pid), 1),
        }
    finally:
        node.close()


# -- the run -------------------------------------------------------------------------------


def run(seconds: float, idle_seconds: float, rounds: int) -> dict[str, Any]:
    """All four datapaths set up side by side, then measured in turns: per round, each
    (placement, mode) once for every kind in a row, so a burst of load elsewhere on the machine
    lands on all of them alike; each figure is the median over ``rounds``."""
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    with Vpc.start("10.0.0.0/16") as vpc, contextlib.ExitStack() as stack:
        subnet = vpc.add_subnet("10.0.1.0/24", "us-east-1a")
        state = Path(os.environ.get("TMPDIR", "/tmp")) / unique_name("dp-ipam")
        stack.callback(shutil.rmtree, state, ignore_errors=True)
        setups: dict[str, Endpoints] = {}
        for i, kind in enumerate(KINDS):
            a = vpc.add_node("m5.large", subnet, pod_cidr=f"10.{100 + i}.1.0/24")
            b = vpc.add_node("m5.large", subnet, pod_cidr=f"10.{100 + i}.2.0/24")
            stack.callback(vpc.remove_node, b)
            stack.callback(vpc.remove_node, a)
            if kind == "veth":
                setup = bare_veth(vpc, a, b)
            elif kind == "podwire":
                setup = podwire(vpc, a, b)
            else:
                setup = reference(kind, a, b, state)
            setups[kind] = stack.enter_context(setup)
        for r in range(rounds):
            for placement in ("same-node", "cross-node"):
                for proto, streams in MODES:
                    for kind, ends in setups.items():
                        where = ends.same if placement == "same-node" else ends.cross
                        assert where is not None
                        client, server, ip = where
                        gbps = iperf(client, server, ip, proto, streams, seconds)
                        key = f"{proto}x{streams}"
                        samples.setdefault(kind, {}).setdefault(placement, {}).setdefault(
                            key, []
                        ).append(gbps)
            print(f"  round {r + 1}/{rounds} done", flush=True)
    results: dict[str, Any] = {
        "kinds": {
            kind: {
                placement: {key: round(statistics.median(v), 3) for key, v in modes.items()}
                for placement, modes in by_placement.items()
            }
            for kind, by_placement in samples.items()
        },
        "samples": samples,
        "rounds": rounds,
    }
    if idle_seconds > 0:
        results["idle_agent"] = idle_agent(100, idle_seconds)
    return results


def table(results: dict[str, Any]) -> str:
    kinds = results["kinds"]
    lines = []
    for placement in ("same-node", "cross-node"):
        ceiling = kinds["veth"][placement]
        lines.append(f"\n{placement} (Gbit/s, ratio to the bare veth ceiling)")
        header = f"{'datapath':<9}" + "".join(f"{f'{p}x{n}':>13}   " for p, n in MODES)
        lines.append(header)
        for kind in KINDS:
            row = f"{kind:<9}"
            for proto, streams in MODES:
                key = f"{proto}x{streams}"
                gbps = kinds[kind][placement][key]
                ratio = gbps / ceiling[key] if ceiling[key] else float("nan")
                row += f"{gbps:>7.2f} {ratio:>5.2f}x  "
            lines.append(row)
    idle = results.get("idle_agent")
    if idle:
        lines.append(
            f"\nagent idle with {idle['pods']} pods over {idle['seconds']} s: "
            f"CPU {idle['cpu_percent']} % of one core, RSS {idle['rss_mib']} MiB"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    ap.add_argument("--idle", type=float, default=60.0, help="idle agent window (0: skip)")
    ap.add_argument("--rounds", type=int, default=3, help="turns over every datapath (median)")
    args = ap.parse_args()
    if shutil.which("iperf3") is None:
        raise SystemExit("iperf3 is missing: apt-get install iperf3 (make deps does it)")
    print(f"datapath benchmark on {platform.node()}, {os.cpu_count()} CPUs", flush=True)
    results = run(args.seconds, args.idle, args.rounds)
    results["seconds_per_run"] = args.seconds
    results["load_average"] = os.getloadavg()
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "datapath.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
