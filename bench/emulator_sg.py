"""Cost of the emulated VPC's security groups: ``python -m bench.emulator_sg`` (root).

1. The router's rule set at scale, from the pure model: ``--enis`` ENIs on the wire, each with
   ``--groups-per-eni`` groups drawn from a pool of ``--pool`` groups of ``--rules`` inbound and
   ``--rules`` outbound rules each (CIDR and referenced-group peers, TCP/UDP ranges, ICMP):
   computing it, rendering it, applying it whole with libnftables in a fresh namespace; then one
   ENI's change at that size (its groups replaced; an address gained) as a delta.
2. The same state in moto: building the policy from moto's objects, as every API call does.
3. TCP throughput between two ENIs across the router (iperf3, 1 stream), enforcement on and
   off, and from a branch ENI over its trunk's VLAN (the eBPF 802.1Q path) to an ENI.

Medians of ``--runs`` runs (min and max beside). The machine is shared: figures move with
whatever else runs; compare within one run. Works only inside namespaces it makes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

import attrs

from bench.datapath import iperf
from cloud.emulator import Vpc, trunks
from cloud.emulator.dot1q.links import VlanLinks
from cloud.emulator.firewall import Eni, Group, Policy, Port, Rule, desired_policy
from cloud.emulator.firewall.render import render_delta, render_full, ruleset
from cloud.emulator.netns import Namespace
from netlink.nftables import Nft
from tests.netns import Netns


def synthetic(enis: int, per_eni: int, pool: int, rules: int, seed: int = 1) -> Policy:
    rng = random.Random(seed)
    group_ids = [f"sg-{i:05x}" for i in range(pool)]

    def rule(i: int) -> Rule:
        kind = i % 4
        if kind == 0:
            return Rule(protocol="tcp", low=1000 + i, high=1000 + i, group=rng.choice(group_ids))
        if kind == 1:
            return Rule(
                protocol="tcp", low=2000 + i, high=2010 + i, cidr=IPv4Network(f"10.{i}.0.0/16")
            )
        if kind == 2:
            return Rule(protocol="udp", low=3000 + i, high=3000 + i, group=rng.choice(group_ids))
        return Rule(protocol="icmp", low=8, high=-1, cidr=IPv4Network(f"172.16.{i}.0/24"))

    groups = {
        g: Group(
            id=g,
            inbound=tuple(rule(i) for i in range(rules)),
            outbound=tuple(rule(i + 1) for i in range(rules)),
        )
        for g in group_ids
    }
    members = {
        f"eni-{i:017x}": Eni(
            id=f"eni-{i:017x}",
            addresses=(IPv4Network(f"10.100.{i // 250}.{i % 250 + 1}/32"),),
            groups=tuple(rng.sample(group_ids, per_eni)),
        )
        for i in range(enis)
    }
    ports = tuple(Port(eni_id=e, ifname=f"r{i}") for i, e in enumerate(members))
    return Policy(enis=members, groups=groups, ports=ports)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def row(label: str, values: list[float], unit: str = "ms", scale: float = 1000) -> None:
    print(
        f"  {label:<44} median {statistics.median(values) * scale:9.1f} {unit}"
        f"  (min {min(values) * scale:.1f}, max {max(values) * scale:.1f})",
        flush=True,
    )


def once(
    nft: Nft, policy: Policy, changes: dict[str, Policy], times: dict[str, list[float]]
) -> dict[str, int]:
    """One run in a fresh namespace: the whole rule set, then each change and back."""
    t, rs = timed(lambda: ruleset(policy))
    times["compute"].append(t)
    t, script = timed(lambda: render_full(rs))
    times["render"].append(t)
    times["apply"].append(timed(lambda: nft.run(script))[0])
    lines = {}
    for key, changed in changes.items():
        t, new = timed(lambda: ruleset(changed))  # noqa: B023
        times[f"{key} compute"].append(t)
        t, delta = timed(lambda: render_delta(rs, new))  # noqa: B023
        times[f"{key} diff"].append(t)
        times[f"{key} apply"].append(timed(lambda: nft.run(delta))[0])  # noqa: B023
        lines[key] = len(delta.splitlines())
        nft.run(render_delta(new, rs))
    return lines


def rule_set(args: argparse.Namespace) -> None:
    policy = synthetic(args.enis, args.groups_per_eni, args.pool, args.rules)
    first = next(iter(policy.enis.values()))
    unused = next(g for g in policy.groups if g not in first.groups)
    changes = {
        "groups replaced": attrs.evolve(
            policy,
            enis={**policy.enis, first.id: attrs.evolve(first, groups=(*first.groups[1:], unused))},
        ),
        "address gained": attrs.evolve(
            policy,
            enis={
                **policy.enis,
                first.id: attrs.evolve(
                    first, addresses=(*first.addresses, IPv4Network("10.200.0.1/32"))
                ),
            },
        ),
    }
    rs = ruleset(policy)
    print(
        f"rule set: {args.enis} ENIs x {args.groups_per_eni} groups (pool {args.pool}) x "
        f"{args.rules}+{args.rules} rules -> {rs!r}, {len(render_full(rs).splitlines())} lines"
    )
    times: dict[str, list[float]] = defaultdict(list)
    lines: dict[str, int] = {}
    for _ in range(args.runs):
        ns = Namespace.create("sgbench")
        try:
            with Nft.open(netns_path=ns.path) as nft:
                lines = once(nft, policy, changes, times)
        finally:
            ns.delete()
    row("compute the rule set (pure)", times["compute"])
    row("render the whole script (pure)", times["render"])
    row("apply it whole (libnftables, fresh netns)", times["apply"])
    for key in changes:
        print(f"  one ENI's change at that size, {key} ({lines[key]} lines):")
        for step in ("compute", "diff", "apply"):
            row(f"  {step}", times[f"{key} {step}"])


def from_moto(args: argparse.Namespace) -> None:
    policy = synthetic(args.enis, args.groups_per_eni, args.pool, args.rules)
    with Vpc.start(fabric=False) as vpc:
        state = vpc.state
        subnet = vpc.add_subnet("10.0.0.0/20")
        with state.lock:
            backend = state.backend
            ids = {}
            for gid in policy.groups:
                ids[gid] = backend.create_security_group(gid, gid, vpc_id=vpc.vpc_id).id
            for gid, group in policy.groups.items():
                perms = [
                    {
                        "ip_protocol": r.protocol,
                        "from_port": r.low,
                        "to_port": r.high,
                        "ip_ranges": [{"CidrIp": str(r.cidr)}] if r.cidr else [],
                        "source_groups": [{"GroupId": ids[r.group]}] if r.group else [],
                        "prefix_list_ids": [],
                        "group_name_or_id": ids[gid],
                    }
                    for r in group.inbound
                ]
                for kwargs in perms:
                    backend.authorize_security_group_ingress(**kwargs)
            enis = [
                backend.create_network_interface(
                    subnet.id, None, group_ids=[ids[g] for g in eni.groups]
                )
                for eni in policy.enis.values()
            ]
        ports = {e.id: f"r{i}" for i, e in enumerate(enis)}
        runs = []
        for _ in range(args.runs):
            with state.lock:
                t, built = timed(lambda: desired_policy(backend, vpc.vpc_id, (), ports))
            runs.append(t)
        print(
            f"from moto: {len(built.enis)} ENIs, {len(built.groups)} groups x "
            f"{args.rules} inbound rules"
        )
        row("build the policy from moto (every API call)", runs)


def throughput(args: argparse.Namespace) -> None:
    print(
        f"TCP throughput across the router (iperf3, 1 stream, {args.seconds:g} s per run, "
        "on and off interleaved):"
    )
    runs: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.runs):
        for enforce in (False, True):
            with Vpc.start(security_groups=enforce) as vpc:
                subnet = vpc.add_subnet("10.0.1.0/24")
                a, b = vpc.add_instance(subnet), vpc.add_instance(subnet)
                client, server = Netns(a.netns, create=False), Netns(b.netns, create=False)
                label = "ENI -> ENI, security groups " + ("on" if enforce else "off")
                runs[label].append(iperf(client, server, b.primary_ip, "tcp", 1, args.seconds))
                if enforce:
                    label = "branch (VLAN over its trunk) -> ENI, on"
                    runs[label].append(branch_throughput(vpc, subnet, args.seconds))
    for label, values in runs.items():
        row(label, values, "Gbit/s", 1)


def branch_throughput(vpc: Vpc, subnet: Any, seconds: float) -> float:
    state = vpc.state
    node = vpc.add_node("m5.large", subnet)
    server = vpc.add_instance(subnet)
    backend = state.backend

    def make() -> tuple[Any, Any]:
        trunk = backend.create_network_interface(subnet.id, None, interface_type="trunk")
        backend.attach_network_interface(trunk.id, node.instance_id, 1)
        branch = backend.create_network_interface(subnet.id, None)
        trunks.associate(backend, branch_id=branch.id, trunk_id=trunk.id, vlan_id=10)
        return trunk, branch

    _, branch = state.call(make)
    node.run("ip", "link", "set", "eth1", "up")
    link = VlanLinks(node.namespace, "eth1").add(10, branch.mac_address)  # type: ignore[arg-type]
    node.run("ip", "addr", "add", f"{branch.private_ip_address}/32", "dev", link)
    gateway = str(subnet.gateway)
    node.run("ip", "route", "add", "default", "via", gateway, "dev", link, "onlink", "table", "110")
    node.run("ip", "rule", "add", "from", branch.private_ip_address, "lookup", "110")
    # iperf3 binds its client to the branch address with -B.
    client = _Bound(Netns(node.netns, create=False), branch.private_ip_address)
    server_ns = Netns(server.netns, create=False)
    return iperf(client, server_ns, server.primary_ip, "tcp", 1, seconds)  # type: ignore[arg-type]


class _Bound:
    """A client namespace whose iperf3 binds to ``source`` (``-B``)."""

    def __init__(self, ns: Netns, source: str) -> None:
        self.ns, self.source = ns, source

    def run(self, *cmd: str, **kwargs: Any) -> Any:
        if cmd[:1] == ("iperf3",):
            cmd = (*cmd, "-B", self.source)
        return self.ns.run(*cmd, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--enis", type=int, default=1000)
    parser.add_argument("--groups-per-eni", type=int, default=5)
    parser.add_argument("--pool", type=int, default=250, help="distinct groups")
    parser.add_argument("--rules", type=int, default=60, help="per direction per group")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--only", choices=("rules", "moto", "throughput"))
    args = parser.parse_args()
    if args.only in (None, "rules"):
        rule_set(args)
    if args.only in (None, "moto"):
        from_moto(args)
    if args.only in (None, "throughput"):
        throughput(args)


if __name__ == "__main__":
    main()
