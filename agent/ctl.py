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
        f"Agent:      pid {st['pid']}, up {_age(st['uptime_s'])}, "
        f"{'ready' if st['ready'] else 'NOT READY'}",
        f"Provider:   {st['provider']}",
        f"Socket:     {st['socket']}",
        f"Pods:       {st['pods']}",
        f"Pool:       {pool['total']} total, {pool['assigned']} assigned, "
        f"{pool['cooling']} cooling, "
        f"{pool['available']} available (cooldown {pool['cooldown_s']:g}s)"
        + (
            f", {pool['withdrawn_in_use']} withdrawn but in use"
            if pool.get("withdrawn_in_use")
            else ""
        ),
        f"Checkpoint: {st['checkpoint']['path']} ({st['checkpoint']['writes']} writes)",
        f"SNAT:       {show_snat_line(st.get('snat', {}))}",
    ]
    sg = st.get("security_groups") or {}
    if sg.get("enabled") or sg.get("state") not in (None, "disabled"):
        lines.append(f"Sec groups: {show_sg_line(sg)}")
    return "\n".join(lines)


_LINK_WORDS = {"vlan": "802.1Q VLAN links", "ebpf": "802.1Q links by eBPF"}


def show_sg_line(sg: dict[str, Any]) -> str:
    """One line on security groups for pods: mode, trunk, branches, or why unavailable."""
    if not sg.get("enabled"):
        return "off"
    if sg.get("eni_mode"):
        return show_eni_line(sg)
    head = f"{sg['mode']} mode, branches by {sg['branches']}"
    link = _LINK_WORDS.get(sg.get("link", ""))
    if link and sg["state"] != "unsupported":
        head += f", {link}"
    if sg["state"] != "ready":
        return f"{head}; {sg['state'].upper()}: {sg['reason']}"
    t, c = sg["trunk"], sg.get("counts") or {}
    held = sg.get("held_by_others", 0)
    return (
        f"{head}; trunk {t['eni_id']} on {t['link']}; {sg['limit']} branches: "
        f"{c.get('associated', 0)} in use, {c.get('cooling', 0)} cooling, "
        f"{c.get('creating', 0)} creating, {c.get('deleting', 0)} deleting"
        + (f", {held} EKS-made" if held else "")
    )


def show_eni_line(sg: dict[str, Any]) -> str:
    """eni mode: the sets in use, and what strict mode would do that this mode does not."""
    if sg["state"] != "ready":
        return f"eni mode; {sg['state'].upper()}: {sg['reason']}"
    refused = sg.get("refused") or {}
    return (
        f"eni mode (an ENI per set of groups); {sg['sets']} sets on {sg['enis']} ENIs: "
        f"{sg['assigned']} pods, {sg['free']} free"
        + (f"; {len(refused)} set(s) refused for want of an ENI slot" if refused else "")
        + f"; {sg['same_node']}"
    )


def show_sets(v: dict[str, Any]) -> str:
    """eni mode's sets: per set its ENIs, addresses total/assigned/free, pods."""
    head = f"security groups for pods: {show_sg_line(v)}"
    if not v.get("eni_mode"):
        return head + '\n(sets are eni mode\'s: security_groups.mode = "eni")'
    head += (
        f"\nmargin {v['warm_ips']} free per set, set cooldown {v['set_cooldown_s']:g}s, "
        f"shared_reserve {v['shared_reserve']} ENI slot(s) beside the primary"
    )
    rows = [
        (
            ",".join(r["groups"]),
            " ".join(e["eni"] for e in r["enis"]) or "-",
            r["total"],
            r["assigned"],
            r["cooling"],
            r["free"],
            ", ".join(r["pods"]) or "-",
            r["waiting"] or "",
            r["refused"],
        )
        for r in v["rows"]
    ]
    headers = (
        "groups",
        "eni",
        "total",
        "assigned",
        "cooling",
        "free",
        "pods",
        "waiting",
        "refused",
    )
    return head + "\n" + table(rows, headers)


def _pod_groups(p: dict[str, Any]) -> str:
    if p.get("set"):
        return f"{','.join(p.get('groups') or [])} (eni)"
    b = p.get("branch")
    if not b:
        return "shared pool"
    groups = ",".join(p.get("groups") or []) or f"(from {b['source']})"
    return f"{groups} vlan {b['vlan']} {b['mode']}"


def show_snat_line(s: dict[str, Any]) -> str:
    if not s.get("backend"):
        return "off"
    state = "external (not done here)" if s["external"] else f"to node address, {s['mode']}"
    err = f", last error: {s['last_error']}" if s.get("last_error") else ""
    return f"{s['backend']}, {state}, {s['reconciles']} reconciles, {s['repairs']} repairs{err}"


def show_pods(pods: list[dict[str, Any]]) -> str:
    rows = [
        (
            f"{p['namespace']}/{p['name']}" if p["name"] else "-",
            p["container_id"][:12],
            p["ifname"],
            p["ip"],
            p["owner"],
            _pod_groups(p),
            p["host_veth"],
            _age(p["age_s"]),
        )
        for p in pods
    ]
    return table(
        rows, ("pod", "container", "if", "ip", "eni/cidr", "security groups", "host veth", "age")
    )


def show_branches(v: dict[str, Any]) -> str:
    """The trunk and its branch ENIs: VLAN, state, pod, address, groups."""
    head = f"security groups for pods: {show_sg_line(v)}"
    if not v.get("enabled") or v.get("state") != "ready":
        return head
    t = v["trunk"]
    head += (
        f"\ntrunk {t['eni_id']}: link {t['link']} (ifindex {t['index']}), device "
        f"{t['device_index']}, mac {t['mac']}; cooldown {v['cooldown_s']:g}s"
    )
    rows = [
        (
            r["branch"],
            r["vlan"],
            r["state"]
            + (f" ({r['cooldown_left_s']:g}s left)" if r["cooldown_left_s"] is not None else ""),
            r["pod"] or "-",
            r["ip"] or "-",
            ",".join(r["groups"]) or ("(EKS)" if r["source"] == "eks" else "-"),
            r["source"],
            r["error"],
        )
        for r in v["rows"]
    ]
    return (
        head
        + "\n"
        + table(rows, ("branch eni", "vlan", "state", "pod", "ip", "groups", "source", "error"))
    )


def show_pool(pool: dict[str, Any]) -> str:
    rows = [
        (
            o["owner"],
            "main" if o["table"] is None else o["table"],
            o["total"],
            o["assigned"],
            o["cooling"],
            o["free"],
        )
        for o in pool["owners"]
    ]
    head = f"provider {pool['provider']}, cooldown {pool['cooldown_s']:g}s\n"
    tail = ""
    if "targets" in pool:
        t, r = pool["targets"], pool["refiller"]
        tail = (
            f"\ntargets: warm_eni={t['warm_eni']} warm_ip={t['warm_ip']} "
            f"minimum_ip={t['minimum_ip']} "
            f"warm_prefix={t['warm_prefix']} max_eni={t['max_eni']} prefix_mode={t['prefix_mode']}"
            f"\nrefiller: {r['ticks']} ticks, last plan: {r['last_plan'] or '-'}"
            + (f", fallback to /32 ({r['fallback']['code']})" if r["fallback"] else "")
            + (f", last error: {r['last_error']}" if r["last_error"] else "")
        )
    if "ranges" in pool:
        r, md = pool["ranges"], pool.get("provider_status") or {}
        tail += (
            f"\nalias ranges: {', '.join(r['ranges']) or 'none'} ({r['changes']} changes"
            + (f", etag {md['etag']}" if md.get("etag") else "")
            + (f", last error: {md['last_error']}" if md.get("last_error") else "")
            + (f", refused: {r['last_error']}" if r.get("last_error") else "")
            + ")"
        )
    withdrawn = pool.get("withdrawn_in_use", [])
    if withdrawn:
        tail += (
            f"\nwithdrawn, still in use until their pods go (never handed out again): "
            f"{len(withdrawn)}"
        )
        tail += "".join(f"\n  {w['ip']}  {w['key']}" for w in withdrawn[:10])
        if len(withdrawn) > 10:
            tail += f"\n  ... and {len(withdrawn) - 10} more (agentctl pool --json)"
    return head + table(rows, ("eni/cidr", "table", "total", "assigned", "cooling", "free")) + tail


def show_gc(r: dict[str, Any]) -> str:
    head = ("would collect" if r["dry_run"] else "collected") + (
        f" {r['collected']}: {r['released']} allocations, {r['veths']} veths, {r['rules']} rules, "
        f"{r['unmounted']} namespaces; {r['skipped_busy']} busy skipped"
    )
    return "\n".join(
        [head, *(f"  {line}" for line in r["lines"]), *(f"  error: {e}" for e in r["errors"])]
    )


def show_enis(enis: list[dict[str, Any]]) -> str:
    rows = [
        (
            e["eni"],
            e["device"],
            "main" if e["table"] is None else e["table"],
            e["subnet"],
            e["primary_ip"],
            len(e["ips"]),
            len(e["prefixes"]),
            "yes" if e["primary"] else "",
            "yes" if e["no_manage"] else "",
        )
        for e in enis
    ]
    return table(
        rows,
        (
            "eni",
            "device",
            "table",
            "subnet",
            "primary ip",
            "ips",
            "prefixes",
            "primary",
            "no-manage",
        ),
    )


def show_config(rows: list[dict[str, Any]]) -> str:
    return table(
        [(r["setting"], orjson.dumps(r["value"]).decode(), r["source"]) for r in rows],
        ("setting", "value", "source"),
    )


def show_event(e: dict[str, Any]) -> str:
    import time

    stamp = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
    fields = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("ts", "kind") and v != "")
    return f"{stamp}  {e['kind']:<20} {fields}"


def show_events(events: list[dict[str, Any]]) -> str:
    return "\n".join(show_event(e) for e in events) or "(no events yet)"


def show_health(h: dict[str, Any]) -> str:
    lines = [f"live:  {'yes' if h['alive'] else 'NO'}", f"ready: {'yes' if h['ready'] else 'NO'}"]
    for name, svc in sorted(h["services"].items()):
        lines.append(f"  service {name:<14} {'alive' if svc['alive'] else 'DEAD ' + svc['reason']}")
    for name, cond in sorted(h["conditions"].items()):
        lines.append(f"  ready   {name:<14} {'ok' if cond['ok'] else 'NO'}  {cond['reason']}")
    return "\n".join(lines)


def show_kube(k: dict[str, Any]) -> str:
    if not k.get("enabled"):
        return "kubernetes: off ([kubernetes] enabled = false)"
    import time

    now = time.time()
    rows = [
        (
            w["name"],
            "yes" if w["synced"] else "no",
            "yes"
            if w["connected"]
            else f"NO ({_age(now - w['disconnected_since'])})"
            if w["disconnected_since"]
            else "NO",
            w["objects"],
            w["resource_version"],
            w["lists"],
            w["expired"],
            w["errors"],
            w["last_error"][:60],
        )
        for w in k["watches"]
    ]
    lines = [f"node: {k['node']}"]
    if "cninode" in k:  # EKS drop-in: branch ENIs asked for on the node's CNINode
        lines.append(f"cninode: {k['cninode']['state']}")
    lines.append("")
    lines.append(
        table(
            rows,
            (
                "watch",
                "synced",
                "connected",
                "objects",
                "rv",
                "lists",
                "410s",
                "errors",
                "last error",
            ),
        )
    )
    for section in ("groups",):
        if section in k:
            lines.append("")
            lines.append(show_groups(k[section]))
    return "\n".join(lines)


def show_groups(g: dict[str, Any]) -> str:
    """Pods whose security groups the cluster now resolves differently from what they run with."""
    rows = [
        (r["pod"], ",".join(r["running"]) or "-", ",".join(r["resolved"]) or "-", r["state"])
        for r in g.get("pods", [])
    ]
    if not rows:
        return "security groups: every pod runs with the groups the cluster resolves for it"
    return table(rows, ("pod", "running", "resolved", "state"))


# command -> (method, params from args, renderer)
COMMANDS: dict[str, tuple[str, Any, Any]] = {
    "status": ("agent.status", lambda a: None, show_status),
    "pods": ("agent.pods", lambda a: None, show_pods),
    "pool": ("agent.pool", lambda a: None, show_pool),
    "enis": ("agent.enis", lambda a: None, show_enis),
    "branches": ("agent.branches", lambda a: None, show_branches),
    "sets": ("agent.sets", lambda a: None, show_sets),
    "gc": ("agent.gc", lambda a: {"dry_run": a.dry_run}, show_gc),
    "config": ("agent.config", lambda a: None, show_config),
    "events": ("agent.events", lambda a: {"follow": a.follow, "replay": True}, show_events),
    "health": ("agent.health", lambda a: None, show_health),
    "snat": ("agent.snat", lambda a: None, show_snat_line),
    "metrics": ("agent.metrics", lambda a: None, str),
    "kube": ("agent.kube", lambda a: None, show_kube),
}


def parser() -> argparse.ArgumentParser:
    # --json is accepted before or after the command; the copy on the commands must not reset it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    p = argparse.ArgumentParser(prog="agentctl", description="Inspect the local podwire-agent.")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--socket", default=os.environ.get("PODWIRE_SOCKET", "/run/podwire/agent.sock"))
    p.add_argument("--timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", parents=[common], help="agent, provider, pool and checkpoint summary")
    sub.add_parser("pods", parents=[common], help="pods wired on this node")
    sub.add_parser("pool", parents=[common], help="addresses per ENI or CIDR, targets, refiller")
    sub.add_parser("enis", parents=[common], help="this node's ENIs (aws provider)")
    sub.add_parser(
        "branches",
        parents=[common],
        help="security groups for pods: the trunk ENI and its branch ENIs",
    )
    sub.add_parser(
        "sets",
        parents=[common],
        help="security groups for pods, eni mode: each set's ENIs, addresses and pods",
    )
    g = sub.add_parser("gc", parents=[common], help="collect leaked pods, veths and rules now")
    g.add_argument("--dry-run", action="store_true", help="only show what would be collected")
    sub.add_parser(
        "config", parents=[common], help="effective configuration and where each value came from"
    )
    h = sub.add_parser(
        "health",
        parents=[common],
        help="liveness and readiness; exit 0 when ready (or alive with --live)",
    )
    h.add_argument("--live", action="store_true", help="only liveness (for a liveness exec probe)")
    sub.add_parser("metrics", parents=[common], help="Prometheus metrics text")
    sn = sub.add_parser(
        "snat", parents=[common], help="SNAT backend and state; switch external SNAT"
    )
    sn.add_argument("--external", choices=("on", "off"), help="switch external SNAT at run time")
    sub.add_parser(
        "kube", parents=[common], help="the agent's watches of its cluster (kubernetes source)"
    )
    ev = sub.add_parser("events", parents=[common], help="what the agent did recently")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    method, params, show = COMMANDS[args.command]
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            if args.command == "events" and args.follow:
                for event in client.stream(method, params(args)):
                    line = orjson.dumps(event).decode() if args.json else show_event(event)
                    print(line, flush=True)
                return EXIT_OK
            if args.command == "snat" and args.external:
                method, params = "agent.snat.set", lambda a: {"external": a.external == "on"}
            result = client.call(method, params(args))
    except AgentUnreachable as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RpcError as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(show(result))
    if args.command == "health":
        ok = result["alive"] if args.live else result["alive"] and result["ready"]
        return EXIT_OK if ok else EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
