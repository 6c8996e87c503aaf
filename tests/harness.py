"""A node with a running agent, for integration tests, the demo and the benchmarks.

``Node`` makes a namespace that plays the node, writes an agent config into a private
directory, installs the real ``podwire`` plugin there with ``podwire-agent install-cni``, and
runs ``podwire-agent run`` inside the namespace (``ip netns exec``). ``Node.cni`` then executes
the installed plugin exactly as a container runtime does: CNI_* variables in the environment
and the network config on stdin.
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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rpc.client import Client
from rpc.errors import AgentUnreachable, RpcError
from tests.netns import Netns, unique_name

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
REFERENCE_PLUGINS = Path("/usr/lib/cni")
# The emulated EC2 (moto) takes any keys; the agent's SDK wants some.
EMULATOR_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class CniResult:
    """What the plugin printed and how it exited."""

    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def doc(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    @property
    def ip(self) -> str:
        return str(self.doc["ips"][0]["address"]).split("/")[0]

    def __repr__(self) -> str:
        out, err = self.stdout[:300], self.stderr[:300]
        return f"CniResult(code={self.code}, stdout={out!r}, stderr={err!r})"


class Node:
    def __init__(
        self,
        *,
        cidrs: tuple[str, ...] = ("10.77.0.0/24",),
        cooldown: float = 30.0,
        extra_config: str = "",
        chain: tuple[str, ...] = (),
        tag: str = "node",
        netns: str | None = None,
        primary_ip: str = "10.76.0.10",
        aws: dict[str, Any] | None = None,
        gce: dict[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        state_tmpfs: bool = False,
        agent_prefix: tuple[str, ...] = (),
    ) -> None:
        """A node in a namespace of its own, or in ``netns`` made by someone else (the
        emulator's nodes, which already have an uplink with ``primary_ip``).

        ``state_tmpfs`` puts the agent's state directory on a tmpfs mounted in the agent's
        private mount namespace (``ip netns exec`` gives it one), as /run is on a systemd
        host; the state is then lost when the agent stops (benchmarks only). ``agent_prefix``
        runs the agent under a command such as ``prlimit --nofile=256:256 --``."""
        self.dir = Path(tempfile.mkdtemp(prefix="podwire-"))
        self.primary_ip = primary_ip
        if netns is not None:
            self.netns = Netns(netns, create=False)
        else:
            self.netns = Netns(unique_name(tag))
            # the node's own address, as a real node's primary interface has (this kernel has
            # no dummy module: an unconnected veth pair serves as the interface)
            self.netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")
            self.netns.run("ip", "addr", "add", f"{self.primary_ip}/24", "dev", "eth0")
            self.netns.run("ip", "link", "set", "eth0", "up")
            self.netns.run("ip", "link", "set", "eth0peer", "up")
        self.socket = str(self.dir / "agent.sock")
        self.bin_dir = self.dir / "bin"
        self.conf_dir = self.dir / "net.d"
        self.config_path = self.dir / "agent.toml"
        self.log_path = self.dir / "agent.log"
        self.config_path.write_text(
            "[agent]\n"
            f'socket = "{self.socket}"\n'
            f'state_dir = "{self.dir / "state"}"\n'
            f'spool_dir = "{self.dir / "spool"}"\n'
            "mtu = 1500\n"
            'log_format = "json"\n'
            "[provider]\n"
            + (
                'kind = "aws"\n[aws]\n'
                + "".join(f"{k} = {json.dumps(v)}\n" for k, v in aws.items())
                if aws is not None
                else 'kind = "gce"\n[gce]\n'
                + "".join(f"{k} = {json.dumps(v)}\n" for k, v in gce.items())
                if gce is not None
                else f'kind = "static"\n[static]\ncidrs = {json.dumps(list(cidrs))}\n'
            )
            + "[ipam]\n"
            f"cooldown = {cooldown}\n"
            "[health]\n"
            "port = 0\n"
            # test pods are bare namespaces no process holds: never tear them down for that
            "[gc]\n"
            "orphan_grace = 0\n" + extra_config
        )
        self.bin_dir.mkdir(parents=True)
        for name in chain:  # install-cni checks that chained plugins are there
            (self.bin_dir / name).symlink_to(REFERENCE_PLUGINS / name)
        subprocess.run(
            [
                str(VENV_BIN / "podwire-agent"),
                "install-cni",
                "--bin-dir",
                str(self.bin_dir),
                "--conf-dir",
                str(self.conf_dir),
                "--socket",
                self.socket,
                "--spool-dir",
                str(self.dir / "spool"),
                "--chain",
                ",".join(chain),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, **(env or {})},  # another checkout's agent installs its plugin
        )
        self.conflist = json.loads((self.conf_dir / "10-podwire.conflist").read_text())
        self.env = {**os.environ, **(env or {})}
        self.state_tmpfs = state_tmpfs
        self.agent_prefix = agent_prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self.pods: list[Netns] = []

    # -- agent --------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> None:
        """Start the agent in the node namespace and (unless ``wait`` is false) wait until it
        serves the socket."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        cmd = [
            *self.agent_prefix,
            str(VENV_BIN / "podwire-agent"),
            "run",
            "--config",
            str(self.config_path),
        ]
        if self.state_tmpfs:
            mount = 'mkdir -p "$0" && mount -t tmpfs -o size=64m pw-state "$0" && exec "$@"'
            cmd = ["sh", "-c", mount, str(self.dir / "state"), *cmd]
        self.proc = self.netns.popen(
            cmd,
            stdout=log,
            stderr=log,
            env=self.env,
        )
        log.close()
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.call("agent.status")["ready"]:
                    return
            except (AgentUnreachable, RpcError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"agent not ready after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    @property
    def health_url(self) -> str:
        """The agent's health/metrics endpoint, as its log reports it."""
        for event in self.log_events():
            if event.get("msg") == "health server listening":
                return f"http://{event['address']}:{event['port']}"
        raise RuntimeError("agent has not logged its health endpoint")

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with Client(self.socket, timeout=10) as c:
            return c.call(method, params)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "agentctl"), "--socket", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    # -- pods ---------------------------------------------------------------------------------

    def new_pod(self, tag: str = "pod") -> Netns:
        ns = Netns(unique_name(tag))
        self.pods.append(ns)
        return ns

    def plugin_conf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        """The config a runtime would pass to the podwire plugin (first of the chain)."""
        return {
            "cniVersion": version,
            "name": self.conflist["name"],
            **self.conflist["plugins"][0],
            **extra,
        }

    def cni(
        self,
        command: str,
        container_id: str = "",
        netns: str = "",
        ifname: str = "eth0",
        conf: Mapping[str, Any] | bytes | None = None,
        args: str = "",
        env: Mapping[str, str] | None = None,
        plugin: str = "podwire",
    ) -> CniResult:
        """Execute a plugin from the node's bin dir as a runtime would."""
        base = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": args,
            "CNI_PATH": str(self.bin_dir),
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        if env is not None:
            base = {**{k: v for k, v in env.items()}, "PATH": base["PATH"]}
        stdin = conf if isinstance(conf, bytes) else json.dumps(conf or self.plugin_conf()).encode()
        # The runtime runs on the node: plugins execute in the node's namespace (chained plugins
        # such as portmap write iptables rules wherever they run).
        proc = subprocess.run(
            ["nsenter", f"--net={self.netns.path}", "--", str(self.bin_dir / plugin)],
            env=base,
            input=stdin,
            capture_output=True,
            timeout=60,
        )
        return CniResult(proc)

    def add(self, pod: Netns, container_id: str | None = None, **kw: Any) -> CniResult:
        return self.cni("ADD", container_id or pod.name, pod.path, **kw)

    def delete(self, pod: Netns, container_id: str | None = None, **kw: Any) -> CniResult:
        return self.cni("DEL", container_id or pod.name, pod.path, **kw)

    def close(self) -> None:
        self.stop()
        for pod in self.pods:
            pod.close()
        self.netns.close()
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


def toml_table(name: str, values: Mapping[str, Any]) -> str:
    """``[name]`` and a ``key = value`` line per item (JSON values, which TOML reads as such)."""
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def aws_node(
    vpc: Any,
    vnode: Any,
    *,
    aws: Mapping[str, Any] | None = None,
    security_groups: Mapping[str, Any] | None = None,
    extra_config: str = "",
    **kw: Any,
) -> Node:
    """A Node (not started) for the emulated instance ``vnode`` of ``vpc`` (cloud.emulator's
    VpcNode and Vpc): the aws provider on its IMDS, the VPC's EC2 endpoint and region and the
    emulator's credentials. ``aws`` adds [aws] keys, ``security_groups`` a [security_groups]
    table after ``extra_config``; the rest goes to Node."""
    settings = {
        "imds_url": vnode.imds_url,
        "ec2_endpoint": vnode.ec2_url,
        "region": vpc.region,
        **(aws or {}),
    }
    if security_groups is not None:
        extra_config += toml_table("security_groups", security_groups)
    kw.setdefault("netns", vnode.netns)
    kw.setdefault("primary_ip", vnode.primary_ip)
    kw["env"] = {**EMULATOR_CREDENTIALS, **kw.get("env", {})}
    return Node(aws=settings, extra_config=extra_config, **kw)


@contextlib.contextmanager
def running_node(**kw: Any) -> Iterator[Node]:
    node = Node(**kw)
    try:
        node.start()
        yield node
    finally:
        node.close()


def ping(ns: Netns, ip: str, count: int = 1) -> bool:
    """One real ICMP echo from ``ns`` to ``ip``; True when answered."""
    return ns.run("ping", "-c", str(count), "-W", "2", "-q", ip, check=False).returncode == 0
