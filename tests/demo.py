"""``make demo``: one node's pod networking, end to end, told step by step.

A network namespace plays the node; podwire-agent runs in it with the static provider; ten pod
namespaces are added through the installed ``podwire`` plugin exactly as a container runtime
calls it (CNI_* environment, config on stdin); agentctl shows the pods; real pings prove
pod<->pod and node<->pod; everything is deleted and removed. The machine's own namespace is
left untouched (only namespaces are created, and all of them are removed at the end).
"""

from __future__ import annotations

import os
import random
import sys
import time

from tests.harness import Node, ping

PODS = 10


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    started = time.monotonic()
    step("Creating a namespace that plays the node, installing the podwire plugin, starting the agent")
    node = Node(cidrs=("10.77.0.0/24",), tag="demo")
    try:
        node.start()
        print(f"node namespace {node.netns.name}, primary address {node.primary_ip}")
        print(f"plugin installed at {node.bin_dir / 'podwire'} (shebang: "
              f"{(node.bin_dir / 'podwire').read_text().splitlines()[0]})")
        print(node.ctl("status").stdout)

        step(f"Creating {PODS} pod namespaces and running CNI ADD for each through the plugin")
        pods = [node.new_pod("demopod") for _ in range(PODS)]
        ips: dict[str, str] = {}
        for i, pod in enumerate(pods):
            t = time.perf_counter()
            r = node.add(pod, args=f"K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-{i}")
            if r.code != 0:
                print(f"ADD failed: {r}", file=sys.stderr)
                return 1
            ips[pod.name] = r.ip
            print(f"  web-{i}: {r.ip}  ({(time.perf_counter() - t) * 1000:.1f} ms)")

        step("agentctl pods")
        print(node.ctl("pods").stdout)

        step("Pinging: every pod to another pod, the node to every pod, every pod to the node")
        names = list(ips)
        failures = 0
        for i, name in enumerate(names):
            pod = pods[i]
            other = names[(i + 1) % len(names)]
            checks = [
                (f"web-{i} -> web-{(i + 1) % PODS} ({ips[other]})", ping(pod, ips[other])),
                (f"node -> web-{i} ({ips[name]})", ping(node.netns, ips[name])),
                (f"web-{i} -> node ({node.primary_ip})", ping(pod, node.primary_ip)),
            ]
            for label, ok in checks:
                failures += not ok
                print(f"  {'ok  ' if ok else 'FAIL'} {label}")
        sample = random.Random(1).sample(pods, 2)
        route = sample[0].run("ip", "route").stdout.strip().replace("\n", "; ")
        print(f"  a pod's routes: {route}")

        step("Running CNI DEL for every pod")
        for pod in pods:
            r = node.delete(pod)
            if r.code != 0:
                print(f"DEL failed: {r}", file=sys.stderr)
                failures += 1
        print(node.ctl("status").stdout)
        if failures:
            print(f"\n{failures} check(s) failed", file=sys.stderr)
            return 1
    finally:
        step("Stopping the agent and removing every namespace the demo made")
        node.close()
    print(f"\ndone in {time.monotonic() - started:.1f} s; the machine's own namespace was not touched")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
