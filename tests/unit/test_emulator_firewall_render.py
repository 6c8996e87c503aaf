"""The emulator's security-group renderer (cloud/emulator/firewall/render.py). Pure, no kernel;
that the kernel takes every script and a delta lands where a full apply would is proven in
tests/e2e/test_emulator_enforcement.py.

Golden files live in tests/unit/golden/vpc_<case>.nft. After an intended change of the
rendering, regenerate them and review the diff:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_emulator_firewall_render.py
"""

from __future__ import annotations

import os
from ipaddress import IPv4Network as Net
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud.emulator.firewall.model import Eni, Group, Policy, Port, Rule, TrunkCable
from cloud.emulator.firewall.render import (
    drops_by_eni,
    parse_counters,
    render_delta,
    render_full,
    render_removed_frame_chains,
    rule_line,
    ruleset,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

WEB = Group(
    id="sg-web",
    inbound=(
        Rule(protocol="tcp", low=443, high=443, cidr=Net("0.0.0.0/0")),
        Rule(protocol="tcp", low=8000, high=8100, group="sg-app"),
        Rule(protocol="icmp", low=8, high=-1, cidr=Net("10.0.0.0/16")),
        Rule(protocol="icmpv6", low=-1, high=-1, cidr=Net("10.0.0.0/16")),  # never IPv4
        Rule(protocol="-1", cidr=None, group=None),  # a prefix-list peer: not emulated
    ),
    outbound=(Rule(protocol="-1", cidr=Net("0.0.0.0/0")),),
)
APP = Group(
    id="sg-app",
    inbound=(
        Rule(protocol="-1", group="sg-app"),
        Rule(protocol="udp", low=0, high=65535, cidr=Net("10.0.2.0/24")),
        Rule(protocol="47", cidr=Net("10.0.0.0/8")),
        Rule(protocol="icmp", low=3, high=4, cidr=Net("10.0.0.0/16")),
        Rule(protocol="icmp", low=-1, high=-1, cidr=Net("192.168.0.0/16")),
    ),
    outbound=(Rule(protocol="tcp", low=5432, high=5432, cidr=Net("10.0.3.7/32")),),
)
UNUSED = Group(id="sg-unused", inbound=(Rule(protocol="-1", cidr=Net("0.0.0.0/0")),))

BASE = Policy(
    enis={
        "eni-a": Eni(id="eni-a", addresses=(Net("10.0.1.10/32"),), groups=("sg-web",)),
        "eni-b": Eni(
            id="eni-b",
            addresses=(Net("10.0.1.11/32"), Net("10.0.1.12/32"), Net("10.0.1.32/28")),
            groups=("sg-app", "sg-web"),
        ),
        # Not on the wire, but its address is one of sg-app's.
        "eni-c": Eni(id="eni-c", addresses=(Net("10.0.1.13/32"),), groups=("sg-app",)),
    },
    groups={g.id: g for g in (WEB, APP, UNUSED)},
    ports=(Port(eni_id="eni-b", ifname="r2"), Port(eni_id="eni-a", ifname="r1")),
)
TRUNKED = attrs.evolve(
    BASE,
    enis={
        **BASE.enis,
        "eni-t": Eni(id="eni-t", addresses=(Net("10.0.1.20/32"),), groups=("sg-web",)),
        "eni-br": Eni(id="eni-br", addresses=(Net("10.0.1.21/32"),), groups=("sg-app",)),
    },
    ports=(*BASE.ports, Port(eni_id="eni-t", ifname="t3"), Port(eni_id="eni-br", ifname="v3.7")),
    trunks=(TrunkCable(eni_id="eni-t", ifname="r3", mac="02:00:00:00:00:03"),),
)
CASES = {"empty": Policy(), "basic": BASE, "trunk": TRUNKED}
DELTAS = {
    # eni-a gains a secondary address and eni-b moves to sg-web only
    "regroup": (
        BASE,
        attrs.evolve(
            BASE,
            enis={
                **BASE.enis,
                "eni-b": attrs.evolve(BASE.enis["eni-b"], groups=("sg-web",)),
                "eni-c": attrs.evolve(
                    BASE.enis["eni-c"], addresses=(Net("10.0.1.13/32"), Net("10.0.1.14/32"))
                ),
            },
        ),
    ),
    # the trunk and its branch go away
    "untrunk": (TRUNKED, BASE),
    "trunk": (BASE, TRUNKED),
}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden (UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_full(case: str) -> None:
    check_golden(f"vpc_{case}.nft", render_full(ruleset(CASES[case])))


@pytest.mark.parametrize("case", sorted(DELTAS))
def test_golden_delta(case: str) -> None:
    old, new = DELTAS[case]
    removed = render_removed_frame_chains(ruleset(old), ruleset(new))
    check_golden(
        f"vpc_delta_{case}.nft",
        "".join(f"# apart: {c}\n" for c in removed) + render_delta(ruleset(old), ruleset(new)),
    )


@pytest.mark.parametrize(
    ("rule", "direction", "line"),
    [
        (Rule(protocol="-1", cidr=Net("0.0.0.0/0")), "out", "accept"),
        (Rule(protocol="-1", group="sg-x"), "in", "ip saddr @m_sg-x accept"),
        (Rule(protocol="-1", group="sg-x"), "out", "ip daddr @m_sg-x accept"),
        (
            Rule(protocol="tcp", low=22, high=22, cidr=Net("10.0.0.0/8")),
            "in",
            "ip saddr 10.0.0.0/8 tcp dport 22 accept",
        ),
        (Rule(protocol="udp", low=1, high=9, cidr=Net("0.0.0.0/0")), "in", "udp dport 1-9 accept"),
        (
            Rule(protocol="tcp", low=0, high=65535, cidr=Net("0.0.0.0/0")),
            "in",
            "meta l4proto tcp accept",
        ),
        (
            Rule(protocol="icmp", low=-1, high=-1, cidr=Net("0.0.0.0/0")),
            "in",
            "meta l4proto icmp accept",
        ),
        (Rule(protocol="icmp", low=0, high=-1, cidr=Net("0.0.0.0/0")), "in", "icmp type 0 accept"),
        (
            Rule(protocol="icmp", low=3, high=1, cidr=Net("0.0.0.0/0")),
            "in",
            "icmp type 3 icmp code 1 accept",
        ),
        (Rule(protocol="50", cidr=Net("0.0.0.0/0")), "in", "meta l4proto 50 accept"),
        (Rule(protocol="icmpv6", cidr=Net("0.0.0.0/0")), "in", None),
        (Rule(protocol="tcp", low=1, high=1), "in", None),  # no IPv4 peer
    ],
)
def test_rule_lines(rule: Rule, direction: str, line: str | None) -> None:
    assert rule_line(rule, direction) == line


def test_only_groups_in_use_get_chains_and_only_referenced_ones_sets() -> None:
    rs = ruleset(BASE)
    assert "g_sg-unused_in" not in rs.chains
    assert set(rs.sets) == {"m_sg-app"}
    # eni-c is not on the wire but holds sg-app.
    assert rs.sets["m_sg-app"] == frozenset(
        {Net("10.0.1.11/32"), Net("10.0.1.12/32"), Net("10.0.1.13/32"), Net("10.0.1.32/28")}
    )
    assert rs.chains["e_eni-b_in"] == (
        "jump g_sg-app_in",
        "jump g_sg-web_in",
        'counter name "eni-b_in" drop',
    )
    assert (rs.out_map, rs.in_map) == (
        {"r1": "e_eni-a_out", "r2": "e_eni-b_out"},
        {"r1": "e_eni-a_in", "r2": "e_eni-b_in"},
    )


def test_overlapping_addresses_are_merged_for_the_interval_set() -> None:
    policy = attrs.evolve(
        BASE,
        enis={
            **BASE.enis,
            # a static node's pod CIDR that covers another ENI's address
            "eni-d": Eni(id="eni-d", addresses=(Net("10.0.1.0/28"),), groups=("sg-app",)),
        },
    )
    assert ruleset(policy).sets["m_sg-app"] == frozenset({Net("10.0.1.0/28"), Net("10.0.1.32/28")})


def test_an_unknown_group_on_an_eni_is_skipped() -> None:
    policy = attrs.evolve(
        BASE, enis={"eni-a": Eni(id="eni-a", groups=("sg-gone", "sg-web"))}, ports=BASE.ports[1:]
    )
    assert ruleset(policy).chains["e_eni-a_out"] == (
        "jump g_sg-web_out",
        'counter name "eni-a_out" drop',
    )


def test_a_port_whose_eni_is_unknown_drops_everything() -> None:
    rs = ruleset(Policy(ports=(Port(eni_id="eni-x", ifname="r9"),)))
    assert rs.chains["e_eni-x_in"] == ('counter name "eni-x_in" drop',)


def test_a_change_of_one_eni_at_scale_is_a_few_lines() -> None:
    many = Policy(
        enis={
            f"eni-{i}": Eni(
                id=f"eni-{i}",
                addresses=(Net(f"10.1.{i // 250}.{i % 250 + 1}/32"),),
                groups=("sg-app",),
            )
            for i in range(1000)
        },
        groups={"sg-app": APP},
        ports=tuple(Port(eni_id=f"eni-{i}", ifname=f"r{i}") for i in range(1000)),
    )
    changed = attrs.evolve(
        many,
        enis={**many.enis, "eni-7": attrs.evolve(many.enis["eni-7"], groups=("sg-app", "sg-web"))},
        groups={**many.groups, "sg-web": WEB},
    )
    delta = render_delta(ruleset(many), ruleset(changed))
    assert len(delta.splitlines()) < 20
    assert "flush chain ip podwire_vpc e_eni-7_in" in delta
    assert "eni-8" not in delta


names = st.sampled_from(["sg-a", "sg-b", "sg-c"])
rules = st.builds(
    Rule,
    protocol=st.sampled_from(["-1", "tcp", "udp", "icmp", "47"]),
    low=st.integers(-1, 10),
    high=st.integers(-1, 10),
    cidr=st.sampled_from([None, Net("0.0.0.0/0"), Net("10.0.0.0/16")]),
    group=st.one_of(st.none(), names),
)
policies = st.builds(
    lambda groups, memberships: Policy(
        enis={
            f"eni-{i}": Eni(id=f"eni-{i}", addresses=(Net(f"10.0.0.{i + 1}/32"),), groups=tuple(m))
            for i, m in enumerate(memberships)
        },
        groups={
            g: Group(id=g, inbound=tuple(r), outbound=tuple(r[::-1])) for g, r in groups.items()
        },
        ports=tuple(Port(eni_id=f"eni-{i}", ifname=f"r{i}") for i in range(0, len(memberships), 2)),
    ),
    st.dictionaries(names, st.lists(rules, max_size=4), max_size=3),
    st.lists(st.lists(names, max_size=3, unique=True), max_size=5),
)


@given(policies)
def test_no_change_renders_nothing(policy: Policy) -> None:
    assert render_delta(ruleset(policy), ruleset(policy)) == ""


@given(policies, policies)
def test_a_delta_names_only_objects_that_exist_when_it_runs(old: Policy, new: Policy) -> None:
    before, after = ruleset(old), ruleset(new)
    chains = set(before.chains)
    for line in render_delta(before, after).splitlines():
        words = line.split()
        if words[:2] == ["add", "chain"]:
            chains.add(words[4])
        elif words[:2] == ["delete", "chain"]:
            chains.remove(words[4])
        elif words[:2] in (["add", "rule"], ["flush", "chain"]):
            assert words[4] in chains, line
        for word in (w.rstrip(",") for w in words):
            if word.startswith(("g_", "e_")) and words[0] != "delete":
                assert word in chains, line
    assert chains == set(after.chains)


def test_counters_are_read_back_per_eni() -> None:
    listing = """table ip podwire_vpc {
\tcounter eni-0a1b_in {
\t\tpackets 3 bytes 180
\t}

\tcounter eni-0a1b_out {
\t\tpackets 0 bytes 0
\t}
}
table netdev podwire_vpc_frames {
\tcounter eni-77_frames {
\t\tpackets 12 bytes 900
\t}
}
"""
    packets = parse_counters(listing)
    assert packets == {"eni-0a1b_in": 3, "eni-0a1b_out": 0, "eni-77_frames": 12}
    assert drops_by_eni(packets) == {
        "eni-0a1b": {"in": 3, "out": 0, "frames": 0},
        "eni-77": {"in": 0, "out": 0, "frames": 12},
    }
