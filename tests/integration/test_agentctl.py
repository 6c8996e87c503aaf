"""agentctl against a running agent: tables, JSON, the event stream, and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Node, running_node

pytestmark = pytest.mark.root
AGENTCTL = str(Path(sys.executable).parent / "agentctl")


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with running_node(tag="ctl") as n:
        pod = n.new_pod()
        assert n.add(pod, args="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0").code == 0
        yield n


def test_tables(node: Node) -> None:
    pods = node.ctl("pods")
    assert pods.returncode == 0
    header, row = pods.stdout.splitlines()[:2]
    assert header.split()[:4] == ["POD", "CONTAINER", "IF", "IP"]
    assert row.split()[0] == "shop/cart-0"
    status = node.ctl("status").stdout
    assert "Provider:   static" in status and "Pods:       1" in status
    pool = node.ctl("pool").stdout.splitlines()
    assert pool[2].split()[:6] == ["10.77.0.0/24", "main", "254", "1", "0", "253"]
    config = node.ctl("config").stdout
    assert "ipam.cooldown" in config and str(node.config_path) in config


def test_json_everywhere(node: Node) -> None:
    for cmd in ("status", "pods", "pool", "config", "events"):
        for args in (("--json", cmd), (cmd, "--json")):
            r = node.ctl(*args)
            assert r.returncode == 0, (args, r.stderr)
            json.loads(r.stdout)
    assert json.loads(node.ctl("pods", "--json").stdout)[0]["name"] == "cart-0"


def test_events_follow_streams_what_happens(node: Node) -> None:
    follow = subprocess.Popen(
        [AGENTCTL, "--socket", node.socket, "events", "--follow", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None
        first = json.loads(follow.stdout.readline())  # replayed history comes first
        assert first["kind"] == "pod.added"
        pod = node.new_pod()
        added = node.add(pod)
        assert added.code == 0
        deadline = time.monotonic() + 10
        seen = []
        while time.monotonic() < deadline:
            event = json.loads(follow.stdout.readline())
            seen.append(event)
            if event["kind"] == "pod.added" and event["ip"] == added.ip:
                break
        assert seen[-1]["ip"] == added.ip
        assert node.delete(pod).code == 0
        assert json.loads(follow.stdout.readline())["kind"] == "pod.deleted"
    finally:
        follow.terminate()
        follow.wait(5)


def test_unreachable_agent_and_bad_socket(tmp_path: Path) -> None:
    missing = subprocess.run(
        [AGENTCTL, "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
    )
    assert (
        missing.returncode == 3
        and "unreachable" in missing.stderr
        and "none.sock" in missing.stderr
    )
    (tmp_path / "file.sock").write_text("")
    not_socket = subprocess.run(
        [AGENTCTL, "--socket", str(tmp_path / "file.sock"), "pods"], capture_output=True, text=True
    )
    assert not_socket.returncode == 3 and not_socket.stdout == ""
    usage = subprocess.run([AGENTCTL, "frobnicate"], capture_output=True, text=True)
    assert usage.returncode == 2


def test_health_endpoints_and_agentctl_health(node: Node) -> None:
    base = node.health_url
    live = node.netns.run(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/healthz", check=False
    )
    ready = node.netns.run("curl", "-s", f"{base}/readyz", check=False)
    assert live.stdout == "200"
    assert json.loads(ready.stdout)["ready"] is True
    r = node.ctl("health")
    assert r.returncode == 0 and "ready: yes" in r.stdout and "service rpc" in r.stdout
    assert node.ctl("health", "--live").returncode == 0


def test_metrics_move_with_traffic(node: Node) -> None:
    def adds() -> float:
        text = node.ctl("metrics").stdout
        total = 0.0
        for line in text.splitlines():
            if (
                line.startswith("podwire_cni_requests_total{")
                and 'verb="ADD"' in line
                and 'code="0"' in line
            ):
                total += float(line.split()[-1])
        return total

    before = adds()
    pod = node.new_pod()
    assert node.add(pod).code == 0
    assert adds() == before + 1
    text = node.netns.run("curl", "-s", f"{node.health_url}/metrics").stdout
    assert 'podwire_pool_addresses{owner="10.77.0.0/24",state="assigned"}' in text
    assert node.delete(pod).code == 0
