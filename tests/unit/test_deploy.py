"""deploy/: the manifests parse and agree with the code they deploy.

Probes hit the paths agent/health.py serves on the configured port; the DaemonSet mounts every
directory the configuration points at (at the host's own paths: the plugin, running on the
host, uses the socket path written in the conflist); the systemd unit is Type=notify with a
watchdog and only the capabilities the agent needs; the example configuration lists every
setting; the IAM policy is exactly the actions the AWS provider may call.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import attrs
import pytest
import yaml  # PyYAML: installed with the test extra (a dependency of moto)

from agent import cli
from agent.config import SECTIONS, VPC_CNI_ALIASES, Config, HealthSection, effective, load
from agent.health import LIVENESS_PATH, READINESS_PATH
from cloud.aws_actions import EC2_ACTIONS, TAGGABLE_RESOURCES, api_names, iam_policy
from cloud.kube.client import ACCESS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"
AGENT_CAPS = {"NET_ADMIN", "NET_RAW", "SYS_ADMIN"}


def docs() -> list[dict[str, Any]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), path
            out.append(doc)
    return out


def kind(name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs() if d["kind"] == name]
    return doc


@pytest.fixture
def pod() -> dict[str, Any]:
    spec: dict[str, Any] = kind("DaemonSet")["spec"]["template"]["spec"]
    return spec


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    (c,) = [c for c in pod["initContainers" if init else "containers"] if c["name"] == name]
    assert isinstance(c, dict)
    return c


def configmap_config(tmp_path: Path) -> Config:
    path = tmp_path / "agent.toml"
    path.write_text(kind("ConfigMap")["data"]["agent.toml"])
    return load(path, {})


def covered(path: str, mounts: list[str]) -> bool:
    p = PurePosixPath(path)
    return any(p.is_relative_to(m) for m in mounts)


# -- Kubernetes -------------------------------------------------------------------------------


def test_manifests_parse_and_are_all_listed() -> None:
    kinds = sorted(d["kind"] for d in docs())
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "CustomResourceDefinition",
        "DaemonSet",
        "Kustomization",
        "ServiceAccount",
    ]
    for d in docs():
        assert d["apiVersion"] and d["kind"]
        cluster_scoped = ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition")
        if d["kind"] not in ("Kustomization", *cluster_scoped):
            assert d["metadata"]["namespace"] == "kube-system"
    listed = set(kind("Kustomization")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_rbac_is_exactly_what_the_agent_uses() -> None:
    # cloud.kube.client.ACCESS lists every (group, resource, verb) the agent's code uses; the
    # ClusterRole grants those and nothing else, to the DaemonSet's service account
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in kind("ClusterRole")["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames, no URLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == {k: set(v) for k, v in ACCESS.items()}
    binding = kind("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": kind("ClusterRole")["metadata"]["name"],
    }
    sa = kind("ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
    ]
    # the account's token is mounted by the pod spec only (never into other pods using it)
    assert kind("ServiceAccount")["automountServiceAccountToken"] is False


def test_security_group_policy_crd_is_eks_api() -> None:
    crd = kind("CustomResourceDefinition")
    assert crd["metadata"]["name"] == "securitygrouppolicies.vpcresources.k8s.aws"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == (
        "vpcresources.k8s.aws",
        "Namespaced",
        "SecurityGroupPolicy",
    )
    assert spec["names"]["shortNames"] == ["sgp"]
    (version,) = spec["versions"]
    assert version["name"] == "v1beta1" and version["served"] and version["storage"]
    props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(props) == {"podSelector", "serviceAccountSelector", "securityGroups"}
    groups = props["securityGroups"]["properties"]["groupIds"]
    assert (groups["minItems"], groups["maxItems"]) == (1, 5)


def test_daemonset_scheduling(pod: dict[str, Any]) -> None:
    ds = kind("DaemonSet")
    assert (
        ds["spec"]["selector"]["matchLabels"].items()
        <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["serviceAccountName"] == kind("ServiceAccount")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True  # [kubernetes]: in-cluster credentials
    env = {e["name"]: e for e in container(pod, "agent")["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_probes_match_the_health_server(pod: dict[str, Any], tmp_path: Path) -> None:
    agent = container(pod, "agent")
    port = HealthSection().port
    assert configmap_config(tmp_path).health.port == port
    paths = {
        "startupProbe": LIVENESS_PATH,
        "livenessProbe": LIVENESS_PATH,
        "readinessProbe": READINESS_PATH,
    }
    for probe, path in paths.items():
        get = agent[probe]["httpGet"]
        # hostNetwork: the pod's IP is the node's, and the agent listens on loopback
        assert (get["host"], get["path"], get["port"]) == ("127.0.0.1", path, port), probe
    assert [p["containerPort"] for p in agent["ports"]] == [port]


def test_agent_container(pod: dict[str, Any], tmp_path: Path) -> None:
    agent = container(pod, "agent")
    args = cli.parser().parse_args(agent["command"][1:])
    assert agent["command"][0] == "podwire-agent" and args.command == "run"
    sc = agent["securityContext"]
    assert set(sc["capabilities"]["add"]) >= AGENT_CAPS and sc["capabilities"]["drop"] == ["ALL"]
    assert not sc.get("privileged", False)
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert covered(str(args.config), list(mounts))
    config_volume = {v["name"]: v for v in pod["volumes"]}[mounts["/etc/podwire"]["name"]]
    assert config_volume["configMap"]["name"] == kind("ConfigMap")["metadata"]["name"]
    cfg = configmap_config(tmp_path)
    assert cfg.cni.install is True  # the agent writes the conflist once ready
    assert cfg.agent.ip_forward is False  # /proc/sys is read-only in this container...
    sysctls = container(pod, "sysctls", init=True)
    assert sysctls["securityContext"]["privileged"] is True  # ...so the init container does it
    assert "net/ipv4/ip_forward" in " ".join(sysctls["command"])


def test_mounts_cover_every_configured_directory(pod: dict[str, Any], tmp_path: Path) -> None:
    agent = container(pod, "agent")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    for m in mounts.values():
        v = volumes[m["name"]]
        if "hostPath" in v:  # the same path on both sides: the conflist names host paths
            assert v["hostPath"]["path"] == m["mountPath"]
    for cfg in (load(None, {"PODWIRE_STATIC_CIDRS": "10.0.1.0/24"}), configmap_config(tmp_path)):
        wanted = [
            str(PurePosixPath(cfg.agent.socket).parent),
            cfg.agent.state_dir,
            cfg.agent.spool_dir,
            cfg.cni.bin_dir,
            cfg.cni.conf_dir,
        ]
        for path in wanted:
            assert covered(path, list(mounts)), path
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    assert "/run/xtables.lock" in mounts
    assert mounts["/lib/modules"]["readOnly"] is True


def test_init_container_installs_the_plugin_only(pod: dict[str, Any]) -> None:
    init = container(pod, "install-plugin", init=True)
    assert init["command"][0] == "podwire-agent"
    args = cli.parser().parse_args(init["command"][1:])
    assert args.command == "install-cni"
    mounts = [m["mountPath"] for m in init["volumeMounts"]]
    assert mounts == ["/opt/cni/bin"] and str(args.bin_dir) == "/opt/cni/bin"
    assert not covered(str(args.conf_dir), mounts)  # the conflist it writes is thrown away


# -- systemd ----------------------------------------------------------------------------------


def unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (DEPLOY / "systemd" / "podwire-agent.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep, raw
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit() -> None:
    service = unit()["Service"]

    def one(key: str) -> str:
        (value,) = service[key]
        return value

    assert one("Type") == "notify"
    assert one("WatchdogSec").endswith("s") and int(one("WatchdogSec")[:-1]) >= 10
    assert one("Restart") == "on-failure" and one("RestartSec")
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        caps = set(one(key).split())
        assert (
            {f"CAP_{c}" for c in AGENT_CAPS}
            <= caps
            <= {f"CAP_{c}" for c in AGENT_CAPS} | {"CAP_CHOWN"}
        )
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict" and one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert set(one("RestrictAddressFamilies").split()) == {
        "AF_UNIX",
        "AF_NETLINK",
        "AF_INET",
        "AF_INET6",
    }
    assert one("RuntimeDirectoryPreserve") == "yes"  # the checkpoint survives a restart
    writable = one("ReadWritePaths").split()
    cfg = load(None, {"PODWIRE_STATIC_CIDRS": "10.0.1.0/24"})
    for path in (
        str(PurePosixPath(cfg.agent.socket).parent),
        cfg.agent.state_dir,
        cfg.agent.spool_dir,
        cfg.cni.bin_dir,
        cfg.cni.conf_dir,
        "/run/netns",
    ):
        assert covered(path, writable), path
    assert one("ExecStart").split()[1:3] == ["run", "--config"]


# -- the example configuration ----------------------------------------------------------------


def test_example_config_lists_every_setting_with_its_default() -> None:
    path = DEPLOY / "agent.toml.example"
    text = path.read_text()
    doc = tomllib.loads(text)
    assert {s: set(body) for s, body in doc.items()} == {
        s: {a.name for a in attrs.fields(cls)} for s, cls in SECTIONS.items()
    }
    example = {name: value for name, value, _ in effective(load(path, {}))}
    defaults = {name: value for name, value, _ in effective(Config())}
    differ = {name for name in defaults if example[name] != defaults[name]}
    assert differ == {"static.cidrs"}  # no usable default: the example shows one
    for section, cls in SECTIONS.items():
        for a in attrs.fields(cls):
            assert f"PODWIRE_{section}_{a.name}".upper() in text, a.name
    for var in VPC_CNI_ALIASES:
        assert var in text


# -- IAM --------------------------------------------------------------------------------------


def statements() -> Iterator[dict[str, Any]]:
    yield from json.loads((DEPLOY / "iam-policy.json").read_text())["Statement"]


def test_iam_policy_is_exactly_the_actions() -> None:
    assert json.loads((DEPLOY / "iam-policy.json").read_text()) == iam_policy()
    granted = [a for s in statements() for a in s["Action"]]
    assert len(granted) == len(set(granted)) and set(granted) == set(EC2_ACTIONS)
    assert all(s["Effect"] == "Allow" for s in statements())
    for s in statements():
        if "ec2:CreateTags" in s["Action"]:
            assert s["Resource"] == list(TAGGABLE_RESOURCES)
            assert all(":network-interface/" in r for r in s["Resource"])
        else:
            assert not any(a.startswith("ec2:CreateTags") for a in s["Action"])


def test_the_aws_provider_calls_nothing_outside_the_policy() -> None:
    ec2 = pytest.importorskip("cloud.aws.ec2")
    used = getattr(ec2, "EC2_ACTIONS_USED", None)
    if used is None:
        pytest.skip("the AWS provider does not list its actions")
    assert set(used) <= api_names()
