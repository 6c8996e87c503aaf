"""No local client can bring the agent down (issue 15, item 5): descriptor exhaustion, idle and
slow connections, against the real agent, with the real plugin still served."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.harness import running_node

pytestmark = pytest.mark.root

WAIT = 30.0  # generous: these are deadlines, never measured


def limits_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no limit line")


def test_an_idle_flood_beyond_the_descriptor_limit_neither_kills_nor_blocks_the_agent() -> None:
    with running_node(tag="fdx", agent_prefix=("prlimit", "--nofile=256:256", "--")) as node:
        assert node.proc is not None
        flood: list[socket.socket] = []
        try:
            for _ in range(400):  # more than the agent may hold descriptors for
                s = socket.socket(socket.AF_UNIX)
                s.connect(node.socket)
                flood.append(s)
            pod = node.new_pod()
            add = node.add(pod)  # the real plugin, while 400 connections are open
            assert add.code == 0, add
            assert node.proc.poll() is None and node.call("agent.status")["ready"]
            assert node.delete(pod).code == 0
        finally:
            for s in flood:
                s.close()
        metrics = node.ctl("metrics").stdout
        assert 'podwire_rpc_connections_closed_total{reason="evicted"}' in metrics
        assert node.proc.poll() is None


def test_the_soft_descriptor_limit_is_raised_at_start() -> None:
    with running_node(tag="fdr", agent_prefix=("prlimit", "--nofile=256:8192", "--")) as node:
        assert node.proc is not None
        assert limits_of(node.proc.pid) == (8192, 8192)


def test_idle_and_slow_connections_are_closed() -> None:
    env = {"PODWIRE_AGENT_IDLE_TIMEOUT": "1", "PODWIRE_AGENT_READ_TIMEOUT": "1"}
    with running_node(tag="fdt", env=env) as node:
        idle = socket.socket(socket.AF_UNIX)
        idle.settimeout(WAIT)
        idle.connect(node.socket)
        assert idle.recv(100) == b""  # closed by the agent, without a word
        idle.close()

        slow = socket.socket(socket.AF_UNIX)
        slow.settimeout(WAIT)
        slow.connect(node.socket)
        line = b'{"id":1,"method":"agent.status","params":{}}\n'
        slow.setblocking(False)
        reply = b""
        deadline = time.monotonic() + WAIT
        for byte in line:  # one byte every 0.2 s: 9 s for the line, far past the timeout
            try:
                slow.send(bytes([byte]))
                time.sleep(0.2)
                reply += slow.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                break
            if reply.endswith(b"\n") or time.monotonic() > deadline:
                break
        slow.close()
        assert json.loads(reply)["error"]["msg"] == "request too slow"
        # and the agent serves on
        assert node.call("agent.status")["ready"]
