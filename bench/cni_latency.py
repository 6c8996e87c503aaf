"""CNI latency: podwire against Debian's ptp + host-local, invoked the same way, in one run.

    make bench            # or: .venv/bin/python -m bench.cni_latency [--pods 100] [--rounds 3]

Every plugin is executed as a runtime on the node would (CNI_* env, config on stdin, inside
the node's namespace via nsenter). Two podwire agents run, each on a node of its own: one with
its state directory on the ext4 ``/run`` of this machine, one on a tmpfs (what ``/run`` is on
a systemd host), mounted in the agent's private mount namespace. The machine is shared and its
load moves absolute times 2x, so the plugins take turns: each sequential ADD (then DEL) of the
one is followed by the same call of the others, and the parallel bursts alternate plugin by
plugin, over several rounds; the ratios compare figures taken under the same load. Sequential
figures pool every round's calls; burst wall times are the median over rounds.

A fourth "plugin" takes its turns too: the plugin's own interpreter (its shebang line) running
a script that exits at once. Nothing is faster than that with a Python plugin, so its column,
and its ratio to ptp + host-local, is the floor any target must be read against.

Also the agent's CPU time per ADD and per DEL (utime + stime over the sequential calls), its
RSS with 250 pods, and the machine's load average. Writes bench/results/cni_latency.json.
Needs root; touches only namespaces it makes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rpc.errors import RpcError
from tests.harness import Node
from tests.netns import Netns, unique_name

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (8, 32)


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
    """How to run one CNI plugin on a node: its binary, config and CNI_PATH."""

    def __init__(
        self, name: str, node: Netns, binary: Path, conf: dict[str, Any], cni_path: str
    ) -> None:
        self.name = name
        self.node = node
        self.binary = binary
        self.conf = json.dumps(conf).encode()
        self.cni_path = cni_path
        self.agent_pid: int | None = None
        self.node_obj: Node | None = None  # podwire's: where its traces are read
        self.stamps: dict[tuple[str, str], tuple[int, int]] = {}  # exec and exit, per call

    def run(self, command: str, pod: Netns) -> float:
        """Run one call; return its wall time in ms. Raises RuntimeError when it fails."""
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.name,
            "CNI_NETNS": pod.path,
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": "",
            "CNI_PATH": self.cni_path,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        start = time.monotonic_ns()
        proc = subprocess.run(
            ["nsenter", f"--net={self.node.path}", "--", str(self.binary)],
            env=env,
            input=self.conf,
            capture_output=True,
        )
        end = time.monotonic_ns()
        self.stamps[(command, pod.name)] = (start, end)
        elapsed = (end - start) / 1e6
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name} {command} failed: {proc.stdout!r} {proc.stderr!r}")
        return elapsed

    def burst(self, command: str, pods: list[Netns], width: int) -> float:
        """Run ``command`` for every pod, ``width`` at a time; return the wall time in ms."""
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(width) as ex:
            list(ex.map(lambda p: self.run(command, p), pods))
        return (time.perf_counter() - start) * 1000


# The phases of a trace (agent/trace.py), with the runtime's own two around them.
PHASES = {
    "ADD": ("exec", "connect", "send", "validate", "ipam", "checkpoint", "wire", "reply", "exit"),
    "DEL": ("exec", "connect", "send", "validate", "delete", "checkpoint", "reply", "exit"),
}


def phase_times(plugin: Plugin, command: str, since: int) -> dict[str, list[float]]:
    """Per phase, the ms of every sequential ``command`` of ``plugin`` since ``since`` (ns):
    the agent's trace of the call between the runtime's exec and exit stamps."""
    assert plugin.node_obj is not None
    out: dict[str, list[float]] = {name: [] for name in PHASES[command]}
    out["total"] = []
    try:
        traces = plugin.node_obj.call("agent.traces", {"since": since})
    except RpcError:  # an agent from before the phase trace (--agent-pythonpath)
        traces = []
    for trace in traces:
        if trace["command"] != command or trace["code"] != 0:
            continue
        cid = trace["key"].split("/")[1]
        stamps = plugin.stamps.get((command, cid))
        marks = trace["marks"]
        if stamps is None or marks[0][0] != "start" or len(marks) < 3:
            continue
        points = [("exec", marks[0][1])] + [(n, t) for n, t in marks[1:]] + [("exit", stamps[1])]
        prev = stamps[0]
        for name, t in points:
            if name in out:
                out[name].append((t - prev) / 1e6)
            prev = t
        out["total"].append((stamps[1] - stamps[0]) / 1e6)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid``, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Pods:
    """Fresh pod namespaces, all removed at the end."""

    def __init__(self) -> None:
        self.made: list[Netns] = []
        self._count = itertools.count()

    def fresh(self, n: int) -> list[Netns]:
        # A run makes thousands of names: 6 random hex digits alone collided with a live one
        # (ip netns add: File exists), hence the counter. Each is recorded as it is made, so a
        # failure half way through a batch leaves none behind.
        batch: list[Netns] = []
        for _ in range(n):
            batch.append(Netns(f"{unique_name('bp')}{next(self._count):x}"))
            self.made.append(batch[-1])
        return batch

    def close(self) -> None:
        for ns in self.made:
            ns.close()
        self.made = []


def measure(plugins: list[Plugin], pods: int, rounds: int) -> dict[str, Any]:
    """Every figure for every plugin, taking turns (see the module docstring)."""
    seq: dict[str, dict[str, list[float]]] = {p.name: {"ADD": [], "DEL": []} for p in plugins}
    cpu: dict[str, dict[str, float]] = {p.name: {"ADD": 0.0, "DEL": 0.0} for p in plugins}
    walls: dict[str, dict[str, list[float]]] = {p.name: {} for p in plugins}
    phases: dict[str, dict[str, dict[str, list[float]]]] = {
        p.name: {c: {} for c in PHASES} for p in plugins if p.node_obj is not None
    }
    store = Pods()
    try:
        for _ in range(rounds):
            batches = {p.name: store.fresh(pods) for p in plugins}
            for command in ("ADD", "DEL"):
                since = time.monotonic_ns()
                for i in range(pods):
                    for p in plugins:
                        before = cpu_seconds(p.agent_pid) if p.agent_pid else 0.0
                        seq[p.name][command].append(p.run(command, batches[p.name][i]))
                        if p.agent_pid:
                            cpu[p.name][command] += cpu_seconds(p.agent_pid) - before
                for p in plugins:
                    if p.node_obj is not None:
                        for name, ms in phase_times(p, command, since).items():
                            phases[p.name][command].setdefault(name, []).extend(ms)
            store.close()
            for width in WIDTHS:
                batches = {p.name: store.fresh(pods) for p in plugins}
                for command in ("ADD", "DEL"):
                    for p in plugins:
                        key = f"{command.lower()}_{width}"
                        wall = p.burst(command, batches[p.name], width)
                        walls[p.name].setdefault(key, []).append(wall)
                store.close()
    finally:
        store.close()
    calls = pods * rounds
    return {
        p.name: {
            "add_ms": summary(seq[p.name]["ADD"]),
            "del_ms": summary(seq[p.name]["DEL"]),
            **{k: statistics.median(v) for k, v in walls[p.name].items()},
            "walls_ms": walls[p.name],
            "cpu_ms_per_add": cpu[p.name]["ADD"] * 1000 / calls if p.agent_pid else None,
            "cpu_ms_per_del": cpu[p.name]["DEL"] * 1000 / calls if p.agent_pid else None,
            "phases_ms": {
                command: {name: summary(ms) for name, ms in by_phase.items() if ms}
                for command, by_phase in phases.get(p.name, {}).items()
            },
        }
        for p in plugins
    }


def rss_at(node: Node, plugin: Plugin, pods: int) -> int:
    store = Pods()
    try:
        batch = store.fresh(pods)
        plugin.burst("ADD", batch, 8)
        assert node.proc is not None
        rss = agent_rss_kib(node.proc.pid)
        plugin.burst("DEL", batch, 8)
        return rss
    finally:
        store.close()


def active_connections(node: Node) -> int:
    for line in node.call("agent.metrics").splitlines():
        if line.startswith("podwire_rpc_connections_active "):
            return int(float(line.split()[1])) - 1  # not counting this call's own
    raise RuntimeError("no podwire_rpc_connections_active")


def idle_connections(node: Node, plugin: Plugin, count: int, pods: int) -> dict[str, float]:
    """ADD p50 with ``count`` idle connections held open on the agent's socket, against none,
    in alternating sets of 5 ADDs (issue 15 item 5: a local client must not slow the plugin).
    """
    plain: list[float] = []
    loaded: list[float] = []
    store = Pods()
    try:
        batch = store.fresh(pods)
        for start in range(0, pods, 10):
            for sample, hold, part in (
                (plain, 0, batch[start : start + 5]),
                (loaded, count, batch[start + 5 : start + 10]),
            ):
                held = []
                try:
                    for _ in range(hold):
                        s = socket.socket(socket.AF_UNIX)
                        s.connect(node.socket)
                        held.append(s)
                    while hold and active_connections(node) < hold:  # all accepted: idle
                        time.sleep(0.05)
                    sample += [plugin.run("ADD", p) for p in part]
                finally:
                    for s in held:
                        s.close()
        plugin.burst("DEL", batch, 8)
    finally:
        store.close()
    return {
        "connections": count,
        "add_p50_ms": statistics.median(loaded),
        "add_p50_ms_without": statistics.median(plain),
    }


def busy_fraction(sample: Callable[[], list[int]], before: list[int]) -> float:
    after = sample()
    delta = [a - b for a, b in zip(after, before, strict=True)]
    idle = delta[3] + delta[4]
    return 1 - idle / max(1, sum(delta))


def cpu_sample() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def table(results: dict[str, Any], pods: int) -> str:
    tmp, ext, ref, floor = (
        results[k] for k in ("podwire-tmpfs", "podwire-ext4", "reference", "floor")
    )
    head = (
        f"{'':<30}{'tmpfs':>9}{'ext4':>9}{'ptp+h-l':>9}{'floor':>9}"
        f"{'ratio':>8}{'(ext4)':>8}{'floor':>8}   target"
    )
    lines = [head]

    def row(name: str, a: float, b: float, r: float, f: float, target: str = "") -> None:
        lines.append(
            f"{name:<30}{a:>9.1f}{b:>9.1f}{r:>9.1f}{f:>9.1f}"
            f"{a / r:>7.2f}x{b / r:>7.2f}x{f / r:>7.2f}x   {target}"
        )

    targets = {("add", "p50"): "<= 0.9x", ("add", "p95"): "<= 1.0x", ("del", "p50"): "<= 1.0x"}
    for verb in ("add", "del"):
        for k in ("min", "p50", "p95", "max"):
            key = f"{verb}_ms"
            row(
                f"{verb.upper()} {k} (ms)",
                tmp[key][k],
                ext[key][k],
                ref[key][k],
                floor[key][k],
                targets.get((verb, k), ""),
            )
    for verb in ("add", "del"):
        for w in WIDTHS:
            key = f"{verb}_{w}"
            target = "<= 0.8x" if verb == "add" else ("<= 0.5x" if w == 32 else "")
            name = f"{pods} {verb.upper()}s, {w} parallel (ms)"
            row(name, tmp[key], ext[key], ref[key], floor[key], target)
    for verb in ("add", "del"):
        key = f"cpu_ms_per_{verb}"
        name = f"agent CPU per {verb.upper()} (ms)"
        lines.append(f"{name:<30}{tmp[key]:>9.2f}{ext[key]:>9.2f}")
    rss = f"agent RSS at {results['rss_pods']} pods (MiB)"
    lines.append(f"{rss:<30}{results['agent_rss_mib']:>9.1f}{'':>26}   <= 60 MiB")
    idle = results["idle_connections"]
    lines.append(
        f"ADD p50 (tmpfs agent) with {idle['connections']} idle connections open: "
        f"{idle['add_p50_ms']:.1f} ms, without: {idle['add_p50_ms_without']:.1f} ms "
        f"({idle['add_p50_ms'] / idle['add_p50_ms_without']:.2f}x)"
    )
    return "\n".join(lines)


def phase_table(results: dict[str, Any]) -> str:
    """p50/p95 per phase of the sequential calls, both agents."""
    lines = [f"{'phase (ms)':<22}{'tmpfs p50':>10}{'p95':>8}{'ext4 p50':>10}{'p95':>8}"]
    for command, names in PHASES.items():
        for name in (*names, "total"):
            cells = []
            for agent in ("podwire-tmpfs", "podwire-ext4"):
                s = results[agent]["phases_ms"].get(command, {}).get(name)
                cells.append(f"{s['p50']:>10.2f}{s['p95']:>8.2f}" if s else f"{'-':>10}{'-':>8}")
            lines.append(f"{command + ' ' + name:<22}{cells[0]}{cells[1]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rss-pods", type=int, default=250)
    ap.add_argument(
        "--agent-pythonpath",
        default="",
        help="run the agents from another checkout (PYTHONPATH), e.g. to measure main",
    )
    args = ap.parse_args(argv)
    env = {"PYTHONPATH": args.agent_pythonpath} if args.agent_pythonpath else None

    nodes = {
        "podwire-tmpfs": Node(
            cidrs=("10.77.0.0/21",), cooldown=0.0, tag="bench", state_tmpfs=True, env=env
        ),
        "podwire-ext4": Node(cidrs=("10.77.0.0/21",), cooldown=0.0, tag="bench", env=env),
    }
    ref_dir = Path(tempfile.mkdtemp(prefix="podwire-ref-"))
    load_before, cpu_before, started = os.getloadavg(), cpu_sample(), time.time()
    try:
        plugins = []
        for name, node in nodes.items():
            node.start()
            p = Plugin(
                name, node.netns, node.bin_dir / "podwire", node.plugin_conf(), str(node.bin_dir)
            )
            assert node.proc is not None
            p.agent_pid = node.proc.pid
            p.node_obj = node
            plugins.append(p)
        ref_conf = {
            "cniVersion": "1.0.0",
            "name": "ref",
            "type": "ptp",
            "ipMasq": False,
            "mtu": 1500,
            "ipam": {"type": "host-local", "subnet": "10.88.0.0/21", "dataDir": str(ref_dir)},
        }
        plugins.append(
            Plugin(
                "reference",
                nodes["podwire-ext4"].netns,
                Path("/usr/lib/cni/ptp"),
                ref_conf,
                "/usr/lib/cni",
            )
        )
        # The floor: the plugin's interpreter (its shebang) running a script that exits at once.
        shebang = (nodes["podwire-tmpfs"].bin_dir / "podwire").read_bytes().split(b"\n", 1)[0]
        floor = ref_dir / "python-floor"
        floor.write_bytes(shebang + b"\nimport posix\nposix._exit(0)\n")
        floor.chmod(0o755)
        plugins.append(Plugin("floor", nodes["podwire-ext4"].netns, floor, ref_conf, ""))
        # warm every plugin (page cache, first-exec costs) before measuring
        measure(plugins, 5, 1)
        results: dict[str, Any] = {"pods": args.pods, "rounds": args.rounds, "cpus": os.cpu_count()}
        results.update(measure(plugins, args.pods, args.rounds))
        results["agent_rss_mib"] = rss_at(nodes["podwire-tmpfs"], plugins[0], args.rss_pods) / 1024
        results["rss_pods"] = args.rss_pods
        results["idle_connections"] = idle_connections(nodes["podwire-tmpfs"], plugins[0], 500, 100)
    finally:
        for node in nodes.values():
            node.close()
        shutil.rmtree(ref_dir, ignore_errors=True)
    results["load"] = {
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "machine_busy": busy_fraction(cpu_sample, cpu_before),
        "seconds": time.time() - started,
    }
    print(table(results, args.pods))
    print()
    print(phase_table(results))
    load = results["load"]
    print(
        f"\nstate dir: tmpfs (agent's own mount namespace) and ext4 (this machine's /run); "
        "ratios against ptp + host-local; floor: the plugin's interpreter exiting at once\n"
        f"load average {load['loadavg_before'][0]:.1f} -> "
        f"{load['loadavg_after'][0]:.1f}, machine {load['machine_busy']:.0%} busy over "
        f"{load['seconds']:.0f} s, {args.rounds} rounds of {args.pods} pods"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cni_latency.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {RESULTS / 'cni_latency.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
