"""``podwire-agent install-cni``: the conflist a runtime reads, and what it checks first."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent import cli
from agent.config import ConfigError, load
from agent.install import InstallError, check_chain, conflist, install


def doc(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"socket": "/run/s", "spool_dir": "/run/sp", "mtu": None, "chain": []}
    return conflist(**{**base, **kw})  # type: ignore[arg-type]


def test_the_default_is_what_containerd_1_6_needs() -> None:
    d = doc()
    assert d["cniVersion"] == "1.0.0" and d["name"] == "podwire"
    [plugin] = d["plugins"]  # type: ignore[misc]
    assert plugin["capabilities"] == {"io.kubernetes.cri.pod-annotations": True, "ips": True}


def test_name_version_and_capabilities_are_settable() -> None:
    d = doc(
        name="pods",
        cni_version="0.4.0",
        chain=["portmap", "bandwidth"],
        capabilities=["io.kubernetes.cri.pod-annotations", "portMappings", "bandwidth"],
    )
    assert (d["name"], d["cniVersion"]) == ("pods", "0.4.0")
    podwire, portmap, bandwidth = d["plugins"]  # type: ignore[misc]
    assert podwire["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}
    assert portmap["capabilities"] == {"portMappings": True}
    assert bandwidth["capabilities"] == {"bandwidth": True}
    assert "capabilities" not in doc(capabilities=[])["plugins"][0]  # type: ignore[index]


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({"capabilities": ["portMappings"]}, "add portmap to the chain"),
        ({"capabilities": ["mac"]}, "unknown capability 'mac'"),
        ({"name": "no spaces"}, "not a valid CNI network name"),
        ({"cni_version": "0.3.1"}, "expected one of"),
    ],
)
def test_a_conflist_that_would_not_work_is_refused(kw: dict[str, object], text: str) -> None:
    with pytest.raises(InstallError, match=text):
        doc(**kw)


def test_chained_plugins_must_be_in_the_bin_dir(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="'portmap' is not an executable"):
        check_chain(tmp_path, ["portmap"])
    (tmp_path / "portmap").write_text("#!/bin/sh\n")
    with pytest.raises(InstallError):
        check_chain(tmp_path, ["portmap"])  # not executable
    (tmp_path / "portmap").chmod(0o755)
    check_chain(tmp_path, ["portmap"])


def test_the_cli_writes_nothing_when_a_chained_plugin_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    base = ["install-cni", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir)]
    assert cli.main([*base, "--chain", "portmap"]) == 2
    assert "'portmap' is not an executable" in capsys.readouterr().err
    assert not bin_dir.exists() and not conf_dir.exists()
    args = ["--name", "k8s-pods", "--cni-version", "1.0.0", "--capabilities", "ips"]
    assert cli.main([*base, *args]) == 0
    written = json.loads((conf_dir / "10-podwire.conflist").read_text())
    assert written["name"] == "k8s-pods"
    assert written["plugins"][0]["capabilities"] == {"ips": True}


def test_install_is_idempotent(tmp_path: Path) -> None:
    kw = {"bin_dir": tmp_path / "b", "conf_dir": tmp_path / "c", "socket": "/s", "spool_dir": "/p"}
    assert len(install(**kw)) == 2  # type: ignore[arg-type]
    assert install(**kw) == []  # type: ignore[arg-type]


def test_the_cni_section_is_checked_at_start(tmp_path: Path) -> None:
    env = {"PODWIRE_STATIC_CIDRS": "10.0.1.0/24"}
    toml = tmp_path / "agent.toml"
    toml.write_text('[cni]\nnetwork_name = "pods"\ncapabilities = []\n')
    cfg = load(toml, env)
    assert cfg.cni.network_name == "pods" and cfg.cni.capabilities == ()
    with pytest.raises(ConfigError) as e:
        load(None, {**env, "PODWIRE_CNI_CAPABILITIES": "bandwidth"})
    assert e.value.setting == "cni.capabilities" and "add bandwidth to the chain" in e.value.reason
    with pytest.raises(ConfigError) as e:
        load(None, {**env, "PODWIRE_CNI_CNI_VERSION": "0.3.0"})
    assert e.value.setting == "cni.cni_version"


def test_the_installed_plugin_is_precompiled_and_still_runs_on_another_interpreter(
    tmp_path: Path,
) -> None:
    kw = {"bin_dir": tmp_path / "b", "conf_dir": tmp_path / "c", "socket": "/s", "spool_dir": "/p"}
    install(**kw, interpreter="/usr/bin/python3")  # type: ignore[arg-type]
    plugin = tmp_path / "b" / "podwire"
    text = plugin.read_text()
    assert text.startswith("#!/usr/bin/python3 -IS\n") and "marshal.loads(bytes.fromhex('" in text

    def version() -> object:
        out = subprocess.run(
            [str(plugin)],
            env={"CNI_COMMAND": "VERSION"},
            input=b'{"cniVersion": "0.4.0"}',
            capture_output=True,
            check=True,
        ).stdout
        return json.loads(out)

    want = {"cniVersion": "0.4.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}
    assert version() == want
    # as if the node's python3 were upgraded since: the embedded source is compiled instead
    plugin.write_text(text.replace("sys.hexversion >> 16 == ", "sys.hexversion >> 16 == 1 + "))
    assert version() == want
