"""Agent configuration: a TOML file, then environment overrides, then checks.

Every setting has a dotted name (``static.cidrs``) and can be overridden by
``PODWIRE_<SECTION>_<KEY>`` (``PODWIRE_STATIC_CIDRS=10.0.1.0/24,10.0.2.0/24``). The pool and
SNAT knobs also accept Amazon VPC CNI's variable names so a cluster can move over without
rewriting its settings. Where each effective value came from is kept for ``agentctl config``.
A bad setting raises ConfigError naming the setting and the reason: the agent prints that one
line and stops.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any, Literal

import attrs

from agent.pool.pool_math import PoolConfigError, PoolTargets

DEFAULT_PATH = Path("/etc/podwire/agent.toml")


class ConfigError(Exception):
    """A setting is invalid; ``setting`` is its dotted name."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"invalid setting {setting}: {reason}")
        self.setting = setting
        self.reason = reason


@attrs.frozen(kw_only=True)
class AgentSection:
    socket: str = "/run/podwire/agent.sock"
    state_dir: str = "/run/podwire"
    spool_dir: str = "/run/podwire/spool"
    socket_group: str = ""
    request_timeout: float = 30.0
    mtu: int = 0  # 0: 9001 on aws (jumbo frames in a VPC), 1500 otherwise
    ip_forward: bool = True
    repair: bool = True  # put back a pod's host route, rules or veth state someone removed
    add_wait: float = 2.0  # how long an ADD waits for the pool to grow before code 11
    # The socket: connections beyond max_connections close the longest-idle one (or are refused
    # when all are busy); idle ones close after idle_timeout, slow ones after read_timeout.
    max_connections: int = 512
    idle_timeout: float = 30.0
    read_timeout: float = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = "auto"


@attrs.frozen(kw_only=True)
class ProviderSection:
    kind: Literal["static", "aws", "gce"] = "static"


@attrs.frozen(kw_only=True)
class StaticSection:
    cidrs: tuple[IPv4Network, ...] = ()
    reserved: tuple[IPv4Address, ...] = ()
    # "config": the cidrs above; "node": the Node's spec.podCIDRs (GKE routes-based, kubenet),
    # followed as they change (needs [kubernetes] enabled)
    source: Literal["config", "node"] = "config"


@attrs.frozen(kw_only=True)
class IpamSection:
    cooldown: float = 30.0


@attrs.frozen(kw_only=True)
class HealthSection:
    # One HTTP listener answers /healthz, /readyz and /metrics (agent/health.py). Loopback by
    # default: kubelet probes a hostNetwork pod at 127.0.0.1. Set 0.0.0.0 (or the node IP) to
    # let Prometheus scrape /metrics from elsewhere. Port 0: any free port (logged at start).
    address: str = "127.0.0.1"
    port: int = 61680


@attrs.frozen(kw_only=True)
class CniSection:
    # With install = true the agent writes the plugin and the conflist once it is ready, so the
    # node is never reported network-ready before a pod can get an address.
    install: bool = False
    bin_dir: str = "/opt/cni/bin"
    conf_dir: str = "/etc/cni/net.d"
    chain: tuple[str, ...] = ()  # plugins chained after podwire, e.g. ["portmap", "bandwidth"]
    # The conflist: its network name and version (containerd 1.6 needs 1.0.0) and the
    # capabilities podwire declares (a chained portmap or bandwidth declares its own).
    network_name: str = "podwire"
    cni_version: Literal["0.4.0", "1.0.0", "1.1.0"] = "1.0.0"
    capabilities: tuple[str, ...] = ("io.kubernetes.cri.pod-annotations", "ips")


@attrs.frozen(kw_only=True)
class SnatSection:
    # Egress SNAT of pod traffic leaving the VPC, in one nftables table of the agent's own
    # (iptables-restore where nftables is missing). external = true leaves SNAT to something
    # else (a NAT gateway); it can also be switched at run time with `agentctl snat`.
    enabled: bool = True
    external: bool = False
    mode: Literal["random-fully", "hashrandom", "none", "prng"] = "random-fully"
    exclude_cidrs: tuple[IPv4Network, ...] = ()
    vpc_cidrs: tuple[IPv4Network, ...] = ()  # static provider: destinations reached without NAT
    node_ip: str = ""  # static provider: "" means the address of primary_interface
    primary_interface: str = "eth0"
    backend: Literal["auto", "nftables", "iptables"] = "auto"
    verify_interval: float = 60.0


@attrs.frozen(kw_only=True)
class AwsSection:
    # Where the node learns about itself and reaches EC2 ("" = the SDK's default endpoint and
    # the region of the node's availability zone). Credentials come from the SDK's usual chain.
    imds_url: str = "http://169.254.169.254"
    ec2_endpoint: str = ""
    region: str = ""
    cluster_name: str = ""
    subnet_id: str = ""  # new ENIs' subnet; "" = the primary ENI's
    security_groups: tuple[str, ...] = ()  # new ENIs' groups; () = the primary ENI's
    # The warm pool (Amazon VPC CNI's knobs; 0 = unset)
    warm_eni_target: int = 1
    warm_ip_target: int = 0
    minimum_ip_target: int = 0
    warm_prefix_target: int = 1
    prefix_delegation: bool = False
    max_eni: int = 0
    # EC2 calls: a token bucket, then jittered exponential backoff on throttling and 5xx
    ec2_rate: float = 10.0
    ec2_burst: int = 20
    retry_base: float = 0.1
    retry_cap: float = 5.0
    retry_attempts: int = 6
    call_timeout: float = 10.0
    call_deadline: float = 60.0
    # The refiller and the ENI workflows
    refill_interval: float = 5.0
    min_eni_age: float = 60.0
    release_interval: float = 30.0
    exhaustion_pause: float = 120.0
    reconcile_interval: float = 60.0  # re-read the node's ENIs from EC2 to catch drift
    link_timeout: float = 60.0
    leak_cleanup: bool = True
    leak_grace: float = 300.0
    leak_interval: float = 3600.0


@attrs.frozen(kw_only=True)
class GceSection:
    # GKE VPC-native: pod addresses are the alias IP ranges of the node's NIC, read from the GCE
    # metadata server (metadata.google.internal is this address) and followed as they change.
    metadata_url: str = "http://169.254.169.254/computeMetadata/v1"
    network_interface: int = 0
    reserved: tuple[IPv4Address, ...] = ()  # never handed to a pod, even inside a range
    watch_timeout: int = 60  # timeout_sec of each wait_for_change long poll
    request_timeout: float = 5.0
    retry_base: float = 1.0  # backoff while the metadata server is unreachable
    retry_cap: float = 30.0
    # SNAT as ip-masq-agent (its names): destinations in nonMasqueradeCIDRs keep the pod's
    # address (added to RFC 1918, the node's subnet and ranges, and link-local unless
    # masqLinkLocal); everything else leaves as the node's address.
    nonMasqueradeCIDRs: tuple[IPv4Network, ...] = ()
    masqLinkLocal: bool = False


@attrs.frozen(kw_only=True)
class KubernetesSection:
    # The agent's own view of the cluster: its node's pods, its Node, and with security groups
    # for pods the SecurityGroupPolicy objects and the ServiceAccounts their selectors need.
    # Off, podwire is a complete CNI without the API (groups from annotations only).
    enabled: bool = False
    kubeconfig: str = ""  # "": in-cluster, the pod's service account
    service_account_dir: str = "/var/run/secrets/kubernetes.io/serviceaccount"
    node_name: str = ""  # "": $NODE_NAME (the DaemonSet sets it from spec.nodeName), hostname
    request_timeout: float = 10.0
    watch_session: float = 300.0  # each watch is re-made from its resourceVersion this often
    retry_base: float = 1.0  # backoff while the API server cannot be reached
    retry_cap: float = 30.0
    pod_wait: float = 5.0  # an ADD waits this long for its pod to reach the agent's cache


@attrs.frozen(kw_only=True)
class SecurityGroupsSection:
    # Security groups for pods (aws provider): a trunk ENI, one branch ENI per pod that has
    # groups (annotations, SecurityGroupPolicy), reached over vlan.eth.<vlan id>.
    enabled: bool = False  # ENABLE_POD_ENI
    enforcing_mode: Literal["strict", "standard"] = "strict"  # POD_SECURITY_GROUP_ENFORCING_MODE
    # "agent": the agent creates and associates branch ENIs itself (the emulator, accounts
    # allowed to call AssociateTrunkInterface); "controller": EKS's resource controller does,
    # the agent only wires the branch it names in the pod's vpc.amazonaws.com/pod-eni.
    branches: Literal["agent", "controller"] = "agent"
    branch_cooldown: float = 60.0  # a deleted pod's branch waits this long before deletion
    max_branches: int = 0  # 0: the instance type's branch limit
    # "vlan": the branch's frames cross the trunk 802.1Q-tagged (what EC2 needs), through a
    # VLAN device, or where the kernel has none a veth tagged by eBPF (chosen at start).
    branch_link: Literal["vlan"] = "vlan"
    branch_wait: float = 20.0  # an ADD waits this long for its branch, then answers code 11
    branch_deadline: float = 120.0  # create + associate, or disassociate + delete
    # The same choice as ``branches``, by issue 12's names: "eks" = "controller" (EKS's resource
    # controller makes the branches; with [kubernetes], the agent asks for them on its CNINode
    # as aws-node does), "agent" = "agent"; "" = as ``branches`` says.
    branch_source: Literal["", "agent", "eks"] = ""
    trunk_retry: float = 30.0  # how often a missing trunk ENI is looked for again
    # "branch": a branch ENI per pod on the trunk (above); "eni": pods asking for the same set
    # of groups share secondary ENIs made with exactly that set (public EC2 calls only; an ADD
    # waits branch_wait for its set's address). The set_* knobs and shared_reserve are eni's.
    mode: Literal["branch", "eni"] = "branch"
    set_warm_ips: int = 1  # free addresses each set in use keeps for its next pod
    set_cooldown: float = 60.0  # a set whose last pod left keeps its ENI this long (then it goes)
    shared_reserve: int = 1  # ENI slots besides the primary that sets never take (ordinary pods')


@attrs.frozen(kw_only=True)
class GcSection:
    # Garbage collection: looks every interval, and at once when a pod's host veth vanishes.
    interval: float = 60.0
    missing_grace: float = 10.0  # a pod whose netns or veth is gone, before its IP is released
    orphan_grace: float = 60.0  # a netns no process holds, before it is torn down; 0 = never
    own_netns_mounts: bool = False  # also unmount such namespaces (only when the agent owns them)
    netns_dirs: tuple[str, ...] = ("/run/netns",)


@attrs.frozen(kw_only=True)
class Config:
    agent: AgentSection = AgentSection()
    provider: ProviderSection = ProviderSection()
    static: StaticSection = StaticSection()
    ipam: IpamSection = IpamSection()
    health: HealthSection = HealthSection()
    cni: CniSection = CniSection()
    snat: SnatSection = SnatSection()
    aws: AwsSection = AwsSection()
    gc: GcSection = GcSection()
    gce: GceSection = GceSection()
    kubernetes: KubernetesSection = KubernetesSection()
    security_groups: SecurityGroupsSection = SecurityGroupsSection()
    sources: Mapping[str, str] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def mtu(self) -> int:
        if self.agent.mtu:
            return self.agent.mtu
        if self.provider.kind == "gce":
            return 1460  # the MTU of a GCE VPC unless it was created otherwise
        return 9001 if self.provider.kind == "aws" else 1500

    @property
    def state_path(self) -> Path:
        return Path(self.agent.state_dir) / "state.json"


SECTIONS: dict[str, type[Any]] = {
    "agent": AgentSection,
    "provider": ProviderSection,
    "static": StaticSection,
    "ipam": IpamSection,
    "health": HealthSection,
    "cni": CniSection,
    "snat": SnatSection,
    "aws": AwsSection,
    "gc": GcSection,
    "gce": GceSection,
    "kubernetes": KubernetesSection,
    "security_groups": SecurityGroupsSection,
}

# Amazon VPC CNI variable -> (setting, converter of its value)
VPC_CNI_ALIASES: dict[str, str] = {
    "IP_COOLDOWN_PERIOD": "ipam.cooldown",
    "AWS_VPC_ENI_MTU": "agent.mtu",
    "AWS_VPC_K8S_CNI_EXTERNALSNAT": "snat.external",
    "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": "snat.exclude_cidrs",
    "AWS_VPC_K8S_CNI_RANDOMIZESNAT": "snat.mode",
    "WARM_ENI_TARGET": "aws.warm_eni_target",
    "WARM_IP_TARGET": "aws.warm_ip_target",
    "MINIMUM_IP_TARGET": "aws.minimum_ip_target",
    "WARM_PREFIX_TARGET": "aws.warm_prefix_target",
    "ENABLE_PREFIX_DELEGATION": "aws.prefix_delegation",
    "MAX_ENI": "aws.max_eni",
    "CLUSTER_NAME": "aws.cluster_name",
    "ENABLE_POD_ENI": "security_groups.enabled",
    "POD_SECURITY_GROUP_ENFORCING_MODE": "security_groups.enforcing_mode",
    "BRANCH_ENI_COOLDOWN": "security_groups.branch_cooldown",
}


def _fields(section: str) -> dict[str, attrs.Attribute[Any]]:
    return {a.name: a for a in attrs.fields(SECTIONS[section])}


def _convert(setting: str, attr: attrs.Attribute[Any], value: Any) -> Any:
    """Turn a TOML or environment value into the field's type; raises ConfigError."""
    typ = str(attr.type)  # a string: the module uses postponed annotations
    text = isinstance(value, str)
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            if text and value.lower() in ("1", "true", "yes", "on"):
                return True
            if text and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if typ == "str" or (isinstance(typ, str) and typ.startswith("Literal")):
            if not isinstance(value, str):
                raise ValueError("expected a string")
            if typ.startswith("Literal"):
                allowed = [v.strip().strip("'\"") for v in typ[len("Literal[") : -1].split(",")]
                if value not in allowed:
                    raise ValueError(f"expected one of {', '.join(allowed)}")
            return value
        if typ.startswith("tuple["):
            items = [v.strip() for v in value.split(",") if v.strip()] if text else value
            if not isinstance(items, list | tuple):
                raise ValueError("expected a list")
            inner = typ[len("tuple[") :].split(",")[0]
            make = {"IPv4Network": IPv4Network, "IPv4Address": IPv4Address, "str": str}[inner]
            return tuple(make(str(v)) for v in items)
    except ValueError as e:
        raise ConfigError(setting, f"{value!r}: {e}") from None
    raise ConfigError(setting, f"unsupported type {typ}")  # pragma: no cover


def load(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from ``path`` (None: defaults only) and ``environ``.

    Raises ConfigError for an unreadable file, an unknown setting or a bad value.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    sources: dict[str, str] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("--config", f"{path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError("--config", f"{path}: {e}") from None
        for section, body in doc.items():
            if section not in SECTIONS:
                raise ConfigError(section, "unknown section")
            if not isinstance(body, dict):
                raise ConfigError(section, "expected a table")
            fields = _fields(section)
            for key, value in body.items():
                setting = f"{section}.{key}"
                if key not in fields:
                    raise ConfigError(setting, "unknown setting")
                raw[section][key] = _convert(setting, fields[key], value)
                sources[setting] = str(path)
    for var, setting in VPC_CNI_ALIASES.items():
        if environ.get(var, "") != "":
            section, key = setting.split(".")
            raw[section][key] = _convert(setting, _fields(section)[key], environ[var])
            sources[setting] = f"env {var}"
    for section in SECTIONS:
        for key, attr in _fields(section).items():
            var = f"PODWIRE_{section}_{key}".upper()
            if environ.get(var, "") != "":
                setting = f"{section}.{key}"
                raw[section][key] = _convert(setting, attr, environ[var])
                sources[setting] = f"env {var}"
    source = raw["security_groups"].get("branch_source", "")
    if source:
        branches = "controller" if source == "eks" else "agent"
        if raw["security_groups"].setdefault("branches", branches) != branches:
            raise ConfigError(
                "security_groups.branch_source", f"{source!r} contradicts security_groups.branches"
            )
    cfg = Config(**{s: SECTIONS[s](**raw[s]) for s in SECTIONS}, sources=sources)
    _check(cfg)
    return cfg


def pool_targets(cfg: Config) -> PoolTargets:
    """The warm-pool targets of the ``[aws]`` section; raises ConfigError naming the setting."""
    aws = cfg.aws
    names = {
        "WARM_ENI_TARGET": "warm_eni_target",
        "WARM_IP_TARGET": "warm_ip_target",
        "MINIMUM_IP_TARGET": "minimum_ip_target",
        "WARM_PREFIX_TARGET": "warm_prefix_target",
        "MAX_ENI": "max_eni",
        "ENABLE_PREFIX_DELEGATION": "prefix_delegation",
    }
    try:
        return PoolTargets(
            warm_eni=aws.warm_eni_target,
            warm_ip=aws.warm_ip_target,
            minimum_ip=aws.minimum_ip_target,
            warm_prefix=aws.warm_prefix_target,
            max_eni=aws.max_eni or None,
            prefix_mode=aws.prefix_delegation,
        )
    except PoolConfigError as e:
        setting = names.get(e.setting, e.setting)
        raise ConfigError(f"aws.{setting}", f"{e.value!r}: {e.problem}") from None


def _check(cfg: Config) -> None:
    a = cfg.agent
    if cfg.provider.kind == "aws":
        pool_targets(cfg)
    if a.request_timeout <= 0:
        raise ConfigError("agent.request_timeout", "must be positive")
    if a.mtu and not 576 <= a.mtu <= 65535:
        raise ConfigError("agent.mtu", f"{a.mtu} is outside 576..65535")
    if a.max_connections < 1:
        raise ConfigError("agent.max_connections", "must be at least 1")
    for name in ("idle_timeout", "read_timeout"):
        if getattr(a, name) <= 0:
            raise ConfigError(f"agent.{name}", "must be positive")
    if a.add_wait < 0 or a.add_wait >= a.request_timeout:
        raise ConfigError("agent.add_wait", "must be at least 0 and below agent.request_timeout")
    if not a.socket.startswith("/"):
        raise ConfigError("agent.socket", "must be an absolute path")
    if cfg.ipam.cooldown < 0:
        raise ConfigError("ipam.cooldown", "must not be negative")
    if cfg.provider.kind == "static" and cfg.static.source == "config" and not cfg.static.cidrs:
        raise ConfigError("static.cidrs", "the static provider needs at least one pod CIDR")
    if cfg.static.source == "node":
        if not cfg.kubernetes.enabled:
            raise ConfigError("static.source", '"node" needs kubernetes.enabled')
        if cfg.static.cidrs:
            raise ConfigError("static.cidrs", 'must be empty with static.source = "node"')
    _check_kubernetes(cfg.kubernetes)
    _check_health(cfg.health)
    _check_cni(cfg.cni)
    _check_gce(cfg.gce)
    _check_security_groups(cfg)
    nets = cfg.static.cidrs
    for i, n in enumerate(nets):
        for m in nets[i + 1 :]:
            if n.overlaps(m):
                raise ConfigError("static.cidrs", f"{n} overlaps {m}")


def _check_kubernetes(k: KubernetesSection) -> None:
    for setting, value in (
        ("kubernetes.request_timeout", k.request_timeout),
        ("kubernetes.watch_session", k.watch_session),
        ("kubernetes.retry_base", k.retry_base),
    ):
        if value <= 0:
            raise ConfigError(setting, "must be positive")
    if k.retry_cap < k.retry_base:
        raise ConfigError("kubernetes.retry_cap", "must be at least kubernetes.retry_base")
    if k.pod_wait < 0:
        raise ConfigError("kubernetes.pod_wait", "must not be negative")


def node_name(k: KubernetesSection, environ: Mapping[str, str] | None = None) -> str:
    """The Node this agent runs on: the setting, else $NODE_NAME, else the hostname as kubelet
    registers it (lower case)."""
    env = os.environ if environ is None else environ
    return k.node_name or env.get("NODE_NAME", "") or socket.gethostname().lower()


def _check_health(h: HealthSection) -> None:
    try:
        ip_address(h.address)
    except ValueError:
        raise ConfigError("health.address", f"{h.address!r} is not an IP address") from None
    if not 0 <= h.port <= 65535:
        raise ConfigError("health.port", f"{h.port} is outside 0..65535")


def _check_gce(g: GceSection) -> None:
    if not g.metadata_url.startswith(("http://", "https://")):
        raise ConfigError("gce.metadata_url", f"{g.metadata_url!r} is not an http(s) URL")
    if g.network_interface < 0:
        raise ConfigError("gce.network_interface", "must not be negative")
    if not 1 <= g.watch_timeout <= 3600:
        raise ConfigError("gce.watch_timeout", f"{g.watch_timeout} is outside 1..3600")
    if g.request_timeout <= 0:
        raise ConfigError("gce.request_timeout", "must be positive")
    if g.retry_base <= 0 or g.retry_cap < g.retry_base:
        raise ConfigError("gce.retry_cap", "retry_base must be positive and retry_cap at least it")


def _check_security_groups(cfg: Config) -> None:
    sg = cfg.security_groups
    if not sg.enabled:
        return
    if cfg.provider.kind != "aws":
        raise ConfigError("security_groups.enabled", "security groups for pods need provider aws")
    if sg.branch_cooldown < 0:
        raise ConfigError("security_groups.branch_cooldown", "must not be negative")
    if not 0 <= sg.max_branches <= 4094:
        raise ConfigError("security_groups.max_branches", "must be 0..4094 (0: the type's limit)")
    if sg.branch_wait < 0 or sg.branch_wait >= cfg.agent.request_timeout:
        raise ConfigError(
            "security_groups.branch_wait", "must be at least 0 and below agent.request_timeout"
        )
    if sg.branch_deadline <= 0:
        raise ConfigError("security_groups.branch_deadline", "must be positive")
    for name in ("set_warm_ips", "set_cooldown", "shared_reserve"):
        if getattr(sg, name) < 0:
            raise ConfigError(f"security_groups.{name}", "must not be negative")
    if sg.mode == "eni":
        explicit = "security_groups.enforcing_mode" in cfg.sources
        if explicit and sg.enforcing_mode == "strict":
            raise ConfigError(
                "security_groups.enforcing_mode",
                "strict is a branch-mode property: in eni mode traffic between pods on one node "
                "stays on the node (leave it unset, or standard)",
            )
        if sg.branches == "controller":
            raise ConfigError(
                "security_groups.branches",
                '"controller" (EKS\'s branch ENIs) needs mode = "branch"',
            )


_PLUGIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_cni(c: CniSection) -> None:
    for setting, path in (("cni.bin_dir", c.bin_dir), ("cni.conf_dir", c.conf_dir)):
        if not path.startswith("/"):
            raise ConfigError(setting, "must be an absolute path")
    for name in c.chain:
        if not _PLUGIN_NAME.match(name):
            raise ConfigError("cni.chain", f"{name!r} is not a plugin name")
    from agent.install import InstallError, conflist

    try:
        conflist(
            socket="/",
            spool_dir="/",
            mtu=None,
            chain=c.chain,
            name=c.network_name,
            cni_version=c.cni_version,
            capabilities=c.capabilities,
        )
    except InstallError as e:
        names = {"network name": "cni.network_name", "cniVersion": "cni.cni_version"}
        raise ConfigError(names.get(e.setting, f"cni.{e.setting}"), e.reason) from None


def effective(cfg: Config) -> list[tuple[str, Any, str]]:
    """Every setting as (dotted name, value, source) for ``agentctl config``."""
    out = []
    for section in SECTIONS:
        body = getattr(cfg, section)
        for key in _fields(section):
            setting = f"{section}.{key}"
            value = getattr(body, key)
            if isinstance(value, tuple):
                value = [str(v) for v in value]
            out.append((setting, value, cfg.sources.get(setting, "default")))
    return out
