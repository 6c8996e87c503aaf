"""A real Kubernetes cluster on the emulated VPC, for tests/k8s.

Theory of operation. ``Vpc.start()`` gives the VPC router, the EC2 API and IMDS. Every machine
of the cluster is an emulated EC2 instance (``vpc.add_node``): its network namespace is cabled
to the router by its primary ENI, and a ``tests.cri.NodeHost`` gives it a mount namespace and
cgroups of its own.

- The control plane instance runs etcd (Debian's, data on a tmpfs), kube-apiserver,
  kube-controller-manager and kube-scheduler, all listening on its VPC address; every
  component authenticates with a client certificate from one test CA (``tests.k8s.pki``).
- Each worker instance runs containerd (``tests.cri.Containerd``), kubelet, kube-proxy in
  iptables mode, and the real podwire agent (``tests.harness.Node``), which installs podwire as
  containerd's CNI by its own install-on-ready. A worker uses the static provider (its pod CIDR
  is routed to it by the VPC, as GKE's routes-based mode does) or the aws provider (secondary
  IPs on ENIs through the emulated EC2 API).

The machine's own namespaces are never touched: no route into the VPC exists outside it, so the
tests reach the API server with sockets opened inside the control plane's namespace
(``tests.k8s.api``) and reach nodes and pods from inside the VPC's namespaces. kube-proxy is
told to leave conntrack's global limits alone (``conntrack.maxPerCore: 0``); kubelet runs with
``protectKernelDefaults`` and sees its six kernel settings through the node's read-only view
(see ``tests.cri``). ``close()`` stops everything in the reverse order and removes what it made.

For tests built on top (the agent's own Kubernetes client, SecurityGroupPolicy): ``kubeconfig``
writes a kubeconfig for any identity, usable inside a node (the API server's VPC address);
``Worker`` takes ``agent_config`` (extra TOML for the agent) and exposes ``vnode`` (its EC2
instance, for IMDS and ENIs) and ``agent`` (the harness node: ``call``, ``ctl``, ``log``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cloud.emulator import Vpc
from cloud.emulator.api import Node as VpcNode
from cloud.emulator.netns import call_in_netns
from cloud.emulator.netns import cleanup as emulator_cleanup
from tests.cri import Containerd, Cri, NodeHost, cleanup_stale, install_into, wait_for
from tests.harness import Node, aws_node
from tests.k8s import artifacts
from tests.k8s.api import Api, NotFound
from tests.k8s.pki import Pki, kubeconfig
from tests.netns import Netns, unique_name

API_PORT = 6443
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
VPC_CIDR = "10.0.0.0/16"
STATIC_POD_CIDR = "10.0.64.0/24"
STARTUP = 180.0  # generous: two cores shared with other test runs
# The podwire agents' identity in the cluster (deploy/kubernetes/serviceaccount.yaml): its requests
# are audited, so a test can hold the RBAC of deploy/kubernetes/rbac.yaml to what is used.
AGENT_SERVICE_ACCOUNT = ("kube-system", "podwire-agent")
AUDITED = (f"system:serviceaccount:{AGENT_SERVICE_ACCOUNT[0]}:{AGENT_SERVICE_ACCOUNT[1]}",)
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = Path(__file__).resolve().parent / "manifests"


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler on one instance."""

    def __init__(self, vnode: VpcNode, kube: artifacts.Kube, etcd: Path) -> None:
        self.vnode = vnode
        self.ip = vnode.primary_ip
        self.kube = kube
        self.etcd_bin = etcd
        self.host = NodeHost(Netns(vnode.netns, create=False), unique_name("kcp"), tmpfs=("etcd",))
        self.dir = self.host.dir
        self.pki = Pki(self.dir / "pki")
        self.serving = self.pki.issue(
            "apiserver",
            cn="kube-apiserver",
            dns=("kubernetes", "kubernetes.default", "kubernetes.default.svc", "localhost"),
            ips=(self.ip, KUBERNETES_SERVICE_IP, "127.0.0.1"),
            server=True,
        )
        admin = self.pki.issue("admin", cn="podwire-test-admin", orgs=("system:masters",))
        self.api = Api(vnode.netns_path, self.ip, API_PORT, ca=str(self.pki.ca), client=admin)
        self.server = f"https://{self.ip}:{API_PORT}"
        # the agents' credentials as deploy/kubernetes's service account (filled by
        # install_agent_identity once the API serves): a kubeconfig with its token, and the
        # files kubelet would mount into its pod (in-cluster credentials)
        self.apiserver_starts: list[tuple[datetime.datetime, datetime.datetime]] = []
        self.agent_kubeconfig = self.dir / "podwire-agent.kubeconfig"
        self.agent_sa_dir = self.dir / "podwire-agent-sa"

    def kubeconfig(self, name: str, *, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for ``user`` (in ``groups``) that works from any VPC namespace."""
        client = self.pki.issue(name, cn=user, orgs=tuple(groups))
        return kubeconfig(
            self.dir / f"{name}.kubeconfig",
            server=self.server,
            ca=self.pki.ca,
            client=client,
            user=user,
        )

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = self.host.popen(argv, stdout=log, stderr=log)
        log.close()
        return proc

    def start(self) -> None:
        self._start(
            "etcd",
            [
                str(self.etcd_bin),
                "--name=podwire-test",
                f"--data-dir={self.dir / 'etcd' / 'data'}",
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=podwire-test=http://127.0.0.1:2380",
                "--log-level=warn",
                "--logger=zap",
            ],
        )
        self.start_apiserver()
        pki = self.pki
        kcm = self.kubeconfig("kube-controller-manager", user="system:kube-controller-manager")
        self._start(
            "kube-controller-manager",
            [
                str(self.kube.bin("kube-controller-manager")),
                f"--kubeconfig={kcm}",
                "--secure-port=0",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--v=1",
            ],
        )
        scheduler = self.kubeconfig("kube-scheduler", user="system:kube-scheduler")
        self._start(
            "kube-scheduler",
            [
                str(self.kube.bin("kube-scheduler")),
                f"--kubeconfig={scheduler}",
                "--secure-port=0",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        # the controller manager is working once it has made the default service account
        wait_for(
            "the default service account",
            lambda: self.api.exists("/api/v1/namespaces/default/serviceaccounts/default"),
            STARTUP,
            on_fail=lambda: _log_tail(self.dir / "kube-controller-manager.log"),
        )

    def install_agent_identity(self) -> None:
        """What deploying podwire puts in the cluster before its agents start: the service
        account, its RBAC and the SecurityGroupPolicy CRD (deploy/kubernetes, as shipped), and
        the CNINode CRD EKS would have (tests/k8s/manifests). Then the account's token."""
        for manifest in (
            DEPLOY / "serviceaccount.yaml",
            DEPLOY / "rbac.yaml",
            DEPLOY / "crd-securitygrouppolicies.yaml",
            MANIFESTS / "cninode-crd.yaml",
        ):
            self.api.apply(manifest)
        namespace, name = AGENT_SERVICE_ACCOUNT
        token = self.api.token(namespace, name)
        self.agent_sa_dir.mkdir(exist_ok=True)
        (self.agent_sa_dir / "token").write_text(token)
        (self.agent_sa_dir / "namespace").write_text(namespace)
        (self.agent_sa_dir / "ca.crt").write_bytes(self.pki.ca.read_bytes())
        self.agent_kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "podwire-test",
                            "cluster": {
                                "server": self.server,
                                "certificate-authority": str(self.pki.ca),
                            },
                        }
                    ],
                    "users": [
                        {"name": name, "user": {"tokenFile": str(self.agent_sa_dir / "token")}}
                    ],
                    "contexts": [
                        {"name": "agent", "context": {"cluster": "podwire-test", "user": name}}
                    ],
                    "current-context": "agent",
                },
                indent=1,
            )
        )

    def start_apiserver(self) -> None:
        """Start kube-apiserver and wait until it is ready. Requests of the identities in
        ``AUDITED`` are written to ``audit.log`` (JSON lines, metadata only)."""
        pki = self.pki
        kubelet_client = pki.issue(
            "apiserver-kubelet-client", cn="kube-apiserver-kubelet-client", orgs=("system:masters",)
        )
        self.audit_log = self.dir / "audit.log"
        starting = datetime.datetime.now(datetime.UTC)
        policy = self.dir / "audit-policy.json"
        policy.write_text(
            json.dumps(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [
                        {"level": "Metadata", "users": list(AUDITED)},
                        {"level": "None"},
                    ],
                }
            )
        )
        self.apiserver = self._start(
            "kube-apiserver",
            [
                str(self.kube.bin("kube-apiserver")),
                "--etcd-servers=http://127.0.0.1:2379",
                f"--advertise-address={self.ip}",
                f"--bind-address={self.ip}",
                f"--secure-port={API_PORT}",
                f"--cert-dir={self.dir / 'apiserver'}",
                f"--tls-cert-file={self.serving.cert}",
                f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={pki.ca}",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                "--profiling=false",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
                "--v=1",
            ],
        )
        wait_for(
            "kube-apiserver ready",
            self._ready,
            STARTUP,
            on_fail=lambda: (
                _log_tail(self.dir / "kube-apiserver.log") + "\n" + _log_tail(self.dir / "etcd.log")
            ),
        )
        # until it says it is ready, a starting API server may refuse what its RBAC allows
        self.apiserver_starts.append((starting, datetime.datetime.now(datetime.UTC)))

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver (SIGTERM: it closes its connections, watches included)."""
        self.host.stop(self.apiserver)

    def audit(self) -> list[dict[str, Any]]:
        """The audit events written so far (see ``start_apiserver``)."""
        try:
            text = self.audit_log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision (what the API server does every
        five minutes): a watch from any older resourceVersion that reaches etcd gets 410 Gone.
        Returns the revision."""

        def post(path: str, body: dict[str, Any]) -> Any:
            sock = call_in_netns(
                self.vnode.netns_path, lambda: socket.create_connection(("127.0.0.1", 2379), 10)
            )
            conn = http.client.HTTPConnection("127.0.0.1", 2379, timeout=30)
            conn.sock = sock
            try:
                conn.request("POST", path, body=json.dumps(body))
                resp = conn.getresponse()
                data = json.loads(resp.read())
            finally:
                conn.close()
            if resp.status != 200:
                raise RuntimeError(f"etcd {path}: {resp.status} {data}")
            return data

        key = base64.b64encode(b"/registry").decode()
        revision = int(post("/v3/kv/range", {"key": key, "limit": 1})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def _ready(self) -> bool:
        try:
            return bool(self.api.request("GET", "/readyz") == "ok")
        except Exception:
            return False

    def close(self) -> None:
        self.host.close()


class Worker:
    """A worker node: containerd, kubelet, kube-proxy and the podwire agent on one instance."""

    def __init__(
        self,
        cp: ControlPlane,
        vpc: Vpc,
        vnode: VpcNode,
        *,
        name: str,
        provider: str,
        images: artifacts.Images,
        agent_config: str = "",
    ) -> None:
        self.cp, self.vnode, self.name, self.provider, self.images = (
            cp,
            vnode,
            name,
            provider,
            images,
        )
        self.ip = vnode.primary_ip
        self.host = NodeHost(Netns(vnode.netns, create=False), unique_name("kw"))
        self.dir = self.host.dir
        self.containerd = Containerd(self.host, sandbox_image=images.pause)
        # Every agent watches the cluster as deploy/kubernetes's service account: the static
        # worker's with in-cluster credentials (through the kubernetes Service, i.e. kube-proxy),
        # taking its pod CIDR from its Node; the aws worker's with a kubeconfig.
        kube = f'[kubernetes]\nenabled = true\nnode_name = "{name}"\nretry_cap = 5.0\n'
        if provider == "static":
            assert vnode.pod_cidr is not None
            self.pod_cidr = str(vnode.pod_cidr)
            self.agent = Node(
                netns=vnode.netns,
                primary_ip=self.ip,
                cidrs=(),
                extra_config=f'[snat]\nvpc_cidrs = ["{VPC_CIDR}"]\n'
                + kube
                + f'service_account_dir = "{cp.agent_sa_dir}"\n'
                + agent_config,
                env={
                    "PODWIRE_STATIC_SOURCE": "node",
                    "KUBERNETES_SERVICE_HOST": KUBERNETES_SERVICE_IP,
                    "KUBERNETES_SERVICE_PORT": "443",
                },
                tag=name,
            )
        else:
            self.agent = aws_node(
                vpc,
                vnode,
                primary_ip=self.ip,
                extra_config=kube + f'kubeconfig = "{cp.agent_kubeconfig}"\n' + agent_config,
                tag=name,
            )
        install_into(self.agent, self.containerd)
        self.agent.netns = self.host.netns_view()
        self.before_agent: dict[str, Any] = {}  # the Node's Ready condition before the agent ran

    def start_runtime(self) -> None:
        self.containerd.start([self.images.pause_tar, self.images.server_tar])

    def start_kubelet(self) -> None:
        root = self.dir / "kubelet"
        root.mkdir()
        (self.dir / "resolv.conf").write_text("")
        config = self.dir / "kubelet.yaml"
        # JSON is YAML: the kubelet's KubeletConfiguration, every knob that matters here spelled out
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "failCgroupV1": False,  # this VM has cgroup v1 (kubelet >= 1.35 asks)
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": self.host.cgroup_parent,
                    "cgroupsPerQOS": True,
                    "protectKernelDefaults": True,  # check kernel settings, never write them
                    "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE here
                    "failSwapOn": False,
                    "containerRuntimeEndpoint": f"unix://{self.containerd.socket}",
                    "address": self.ip,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": False},
                        "x509": {"clientCAFile": str(self.cp.pki.ca)},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "resolvConf": str(self.dir / "resolv.conf"),
                    "hairpinMode": "none",
                    "nodeStatusUpdateFrequency": "2s",
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "evictionHard": {
                        "memory.available": "50Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "shutdownGracePeriod": "0s",
                    "serializeImagePulls": False,
                },
                indent=1,
            )
        )
        kubeconfig = self.cp.kubeconfig(
            f"kubelet-{self.name}", user=f"system:node:{self.name}", groups=("system:nodes",)
        )
        argv = [
            str(self.cp.kube.bin("kubelet")),
            f"--config={config}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={root}",
            f"--cert-dir={root / 'pki'}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.ip}",
            "--v=2",
        ]
        if self.provider == "aws":
            argv.append(f"--provider-id=aws:///{self.vnode.subnet.az}/{self.vnode.instance_id}")
        log = open(self.dir / "kubelet.log", "ab")  # noqa: SIM115 - handed to the child
        self.kubelet = self.host.popen(argv, stdout=log, stderr=log)
        log.close()

    def start_proxy(self) -> None:
        config = self.dir / "kube-proxy.yaml"
        kubeconfig = self.cp.kubeconfig(f"kube-proxy-{self.name}", user="system:kube-proxy")
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "mode": "iptables",
                    "clientConnection": {"kubeconfig": str(kubeconfig)},
                    "hostnameOverride": self.name,
                    "clusterCIDR": VPC_CIDR,
                    "healthzBindAddress": "127.0.0.1:10256",
                    "metricsBindAddress": "127.0.0.1:10249",
                    # leave the machine's global conntrack limits and timeouts as they are
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                    "iptables": {"localhostNodePorts": False},
                    "nodePortAddresses": ["primary"],
                    "oomScoreAdj": 0,
                },
                indent=1,
            )
        )
        log = open(self.dir / "kube-proxy.log", "ab")  # noqa: SIM115 - handed to the child
        self.proxy = self.host.popen(
            [str(self.cp.kube.bin("kube-proxy")), f"--config={config}", "--v=2"],
            stdout=log,
            stderr=log,
        )
        log.close()

    def node(self) -> Any:
        return self.cp.api.get(f"/api/v1/nodes/{self.name}")

    def ready(self) -> dict[str, Any] | None:
        """The Node's Ready condition (None before kubelet registered it)."""
        try:
            node = self.node()
        except NotFound:
            return None
        conditions = node.get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Ready"), None)

    def wait_registered(self) -> dict[str, Any]:
        return wait_for(f"node {self.name} registered", self.ready, STARTUP, on_fail=self.logs)

    def wait_ready(self) -> None:
        wait_for(
            f"node {self.name} Ready",
            lambda: (self.ready() or {}).get("status") == "True",
            STARTUP,
            on_fail=self.logs,
        )

    def addresses(self) -> set[str]:
        """The node's own IPv4 addresses (its ENIs' primary addresses and loopback)."""
        out = json.loads(self.host.run("ip", "-j", "-4", "addr", "show").stdout)
        return {a["local"] for link in out for a in link.get("addr_info", [])}

    def pods(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The agent's pods by (namespace, name)."""
        return {(p["namespace"], p["name"]): p for p in self.agent.call("agent.pods")}

    def start_agent(self) -> None:
        self.agent.start(timeout=STARTUP)

    def restart_agent(self) -> None:
        self.agent.stop()
        self.start_agent()

    def logs(self) -> str:
        parts = [
            f"--- {self.name} {p}\n{_log_tail(self.dir / p)}"
            for p in ("kubelet.log", "kube-proxy.log")
        ]
        parts.append(f"--- containerd\n{self.containerd.log_tail()}")
        parts.append(f"--- agent\n{self.agent.log()[-3000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop kubelet, let containerd tear the pods down (podwire's DELs), then end
        everything else of the node."""
        for proc in (getattr(self, "kubelet", None), getattr(self, "proxy", None)):
            if proc is not None:
                self.host.stop(proc)
        if self.containerd.proc is not None and self.agent.proc is not None:
            with contextlib.suppress(Exception), Cri(self.containerd.socket) as cri:
                for sandbox in cri.sandboxes():
                    cri.stop_sandbox(sandbox.id)
                    cri.remove_sandbox(sandbox.id)
        self.agent.close()
        self.host.close()


class Cluster:
    """A control plane and workers (see the module doc); use ``Cluster.running()``."""

    def __init__(self, vpc: Vpc, cp: ControlPlane, workers: dict[str, Worker]) -> None:
        self.vpc, self.cp, self.workers = vpc, cp, workers
        self.api = cp.api
        self.started_in: float = 0.0

    def netns_of(self, pod: Any) -> str:
        """The namespace of the node ``pod`` runs on (where it can be reached from)."""
        return self.workers[pod["spec"]["nodeName"]].vnode.netns_path

    @classmethod
    @contextlib.contextmanager
    def running(
        cls,
        providers: Sequence[str] = ("static", "aws"),
        *,
        agent_config: Mapping[str, str] | None = None,
        instance_type: str = "m5.large",
    ) -> Iterator[Cluster]:
        """Start the cluster with one worker per provider (named like the provider; extra
        agent TOML per provider in ``agent_config``) and stop it afterwards, whatever
        happened."""
        cleanup_stale()
        emulator_cleanup()  # namespaces of runs that died
        images, etcd, kube = artifacts.images(), artifacts.etcd(), artifacts.kube()
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            # trunks carry 802.1Q frames, as on EC2 (the agents tag with eBPF where the kernel
            # has no VLAN devices)
            vpc = stack.enter_context(Vpc.start(VPC_CIDR))
            cp = ControlPlane(vpc.add_node(instance_type), kube, etcd)
            stack.callback(cp.close)
            workers: dict[str, Worker] = {}
            for provider in providers:
                vnode = vpc.add_node(
                    instance_type, pod_cidr=STATIC_POD_CIDR if provider == "static" else None
                )
                worker = Worker(
                    cp,
                    vpc,
                    vnode,
                    name=provider,
                    # "eks": an aws worker whose branch ENIs EKS's resource controller makes
                    provider="aws" if provider == "eks" else provider,
                    images=images,
                    agent_config=(agent_config or {}).get(provider, ""),
                )
                stack.callback(worker.close)
                workers[provider] = worker
            cluster = cls(vpc, cp, workers)
            cp.start()
            cp.install_agent_identity()
            for worker in workers.values():
                worker.start_runtime()
                worker.start_kubelet()
            for worker in workers.values():
                worker.before_agent = worker.wait_registered()
                if worker.provider == "static":
                    # what the node IPAM controller does for a kubenet node: its pod CIDR (the
                    # VPC routes it there, as GKE's routes-based mode does)
                    cp.api.patch(
                        f"/api/v1/nodes/{worker.name}",
                        {"spec": {"podCIDR": worker.pod_cidr, "podCIDRs": [worker.pod_cidr]}},
                    )
                worker.start_proxy()
                worker.start_agent()
            for worker in workers.values():
                worker.wait_ready()
            cluster.started_in = time.monotonic() - started
            yield cluster


def machine_sysctls() -> dict[str, str]:
    """Every writable kernel setting as the machine's own namespaces see it (the volatile
    ``kernel.ns_last_pid`` aside)."""
    out = {}
    for root, _, files in os.walk("/proc/sys"):
        for name in files:
            path = os.path.join(root, name)
            try:
                if not os.stat(path).st_mode & stat.S_IWUSR:
                    continue
                with open(path) as f:
                    out[path.removeprefix("/proc/sys/")] = f.read()
            except OSError:
                continue  # write-only knobs (vm/drop_caches, ...)
    out.pop("kernel/ns_last_pid", None)
    return out
