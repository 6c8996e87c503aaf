"""The SNAT state core (agent/snat/rules.py): rendering, deltas, listings. Pure, no kernel.

Golden files live in tests/unit/golden/snat_<case>.{nft,json,iptables}. After an intended
change of the rendering, regenerate them and review the diff:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_snat_render.py
"""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.snat.rules import (
    SET_NAMES,
    InvalidSnatSpec,
    IptablesOwned,
    Mode,
    NftChain,
    NftSet,
    SnatSpec,
    UnreadableListing,
    diff_sets,
    expected_iptables,
    expected_nft_state,
    mode_from_vpc_cni,
    needs_full_apply,
    parse_iptables_save,
    parse_nft_listing,
    plan_update,
    render_iptables,
    render_iptables_removal,
    render_nft,
    render_nft_delta,
    render_nft_removal,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

BASE = SnatSpec(
    pod_cidrs=("10.0.1.5/32", "10.0.1.9/32"),
    vpc_cidrs=("10.0.0.0/16",),
    node_ip="10.0.0.10",
)

CASES: dict[str, SnatSpec] = {
    "default": BASE,
    "external": attrs.evolve(BASE, external_snat=True),
    "hashrandom": attrs.evolve(BASE, mode="hashrandom"),
    "none": attrs.evolve(BASE, mode="none"),
    "excluded": attrs.evolve(
        BASE,
        vpc_cidrs=("10.0.0.0/16", "100.64.0.0/16"),
        excluded_cidrs=("203.0.113.0/24", "192.168.0.0/16"),
        primary_iface="ens5",
        pod_iface_prefix="eni",
    ),
    "many_pods": attrs.evolve(
        BASE, pod_cidrs=tuple(f"10.0.{i // 200}.{(i % 200) * 2 + 1}/32" for i in range(40))
    ),
}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden (UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_nft(case: str) -> None:
    check_golden(f"snat_{case}.nft", render_nft(CASES[case]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_expected_listing(case: str) -> None:
    state = expected_nft_state(CASES[case])
    check_golden(f"snat_{case}.json", json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_iptables(case: str) -> None:
    check_golden(f"snat_{case}.iptables", render_iptables(CASES[case]))


# --- the spec ----------------------------------------------------------------------------------


def test_cidrs_are_collapsed_and_sorted_so_equal_specs_compare_equal() -> None:
    a = attrs.evolve(BASE, pod_cidrs=("10.0.1.9/32", "10.0.1.4/32", "10.0.1.5/32"))
    b = attrs.evolve(BASE, pod_cidrs=(IPv4Network("10.0.1.4/31"), "10.0.1.9/32"))
    assert a == b
    assert a.pod_cidrs == (IPv4Network("10.0.1.4/31"), IPv4Network("10.0.1.9/32"))
    # Overlaps merge too: a prefix swallows the /32s inside it.
    c = attrs.evolve(BASE, pod_cidrs=("10.0.1.0/28", "10.0.1.5/32"))
    assert c.pod_cidrs == (IPv4Network("10.0.1.0/28"),)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"pod_cidrs": ("10.0.1.5/24",)}, "cidr"),  # host bits set
        ({"vpc_cidrs": ("not-a-cidr",)}, "cidr"),
        ({"node_ip": "0.0.0.0"}, "node_ip"),
        ({"node_ip": "10.0.0.300"}, "node_ip"),
        ({"mode": "prng"}, "mode"),
        ({"pod_iface_prefix": 'pwv" accept'}, "pod_iface_prefix"),
        ({"pod_iface_prefix": "x" * 15}, "pod_iface_prefix"),
        ({"primary_iface": ""}, "primary_iface"),
        ({"connmark": 0x180}, "connmark"),
        ({"connmark": 0}, "connmark"),
        ({"connmark": 1 << 32}, "connmark"),
    ],
)
def test_invalid_specs_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSnatSpec) as info:
        attrs.evolve(BASE, **changes)
    assert info.value.field == field


def test_vpc_cni_randomizesnat_values() -> None:
    assert mode_from_vpc_cni("prng") == "random-fully"
    assert mode_from_vpc_cni("hashrandom") == "hashrandom"
    assert mode_from_vpc_cni(" None ") == "none"
    with pytest.raises(InvalidSnatSpec):
        mode_from_vpc_cni("random")


def test_repr_shows_counts() -> None:
    assert repr(BASE) == (
        "SnatSpec(pods=2, vpc=1, excluded=0, node_ip=10.0.0.10, mode=random-fully, "
        "external_snat=False)"
    )


# --- rendering details that the goldens make easy to miss ------------------------------------


def test_external_snat_keeps_table_and_sets_but_no_snat_and_no_pod_connmark() -> None:
    script = render_nft(CASES["external"])
    assert "snat to" not in script
    # the nat chain stays registered (empty): removing it would drop live NAT bindings
    assert "add chain ip podwire postrouting { type nat" in script
    assert "delete" not in script
    for name in SET_NAMES:
        assert f"add set ip podwire {name} {{" in script
    assert "ct state new" not in script
    assert "fib daddr . iif type local" in script  # NodePort connmark stays (VPC CNI too)
    assert "restore" in script


@pytest.mark.parametrize(
    ("mode", "nft_flag", "ipt_flag"),
    [("random-fully", " fully-random", " --random-fully"), ("hashrandom", " random", " --random")],
)
def test_mode_flags(mode: Mode, nft_flag: str, ipt_flag: str) -> None:
    spec = attrs.evolve(BASE, mode=mode)
    assert f"snat to 10.0.0.10{nft_flag} comment" in render_nft(spec)
    assert f"--to-source 10.0.0.10{ipt_flag}\n" in render_iptables(spec)


def test_mode_none_has_no_flag() -> None:
    spec = attrs.evolve(BASE, mode="none")
    assert "snat to 10.0.0.10 comment" in render_nft(spec)
    assert "--to-source 10.0.0.10\n" in render_iptables(spec)


def test_nft_script_touches_only_our_table_and_never_deletes_our_chains() -> None:
    script = render_nft(BASE)
    lines = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert all(" ip podwire" in line for line in lines)
    assert not any(line.startswith("delete") for line in lines)
    assert lines[0] == "add table ip podwire"
    assert render_nft_removal() == "add table ip podwire\ndelete table ip podwire\n"


def test_full_apply_removes_what_others_added_to_our_table() -> None:
    present = attrs.evolve(
        expected_nft_state(BASE),
        chains=(
            *expected_nft_state(BASE).chains,
            NftChain(name="intruder", type="filter", hook="input", prio=0, policy="accept"),
        ),
        sets=(
            *expected_nft_state(BASE).sets,
            NftSet(name="pod_cidrs", type="ipv4_addr", flags=(), elements=()),
        ),
    )
    script = render_nft(BASE, present)
    assert "delete chain ip podwire intruder" in script
    assert "delete set ip podwire pod_cidrs" in script  # same name, wrong flags: re-made
    assert "delete chain ip podwire postrouting" not in script


# --- deltas -----------------------------------------------------------------------------------


def test_pods_coming_and_going_are_element_deltas() -> None:
    new = attrs.evolve(BASE, pod_cidrs=("10.0.1.5/32", "10.0.1.7/32"))
    assert not needs_full_apply(BASE, new)
    assert plan_update(BASE, new) == "delta"
    deltas = diff_sets(BASE, new)
    assert [(d.set_name, d.add, d.delete) for d in deltas] == [
        ("pod_cidrs", (IPv4Network("10.0.1.7/32"),), (IPv4Network("10.0.1.9/32"),))
    ]
    assert render_nft_delta(deltas) == (
        "delete element ip podwire pod_cidrs { 10.0.1.9/32 }\n"
        "add element ip podwire pod_cidrs { 10.0.1.7/32 }\n"
    )


def test_delta_deletes_come_before_adds_so_a_merged_interval_can_split() -> None:
    old = attrs.evolve(BASE, pod_cidrs=("10.0.1.4/32", "10.0.1.5/32"))  # held as 10.0.1.4/31
    new = attrs.evolve(BASE, pod_cidrs=("10.0.1.5/32",), excluded_cidrs=("198.51.100.0/24",))
    script = render_nft_delta(diff_sets(old, new))
    assert script == (
        "delete element ip podwire pod_cidrs { 10.0.1.4/31 }\n"
        "add element ip podwire excluded_cidrs { 198.51.100.0/24 }\n"
        "add element ip podwire pod_cidrs { 10.0.1.5/32 }\n"
    )


def test_no_change_no_delta() -> None:
    assert diff_sets(BASE, BASE) == []
    assert render_nft_delta([]) == ""
    assert plan_update(BASE, BASE) == "unchanged"
    assert plan_update(None, BASE) == "full"


@pytest.mark.parametrize(
    ("changes", "full"),
    [
        ({"pod_cidrs": ()}, False),
        ({"vpc_cidrs": ("10.0.0.0/8",)}, False),
        ({"excluded_cidrs": ("1.2.3.0/24",)}, False),
        ({"node_ip": "10.0.0.11"}, True),
        ({"mode": "none"}, True),
        ({"external_snat": True}, True),
        ({"pod_iface_prefix": "eni"}, True),
        ({"primary_iface": "ens5"}, True),
        ({"connmark": 0x100}, True),
    ],
)
def test_needs_full_apply(changes: dict[str, Any], full: bool) -> None:
    assert needs_full_apply(BASE, attrs.evolve(BASE, **changes)) is full


cidr = st.builds(
    lambda addr, plen: IPv4Network((addr, plen), strict=False),
    st.integers(0x0A000000, 0x0A0000FF),
    st.integers(26, 32),
)


@given(st.lists(cidr, max_size=8), st.lists(cidr, max_size=8))
def test_delta_turns_old_sets_into_new(
    old_pods: list[IPv4Network], new_pods: list[IPv4Network]
) -> None:
    old = attrs.evolve(BASE, pod_cidrs=old_pods)
    new = attrs.evolve(BASE, pod_cidrs=new_pods)
    held = set(old.pod_cidrs)  # what the kernel holds after applying old
    for d in diff_sets(old, new):
        assert set(d.delete) <= held
        held -= set(d.delete)
        assert not (set(d.add) & held)
        held |= set(d.add)
    assert held == set(new.pod_cidrs)


# --- nft listings -----------------------------------------------------------------------------


def listing_of(spec: SnatSpec) -> dict[str, Any]:
    """An ``nft -j list table`` document for ``spec``, shaped like nftables 1.0.6's output."""
    state = expected_nft_state(spec)
    items: list[dict[str, Any]] = [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": "podwire", "handle": 1}},
    ]
    for s in state.sets:
        body: dict[str, Any] = {
            "family": "ip",
            "name": s.name,
            "table": "podwire",
            "type": s.type,
            "handle": 3,
            "flags": list(s.flags),
        }
        if s.elements:
            body["elem"] = [
                str(n.network_address)
                if n.prefixlen == 32
                else {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}
                for n in s.elements
            ]
        items.append({"set": body})
    for c in state.chains:
        items.append(
            {"chain": {"family": "ip", "table": "podwire", "handle": 2, **attrs.asdict(c)}}
        )
    for i, r in enumerate(state.rules):
        rule: dict[str, Any] = {
            "family": "ip",
            "table": "podwire",
            "chain": r.chain,
            "handle": 10 + i,
            "expr": json.loads(r.expr),
        }
        if r.comment is not None:
            rule["comment"] = r.comment
        items.append({"rule": rule})
    return {"nftables": items}


@pytest.mark.parametrize("case", sorted(CASES))
def test_listing_of_expected_state_parses_back(case: str) -> None:
    spec = CASES[case]
    assert parse_nft_listing(listing_of(spec)) == expected_nft_state(spec)


def test_listing_detects_changes() -> None:
    doc = listing_of(BASE)
    rules = [i for i in doc["nftables"] if "rule" in i]
    rules[-1]["rule"]["expr"][-1] = {"snat": {"addr": "10.0.0.99"}}
    assert parse_nft_listing(doc) != expected_nft_state(BASE)
    flushed = {"nftables": [i for i in listing_of(BASE)["nftables"] if "rule" not in i]}
    assert parse_nft_listing(flushed) != expected_nft_state(BASE)


def test_listing_element_shapes() -> None:
    doc = listing_of(attrs.evolve(BASE, pod_cidrs=()))
    pod_set = next(i["set"] for i in doc["nftables"] if i.get("set", {}).get("name") == "pod_cidrs")
    pod_set["elem"] = [
        "10.0.1.5",
        {"range": ["10.0.1.8", "10.0.1.9"]},
        {"elem": {"val": {"prefix": {"addr": "10.0.2.0", "len": 24}}, "comment": "x"}},
    ]
    want = attrs.evolve(BASE, pod_cidrs=("10.0.1.5/32", "10.0.1.8/31", "10.0.2.0/24"))
    assert parse_nft_listing(doc) == expected_nft_state(want)


def test_listing_without_our_table_is_none_and_odd_shapes_raise() -> None:
    assert parse_nft_listing({"nftables": [{"metainfo": {"version": "1.0.6"}}]}) is None
    with pytest.raises(UnreadableListing):
        parse_nft_listing({"tables": []})
    doc = listing_of(BASE)
    next(i["set"] for i in doc["nftables"] if "set" in i)["elem"] = [{"concat": [1, 2]}]
    with pytest.raises(UnreadableListing):
        parse_nft_listing(doc)


# --- iptables-save ------------------------------------------------------------------------------

SAVED = """\
# Generated by iptables-nft-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:PODWIRE-CONNMARK - [0:0]
:PODWIRE-OLD - [0:0]
-A PREROUTING -j KUBE-MANGLE
-A PREROUTING -m comment --comment "podwire connmark" -j PODWIRE-CONNMARK
-A PREROUTING -m comment --comment "podwire connmark" -j PODWIRE-CONNMARK
-A PREROUTING -i eni+ -j PODWIRE-OLD
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
:PODWIRE-SNAT - [0:0]
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A PODWIRE-SNAT -d 10.0.0.0/16 -j RETURN
COMMIT
# Warning: iptables-legacy tables present, use iptables-legacy-save to see them
"""


def test_parse_iptables_save_picks_only_ours() -> None:
    owned = parse_iptables_save(SAVED)
    assert owned.chains == (
        ("mangle", "PODWIRE-CONNMARK"),
        ("mangle", "PODWIRE-OLD"),
        ("nat", "PODWIRE-SNAT"),
    )
    assert sorted(j.line() for j in owned.jumps) == [
        "-A PREROUTING -i eni+ -j PODWIRE-OLD",
        '-A PREROUTING -m comment --comment "podwire connmark" -j PODWIRE-CONNMARK',
        '-A PREROUTING -m comment --comment "podwire connmark" -j PODWIRE-CONNMARK',
    ]
    assert [r.line() for r in owned.rules] == ["-A PODWIRE-SNAT -d 10.0.0.0/16 -j RETURN"]


def test_reapply_leaves_exactly_one_jump_and_drops_stale_chains() -> None:
    text = render_iptables(BASE, parse_iptables_save(SAVED))
    mangle = text.split("*mangle\n", 1)[1].split("COMMIT", 1)[0].splitlines()
    assert mangle[:3] == [
        ":PODWIRE-CONNMARK - [0:0]",
        ":PODWIRE-CONNMARK-POD - [0:0]",
        ":PODWIRE-OLD - [0:0]",
    ]
    # one of the two identical jumps stays, the duplicate and the stale one go, none is added
    assert sorted(mangle[3:5]) == [
        "-D PREROUTING -i eni+ -j PODWIRE-OLD",
        '-D PREROUTING -m comment --comment "podwire connmark" -j PODWIRE-CONNMARK',
    ]
    assert not any(line.startswith("-A PREROUTING") for line in mangle)
    assert mangle[-1] == "-X PODWIRE-OLD"
    # nat had no jump: it is added, once
    assert text.count("-A POSTROUTING") == 1


def test_iptables_expected_state_round_trips_through_save_format() -> None:
    for spec in CASES.values():
        # restore input for a fresh ruleset is in save format already
        assert parse_iptables_save(render_iptables(spec)) == expected_iptables(spec)


def test_iptables_removal() -> None:
    text = render_iptables_removal(parse_iptables_save(SAVED))
    assert '-D PREROUTING -m comment --comment "podwire connmark" -j PODWIRE-CONNMARK' in text
    assert text.count("-D PREROUTING") == 3
    assert text.index(":PODWIRE-SNAT") < text.index("-X PODWIRE-SNAT")
    assert render_iptables_removal(IptablesOwned()) == ""
    assert "-X PODWIRE-SNAT" in render_iptables_removal()
