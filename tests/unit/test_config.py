from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path

import pytest

from agent.config import ConfigError, effective, load


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_file_env_and_aliases(tmp_path: Path) -> None:
    path = write(tmp_path, '[static]\ncidrs = ["10.0.1.0/24"]\n[ipam]\ncooldown = 10\n')
    cfg = load(path, {"IP_COOLDOWN_PERIOD": "5", "PODWIRE_AGENT_MTU": "1400"})
    assert cfg.static.cidrs == (IPv4Network("10.0.1.0/24"),)
    assert cfg.ipam.cooldown == 5.0 and cfg.mtu == 1400
    sources = {name: src for name, _, src in effective(cfg)}
    assert sources["static.cidrs"] == str(path)
    assert sources["ipam.cooldown"] == "env IP_COOLDOWN_PERIOD"
    assert sources["agent.socket"] == "default"


def test_env_lists_and_defaults(tmp_path: Path) -> None:
    cfg = load(None, {"PODWIRE_STATIC_CIDRS": "10.0.1.0/24, 10.0.2.0/24"})
    assert len(cfg.static.cidrs) == 2 and cfg.mtu == 1500 and cfg.ipam.cooldown == 30.0


@pytest.mark.parametrize(
    ("text", "env", "setting"),
    [
        ("[static]\ncidrs = []\n", {}, "static.cidrs"),
        ('[static]\ncidrs = ["10.0.1.0/24", "10.0.1.128/25"]\n', {}, "static.cidrs"),
        ('[static]\ncidrs = ["10.0.1.0/33"]\n', {}, "static.cidrs"),
        ('[static]\ncidrs = ["10.0.1.0/24"]\n[agent]\nmtu = 70000\n', {}, "agent.mtu"),
        ('[static]\ncidrs = ["10.0.1.0/24"]\n[agent]\nsocket = "rel.sock"\n', {}, "agent.socket"),
        ('[static]\ncidrs = ["10.0.1.0/24"]\n[agent]\nfrobnicate = 1\n', {}, "agent.frobnicate"),
        ('[static]\ncidrs = ["10.0.1.0/24"]\n[nope]\n', {}, "nope"),
        ('[static]\ncidrs = ["10.0.1.0/24"]\n', {"IP_COOLDOWN_PERIOD": "soon"}, "ipam.cooldown"),
        ('[static]\ncidrs = ["10.0.1.0/24"]\n', {"PODWIRE_PROVIDER_KIND": "gcp"}, "provider.kind"),
        (
            '[static]\ncidrs = ["10.0.1.0/24"]\n',
            {"PODWIRE_AGENT_IP_FORWARD": "maybe"},
            "agent.ip_forward",
        ),
        ("not toml [", {}, "--config"),
        # gone: branch frames are 802.1Q (a VLAN device, or a veth tagged by eBPF)
        ('[security_groups]\nbranch_link = "macvlan"\n', {}, "security_groups.branch_link"),
    ],
)
def test_bad_settings_name_the_setting(
    tmp_path: Path, text: str, env: dict[str, str], setting: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text), env)
    assert e.value.setting == setting
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "none.toml", {})


def test_agent_stops_with_one_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path, '[static]\ncidrs = ["10.0.1.0/24"]\n[agent]\nmtu = 70000\n')
    agent = Path(sys.executable).parent / "podwire-agent"
    proc = subprocess.run(
        [str(agent), "run", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "podwire-agent: invalid setting agent.mtu: 70000 is outside 576..65535"
    ]


# -- [health] and [cni] -------------------------------------------------------------------------

STATIC = '[static]\ncidrs = ["10.0.1.0/24"]\n'


def test_health_and_cni_defaults() -> None:
    cfg = load(None, {"PODWIRE_STATIC_CIDRS": "10.0.1.0/24"})
    assert (cfg.health.address, cfg.health.port) == ("127.0.0.1", 61680)
    assert cfg.cni.install is False and cfg.cni.chain == ()
    assert (cfg.cni.bin_dir, cfg.cni.conf_dir) == ("/opt/cni/bin", "/etc/cni/net.d")
    sources = {name: src for name, _, src in effective(cfg)}
    assert sources["health.port"] == "default" and sources["cni.chain"] == "default"


def test_health_and_cni_from_file_and_env(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        STATIC + '[health]\naddress = "0.0.0.0"\nport = 0\n'
        '[cni]\ninstall = true\nchain = ["portmap", "bandwidth"]\n',
    )
    cfg = load(path, {"PODWIRE_HEALTH_PORT": "9100", "PODWIRE_CNI_CONF_DIR": "/etc/cni/other"})
    assert (cfg.health.address, cfg.health.port) == ("0.0.0.0", 9100)
    assert cfg.cni.install is True and cfg.cni.chain == ("portmap", "bandwidth")
    assert cfg.cni.conf_dir == "/etc/cni/other"
    cfg = load(path, {"PODWIRE_CNI_CHAIN": "portmap", "PODWIRE_CNI_INSTALL": "no"})
    assert cfg.cni.chain == ("portmap",) and cfg.cni.install is False and cfg.health.port == 0
    values = {name: (value, src) for name, value, src in effective(cfg)}
    assert values["cni.chain"] == (["portmap"], "env PODWIRE_CNI_CHAIN")
    assert values["health.address"] == ("0.0.0.0", str(path))


@pytest.mark.parametrize(
    ("text", "env", "setting"),
    [
        (STATIC + '[health]\naddress = "localhost"\n', {}, "health.address"),
        (STATIC + "[health]\nport = 70000\n", {}, "health.port"),
        (STATIC, {"PODWIRE_HEALTH_PORT": "-1"}, "health.port"),
        (STATIC, {"PODWIRE_HEALTH_PORT": "http"}, "health.port"),
        (STATIC + '[cni]\nbin_dir = "opt/cni/bin"\n', {}, "cni.bin_dir"),
        (STATIC, {"PODWIRE_CNI_CONF_DIR": "net.d"}, "cni.conf_dir"),
        (STATIC + '[cni]\nchain = ["portmap", "../evil"]\n', {}, "cni.chain"),
        (STATIC + "[cni]\nchain = 3\n", {}, "cni.chain"),
        (STATIC + '[cni]\ninstall = "sometimes"\n', {}, "cni.install"),
        (STATIC + "[health]\nmetrics_port = 61678\n", {}, "health.metrics_port"),
    ],
)
def test_bad_health_and_cni_settings(
    tmp_path: Path, text: str, env: dict[str, str], setting: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text), env)
    assert e.value.setting == setting
    assert "\n" not in str(e.value)
