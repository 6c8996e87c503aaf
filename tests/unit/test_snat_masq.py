"""SNAT on GKE: ip-masq-agent's non-masquerade set as the destinations reached without NAT."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from agent.config import ConfigError, SnatSection, load
from agent.snat.masq import IpMasqPolicy, ip_masq_facts, non_masquerade_cidrs
from agent.snat.rules import render_nft
from agent.snat.service import desired_spec
from cloud.provider import NodeFacts


def nets(*texts: str) -> tuple[IPv4Network, ...]:
    return tuple(IPv4Network(t) for t in texts)


RFC1918_AND_LINK_LOCAL = nets("10.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16")


def test_defaults_are_rfc1918_and_link_local() -> None:
    assert non_masquerade_cidrs(IpMasqPolicy()) == RFC1918_AND_LINK_LOCAL


def test_masq_link_local_masquerades_link_local_and_configured_cidrs_add() -> None:
    policy = IpMasqPolicy(non_masquerade_cidrs=nets("198.51.100.0/24"), masq_link_local=True)
    assert non_masquerade_cidrs(policy) == nets(
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "198.51.100.0/24"
    )
    # an explicit link-local entry wins over masqLinkLocal, as in ip-masq-agent
    explicit = IpMasqPolicy(non_masquerade_cidrs=nets("169.254.0.0/16"), masq_link_local=True)
    assert IPv4Network("169.254.0.0/16") in non_masquerade_cidrs(explicit)


def test_gke_spec_keeps_the_node_ranges_even_outside_rfc1918() -> None:
    facts = NodeFacts(
        primary_ip=IPv4Address("10.0.0.5"),
        vpc_cidrs=nets("10.0.0.0/20"),
        pod_cidrs=nets("100.64.1.0/24"),  # privately used public range
    )
    spec = desired_spec(
        SnatSection(), ip_masq_facts(facts, IpMasqPolicy()), nets("100.64.1.0/24"), external=False
    )
    assert spec.node_ip == IPv4Address("10.0.0.5")
    assert spec.pod_cidrs == nets("100.64.1.0/24")
    assert spec.vpc_cidrs == nets(
        "10.0.0.0/8", "100.64.1.0/24", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"
    )
    script = render_nft(spec)
    assert "add element ip podwire vpc_cidrs { 10.0.0.0/8, 100.64.1.0/24" in script
    assert "snat to 10.0.0.5 fully-random" in script


def test_gce_settings_and_their_environment_names(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[provider]\nkind = "gce"\n[gce]\nnonMasqueradeCIDRs = ["198.51.100.0/24"]\n'
        "masqLinkLocal = true\nwatch_timeout = 30\n"
    )
    cfg = load(path, {"PODWIRE_GCE_METADATA_URL": "http://127.0.0.1:8080/computeMetadata/v1"})
    assert cfg.gce.nonMasqueradeCIDRs == nets("198.51.100.0/24") and cfg.gce.masqLinkLocal
    assert cfg.gce.metadata_url.startswith("http://127.0.0.1:8080") and cfg.mtu == 1460
    env = {"PODWIRE_GCE_NONMASQUERADECIDRS": "192.0.2.0/24,198.18.0.0/15"}
    assert load(path, env).gce.nonMasqueradeCIDRs == nets("192.0.2.0/24", "198.18.0.0/15")


@pytest.mark.parametrize(
    ("body", "setting"),
    [
        ('nonMasqueradeCIDRs = ["10.0.0.1/8"]', "gce.nonMasqueradeCIDRs"),
        ('metadata_url = "metadata.google.internal"', "gce.metadata_url"),
        ("watch_timeout = 0", "gce.watch_timeout"),
        ("network_interface = -1", "gce.network_interface"),
        ("retry_base = 5.0\nretry_cap = 1.0", "gce.retry_cap"),
        ("masqlinklocal = true", "gce.masqlinklocal"),
    ],
)
def test_bad_gce_settings_name_the_setting(tmp_path: Path, body: str, setting: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[provider]\nkind = "gce"\n[gce]\n{body}\n')
    with pytest.raises(ConfigError) as e:
        load(path, {})
    assert e.value.setting == setting
