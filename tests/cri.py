"""A node's runtime for tests: its own mount namespace, a private containerd, and a CRI client.

Theory of operation. A real node is one network namespace *and* one filesystem view. Here a
``NodeHost`` pairs the node's network namespace (made by the test) with a mount namespace of its
own, held open by a small holder process started with ``unshare --mount --propagation slave``:

- every process of the node (containerd and its shims, kubelet, kube-proxy, the podwire agent)
  is started in both with ``nsenter --mount=... --net=...`` -- never ``ip netns exec``, which
  remounts /sys and hides the cgroup mounts from runc;
- mounts made there (overlay root filesystems, the sandboxes' netns and shm bind mounts, a
  tmpfs on /run/containerd for the shims' sockets) never reach the machine's own mount table
  and vanish with the namespace, even when the test run is killed;
- the machine's kernel settings are out of reach: /proc/sys is read-only in the node's view
  except /proc/sys/net, which the kernel resolves per network namespace (so the agent and
  kube-proxy still set their knobs, inside the node). kubelet insists on six global sysctls
  (vm.overcommit_memory=1, kernel.panic=10, ...): the node sees them through read-only files
  holding kubelet's values, so kubelet (with protectKernelDefaults) finds nothing to change and
  the machine keeps its own. /sys/module is read-only as well (conntrack's hashsize).
- /var/log and /var/lib are directories of the node's own (kubelet writes /var/log/pods,
  /var/log/containers and /var/lib/kubelet/device-plugins whatever it is told).

Pods' cgroups go under ``/<name>`` in every cgroup v1 hierarchy; ``close()`` kills whatever is
left in them, in the node's mount namespace or in the node's network namespace, removes the
cgroups and the node's directory. ``cleanup_stale()`` does the same for runs that died (names
carry the owning pid, as namespaces do).

``Containerd`` runs Debian's containerd in a ``NodeHost`` with its own root, state, sockets and
CNI directories; ``Cri`` is a thin client over containerd's CRI (the generated grpc stubs from
PyPI's ``container-runtime-interface-api``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tests.netns import Netns

if TYPE_CHECKING:
    from tests.harness import Node

T = TypeVar("T")

CGROUP_ROOT = Path("/sys/fs/cgroup")
# What kubelet's container manager insists on (pkg/kubelet/cm setupKernelTunables); the node
# sees these values, the machine keeps its own.
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
HOLDER_MARK = "PODWIRE_NODE_HOST"
REFERENCE_PLUGINS = Path("/usr/lib/cni")


class NodeError(Exception):
    """The node's runtime failed to start or answer; the message carries its log tail."""


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float, *, on_fail: Callable[[], str] = str
) -> T:
    """Poll ``probe`` until it returns something other than None or False; raise NodeError
    naming ``what`` (and ``on_fail()``'s text) after ``timeout`` seconds. A generous deadline,
    never a timed assertion."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise NodeError(f"{what}: not after {timeout:.0f} s\n{on_fail()}")
        time.sleep(0.1)


def _hierarchies() -> list[Path]:
    """The cgroup hierarchies mounted here: every v1 controller's, and the unified one where
    runc also makes each container's cgroup on a hybrid host."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ")
        if len(fields) == 2 and fields[1].split()[0] in ("cgroup", "cgroup2"):
            out.append(Path(line.split()[4]))
    return sorted(set(out))


def _ns_inode(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name.split("-")[-2])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NodeHost:
    """A node's own mount namespace over its network namespace ``netns`` (see the module doc).

    ``name`` must be a ``pw-<tag>-<pid>-<hex>`` name; it names the cgroups and marks the holder.
    ``tmpfs`` names directories under ``dir`` that get a tmpfs of the node's own (etcd's data:
    an fsync there costs nothing, and the node's disk is shared with everyone).
    """

    def __init__(self, netns: Netns, name: str, *, tmpfs: Sequence[str] = ()) -> None:
        self.netns = netns
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}."))
        self.cgroup_parent = f"/{name}"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._make_cgroups()
        sysctl_dir = self.dir / "sysctl"
        binds = []
        for key, value in KUBELET_SYSCTLS.items():
            fake = sysctl_dir / key.replace("/", ".")
            fake.parent.mkdir(parents=True, exist_ok=True)
            fake.write_text(value + "\n")
            binds.append(
                f"mount --bind {fake} /proc/sys/{key}; mount -o remount,bind,ro /proc/sys/{key}"
            )
        (self.dir / "varlog").mkdir()
        (self.dir / "varlib").mkdir()
        for sub in tmpfs:
            (self.dir / sub).mkdir(parents=True)
        script = "\n".join(
            [
                "set -e",
                "mount --bind /proc/sys /proc/sys",
                "mount -o remount,bind,ro /proc/sys",
                "mount --bind /proc/sys/net /proc/sys/net",
                "mount -o remount,bind,rw /proc/sys/net",
                *binds,
                "mount --bind /sys/module /sys/module",
                "mount -o remount,bind,ro /sys/module",
                # the shims' sockets are always under /run/containerd/s in containerd 1.6
                "mkdir -p /run/containerd",
                "mount -t tmpfs -o mode=0711 tmpfs /run/containerd",
                f"mount --bind {self.dir / 'varlog'} /var/log",
                # kubelet keeps its device-plugin socket in /var/lib/kubelet whatever its root
                f"mount --bind {self.dir / 'varlib'} /var/lib",
                *(f"mount -t tmpfs tmpfs {self.dir / sub}" for sub in tmpfs),
                "echo ready",
                # wait for stdin to close: the test ends the holder by closing it (or by dying)
                "read -r _ || true",
            ]
        )
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "--", "/bin/sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, HOLDER_MARK: name},
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line.strip() != b"ready":
            err = self.holder.stderr.read().decode() if self.holder.stderr else ""
            self.close()
            raise NodeError(f"node mount namespace setup failed: {err}")
        self.mnt_path = f"/proc/{self.holder.pid}/ns/mnt"
        self.mnt_inode = os.stat(self.mnt_path).st_ino

    # -- processes --------------------------------------------------------------------------

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` as run inside the node (its mount and network namespaces)."""
        return ["nsenter", f"--mount={self.mnt_path}", f"--net={self.netns.path}", "--", *cmd]

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside the node; ``close()`` ends it if it is still running."""
        env = {**(kwargs.pop("env", None) or os.environ), HOLDER_MARK: self.name}
        proc = subprocess.Popen(self.argv(cmd), env=env, **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the node and return the finished process (text mode)."""
        return subprocess.run(
            self.argv(cmd),
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def netns_view(self) -> NodeNetns:
        """A ``Netns`` whose processes start inside this node (for tests.harness.Node)."""
        return NodeNetns(self)

    # -- cgroups ----------------------------------------------------------------------------

    def _make_cgroups(self) -> None:
        for hierarchy in _hierarchies():
            path = hierarchy / self.name
            path.mkdir(exist_ok=True)
            # a new cpuset cgroup starts with no CPUs and no memory nodes: inherit the parent's
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (hierarchy / knob).exists():
                    (path / knob).write_text((hierarchy / knob).read_text())

    def cgroup_pids(self) -> set[int]:
        return _cgroup_pids(self.name)

    # -- teardown ---------------------------------------------------------------------------

    def members(self) -> set[int]:
        """Every process that belongs to this node: in its mount namespace, in its network
        namespace, or in its cgroups (containers have mount namespaces of their own)."""
        me = os.getpid()
        net = _ns_inode(me, "net")
        node_net = None
        with contextlib.suppress(FileNotFoundError):
            node_net = os.stat(self.netns.path).st_ino
        if node_net == net:
            node_net = None  # never sweep the machine's own namespace
        found = self.cgroup_pids()
        for pid in _pids():
            if pid == me:
                continue
            if _ns_inode(pid, "mnt") == self.mnt_inode or (
                node_net is not None and _ns_inode(pid, "net") == node_net
            ):
                found.add(pid)
        found.discard(self.holder.pid)
        return found

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15) -> int | None:
        """SIGTERM ``proc``, SIGKILL it after ``timeout``; return its exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        """End every process of the node, remove its cgroups and its directory. The mount
        namespace, and every mount in it, goes with its last process."""
        for proc in reversed(self._procs):
            self.stop(proc, timeout=10)
        _kill_all(self.members)
        if self.holder.poll() is None and self.holder.stdin is not None:
            self.holder.stdin.close()
            try:
                self.holder.wait(10)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()
        _remove_cgroups(self.name)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.dir)], check=False)

    def __repr__(self) -> str:
        return f"NodeHost({self.name!r}, holder={self.holder.pid})"


class NodeNetns(Netns):
    """The node's network namespace, with processes started inside the node's mount
    namespace as well (``tests.harness.Node`` starts the agent through ``popen``)."""

    def __init__(self, host: NodeHost) -> None:
        super().__init__(host.netns.name, create=False)
        self.host = host

    def popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return self.host.popen(cmd, **kwargs)


def _cgroup_pids(name: str) -> set[int]:
    found: set[int] = set()
    for hierarchy in _hierarchies():
        top = hierarchy / name
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                found.update(int(p) for p in procs.read_text().split())
    return found


def _kill_all(members: Callable[[], set[int]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pids = members()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NodeError(f"processes {sorted(pids)} survive SIGKILL")
        time.sleep(0.05)


def _remove_cgroups(name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for hierarchy in _hierarchies():
        top = hierarchy / name
        if not top.is_dir():
            continue
        # deepest first; a cgroup whose last task just died can be busy for a moment
        for path in sorted(
            (p for p in [top, *top.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


def cleanup_stale() -> list[str]:
    """End what dead test runs left of their nodes (holders, shims, pods, cgroups); return
    the node names cleaned."""
    cleaned = []
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        marks = [
            e.split(b"=", 1)[1].decode()
            for e in environ
            if e.startswith(HOLDER_MARK.encode() + b"=")
        ]
        if not marks or _owner_alive(marks[0]):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        cleaned.append(marks[0])
    for hierarchy in _hierarchies():
        for top in hierarchy.glob("pw-*"):
            if top.is_dir() and not _owner_alive(top.name):
                _kill_all(lambda top=top: _cgroup_pids(top.name))
                _remove_cgroups(top.name)
                cleaned.append(top.name)
    # the nodes' directories (NodeHost.dir: "<name>.<random>" in the temporary directory)
    for stale in Path(tempfile.gettempdir()).glob("pw-*-*-*.*"):
        name = stale.name.split(".", 1)[0]
        if stale.is_dir() and not _owner_alive(name):
            subprocess.run(["rm", "-rf", "--one-file-system", str(stale)], check=False)
            cleaned.append(name)
    return sorted(set(cleaned))


# -- containerd --------------------------------------------------------------------------------


class Containerd:
    """Debian's containerd, private to one ``NodeHost``: own root, state, sockets, config and
    CNI directories; the CRI plugin with ``restrict_oom_score_adj`` (this VM has no
    CAP_SYS_RESOURCE), no AppArmor profile loaded into the kernel, netns mounts under its
    state directory. ``start()`` imports the given image archives with ``ctr``."""

    def __init__(self, host: NodeHost, *, sandbox_image: str) -> None:
        self.host = host
        self.dir = host.dir / "containerd"
        self.bin_dir = self.dir / "cni" / "bin"
        self.conf_dir = self.dir / "cni" / "net.d"
        self.socket = str(self.dir / "containerd.sock")
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.sandbox_image = sandbox_image
        self.proc: subprocess.Popen[bytes] | None = None
        for d in (self.bin_dir, self.conf_dir):
            d.mkdir(parents=True)
        # containerd's CRI sets up the sandbox's lo with the loopback plugin from its bin dir
        (self.bin_dir / "loopback").symlink_to(REFERENCE_PLUGINS / "loopback")
        self.config_path.write_text(self.config())

    def config(self) -> str:
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        return f"""version = 2
root = "{self.dir / "root"}"
state = "/run/containerd"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir / "opt"}"

{cri}
  sandbox_image = "{self.sandbox_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  enable_cdi = false

{cri[:-1]}.cni]
  bin_dir = "{self.bin_dir}"
  conf_dir = "{self.conf_dir}"
  max_conf_num = 1

{cri[:-1]}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

{cri[:-1]}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

{cri[:-1]}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "/run/containerd/runc"
"""

    def start(self, images: Sequence[Path] = (), timeout: float = 60) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = self.host.popen(
            ["containerd", "--config", str(self.config_path), "--log-level", "info"],
            stdout=log,
            stderr=log,
        )
        log.close()
        wait_for(
            "containerd's CRI",
            lambda: self._alive() and self.cri_ready(),
            timeout,
            on_fail=self.log_tail,
        )
        for archive in images:
            done = self.ctr("images", "import", str(archive), check=False)
            if done.returncode != 0:
                raise NodeError(f"ctr images import {archive}: {done.stderr}\n{self.log_tail()}")

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise NodeError(f"containerd exited with {self.proc.returncode}\n{self.log_tail()}")
        return os.path.exists(self.socket)

    def cri_ready(self) -> bool:
        try:
            with Cri(self.socket) as cri:
                cri.version()
            return True
        except Exception:
            return False

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", self.socket, "--namespace", "k8s.io", *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            self.host.stop(self.proc)
            self.proc = None


# -- the CRI client ----------------------------------------------------------------------------


class Cri:
    """containerd's CRI over its Unix socket (runtime.v1), with the generated stubs."""

    def __init__(self, socket: str, timeout: float = 60) -> None:
        import grpc
        from cri_api.v1 import api_pb2, api_pb2_grpc

        self.api = api_pb2
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def __enter__(self) -> Cri:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def version(self) -> Any:
        return self.runtime.Version(self.api.VersionRequest(), timeout=5)

    def status(self) -> dict[str, bool]:
        """The runtime's conditions: RuntimeReady and NetworkReady."""
        got = self.runtime.Status(self.api.StatusRequest(), timeout=self.timeout)
        return {c.type: c.status for c in got.status.conditions}

    def sandbox_config(
        self,
        *,
        name: str,
        namespace: str,
        uid: str,
        cgroup_parent: str,
        log_dir: str,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Any:
        api = self.api
        return api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            hostname=name,
            log_directory=log_dir,
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            linux=api.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=api.LinuxSandboxSecurityContext(
                    namespace_options=api.NamespaceOption(
                        network=api.POD, pid=api.CONTAINER, ipc=api.POD
                    )
                ),
            ),
        )

    def run_sandbox(self, config: Any) -> str:
        got = self.runtime.RunPodSandbox(
            self.api.RunPodSandboxRequest(config=config), timeout=self.timeout
        )
        return str(got.pod_sandbox_id)

    def sandbox_status(self, sandbox_id: str) -> tuple[Any, dict[str, Any]]:
        """The sandbox's status and containerd's verbose info (JSON: pid, runtimeSpec, ...)."""
        got = self.runtime.PodSandboxStatus(
            self.api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True),
            timeout=self.timeout,
        )
        info = json.loads(got.info["info"]) if "info" in got.info else {}
        return got.status, info

    def sandboxes(self) -> list[Any]:
        got = self.runtime.ListPodSandbox(self.api.ListPodSandboxRequest(), timeout=self.timeout)
        return list(got.items)

    def stop_sandbox(self, sandbox_id: str) -> None:
        self.runtime.StopPodSandbox(
            self.api.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=self.timeout
        )

    def remove_sandbox(self, sandbox_id: str) -> None:
        self.runtime.RemovePodSandbox(
            self.api.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=self.timeout
        )

    def run_container(
        self,
        sandbox_id: str,
        sandbox_config: Any,
        *,
        name: str,
        image: str,
        env: Mapping[str, str] | None = None,
    ) -> str:
        api = self.api
        config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name, attempt=0),
            image=api.ImageSpec(image=image),
            envs=[api.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            log_path=f"{name}.log",
            linux=api.LinuxContainerConfig(),
        )
        created = self.runtime.CreateContainer(
            api.CreateContainerRequest(
                pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config
            ),
            timeout=self.timeout,
        )
        self.runtime.StartContainer(
            api.StartContainerRequest(container_id=created.container_id), timeout=self.timeout
        )
        return str(created.container_id)


def install_into(node: Node, containerd: Containerd) -> None:
    """Let ``node``'s agent install podwire into containerd's CNI directories once it is
    ready (``[cni] install = true``), as the DaemonSet does on a real node. Call before the
    agent starts."""
    section = (
        "[cni]\ninstall = true\n"
        f'bin_dir = "{containerd.bin_dir}"\nconf_dir = "{containerd.conf_dir}"\n'
    )
    node.config_path.write_text(node.config_path.read_text() + section)


@contextlib.contextmanager
def node_host(netns: Netns, name: str) -> Iterator[NodeHost]:
    host = NodeHost(netns, name)
    try:
        yield host
    finally:
        host.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["cleanup"]:
        print("\n".join(cleanup_stale()) or "nothing to clean")
