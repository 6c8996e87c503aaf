"""SNAT reconcile cost for 1, 100 and 1000 pods: libnftables vs the nft binary vs iptables-restore.

    .venv/bin/python -m bench.snat_reconcile [--reps N]

Everything runs in a temporary network namespace entered by one worker thread (libnftables
binds to the namespace it was created in; the binaries inherit the thread's namespace, so no
nsenter in the timings). Per backend and pod count, medians of:

* full: render + apply the whole state (what a restart or a rule change costs);
* delta: one pod added and one removed (nft: two element changes in one transaction;
  iptables has no sets, so it re-applies everything, reading iptables-save first);
* verify: ``current_spec_matches`` (read the live state back and compare).

Prints a table and writes bench/results/snat.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeVar

import attrs

from agent.snat.backends import IptablesSnat, NftSnat, SnatBackend
from agent.snat.rules import SnatSpec
from netlink.iptables import IptablesRestore
from netlink.nftables import Nft
from netlink.ns import entered_path
from tests.netns import netns

T = TypeVar("T")
RESULTS = Path(__file__).parent / "results" / "snat.json"
POD_COUNTS = (1, 100, 1000)
BACKENDS = ("libnftables", "nft", "iptables-nft", "iptables-legacy")


def spec_for(pods: int, offset: int = 0) -> SnatSpec:
    # Every other address, so the /32s never collapse into wider prefixes.
    base = int(IPv4Address("10.0.16.1"))
    cidrs = tuple(f"{IPv4Address(base + 2 * (i + offset))}/32" for i in range(pods))
    return SnatSpec(
        pod_cidrs=cidrs,
        vpc_cidrs=("10.0.0.0/16",),
        excluded_cidrs=("192.168.0.0/16",),
        node_ip="10.0.0.10",
    )


def open_backend(kind: str) -> SnatBackend:
    if kind == "libnftables":
        return NftSnat(Nft.open(prefer_library=True))
    if kind == "nft":
        return NftSnat(Nft.open(prefer_library=False))
    return IptablesSnat(IptablesRestore(kind))


def timed(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def measure(kind: str, pods: int, reps: int) -> dict[str, float]:
    backend = open_backend(kind)
    try:
        spec = spec_for(pods)
        full = timed(lambda: backend.apply(spec), reps)
        # Alternate between two specs that differ by one pod added and one removed.
        other = attrs.evolve(spec, pod_cidrs=(*spec.pod_cidrs[1:], "10.0.15.1/32"))
        state = {"cur": spec}

        def flip() -> None:
            cur = state["cur"]
            nxt = other if cur == spec else spec
            backend.update(cur, nxt)
            state["cur"] = nxt

        delta = timed(flip, reps)
        cur = state["cur"]
        verify = timed(lambda: backend.current_spec_matches(cur), reps)
        assert backend.current_spec_matches(cur)
        backend.remove()
        return {"full_ms": full, "delta_ms": delta, "verify_ms": verify}
    finally:
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    with netns("bench-snat") as ns, ThreadPoolExecutor(max_workers=1) as pool:

        def inside(fn: Callable[[], T]) -> T:
            def run() -> T:
                with entered_path(ns.path):
                    return fn()

            return pool.submit(run).result()

        for pods in POD_COUNTS:
            for kind in BACKENDS:
                reps = max(3, args.reps // (3 if pods >= 1000 and "iptables" in kind else 1))
                result = inside(lambda k=kind, p=pods, r=reps: measure(k, p, r))  # type: ignore[misc]
                rows.append({"backend": kind, "pods": pods, "reps": reps, **result})
                print(
                    f"{kind:>16} {pods:>5} pods  full {result['full_ms']:8.2f} ms  "
                    f"delta {result['delta_ms']:8.2f} ms  verify {result['verify_ms']:8.2f} ms",
                    flush=True,
                )
    print()
    print(f"{'backend':>16} {'pods':>5} {'full ms':>9} {'delta ms':>9} {'verify ms':>10}")
    for row in rows:
        print(
            f"{row['backend']:>16} {row['pods']:>5} {row['full_ms']:>9.2f} "
            f"{row['delta_ms']:>9.2f} {row['verify_ms']:>10.2f}"
        )
    nft_version = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "bench": "snat_reconcile",
                "machine": {"kernel": platform.release(), "python": platform.python_version()},
                "nft": nft_version.strip(),
                "note": "medians; delta = one pod added + one removed",
                "results": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
