"""``agentctl``: ask the local podwire-agent what it is doing.

Tables by default, ``--json`` for scripts. Exit codes: 0 ok, 1 the agent answered an error,
2 usage, 3 the agent is not reachable. Imports stay light (no anyio, no cattrs) so the
command starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from rpc.client import Client
from rpc.errors import AgentUnreachable, RpcError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Render rows as an aligned text table (kubectl style: upper-case headers, 3 spaces)."""
    cells = [[str(h).upper() for h in headers]] + [
        ["" if c is None else str(c) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _age(seconds: float | None) -> str:
    """kubectl-style age: 45s, 7m, 5h, 3d."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def show_status(st: dict[str, Any]) -> str:
    pool = st["pool"]
    lines = [
        f"Agent:      pid {st['pid']}, up {_age(st['uptime_s'])}, {'ready' if st['ready'] else 'NOT READY'}",
        f"Provider:   {st['provider']}",
        f"Socket:     {st['socket']}",
        f"Pods:       {st['pods']}",
        f"Pool:       {pool['total']} total, {pool['assigned']} assigned, {pool['cooling']} cooling, "
        f"{pool['available']} available (cooldown {pool['cooldown_s']:g}s)",
        f"Checkpoint: {st['checkpoint']['path']} ({st['checkpoint']['writes']} writes)",
    ]
    return "\n".join(lines)


def show_pods(pods: list[dict[str, Any]]) -> str:
    rows = [
        (
            f"{p['namespace']}/{p['name']}" if p["name"] else "-",
            p["container_id"][:12],
            p["ifname"],
            p["ip"],
            p["owner"],
            p["host_veth"],
            _age(p["age_s"]),
        )
        for p in pods
    ]
    return table(rows, ("pod", "container", "if", "ip", "eni/cidr", "host veth", "age"))


COMMANDS = {
    "status": ("agent.status", show_status),
    "pods": ("agent.pods", show_pods),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agentctl", description="Inspect the local podwire-agent.")
    p.add_argument("--socket", default=os.environ.get("PODWIRE_SOCKET", "/run/podwire/agent.sock"))
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("command", choices=sorted(COMMANDS))
    args = p.parse_args(argv)
    method, show = COMMANDS[args.command]
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            result = client.call(method)
    except AgentUnreachable as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RpcError as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(show(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
