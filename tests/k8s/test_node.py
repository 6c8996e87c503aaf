"""The node itself (issue 12 items 1 and 2): Ready only once podwire can serve ADDs, and a
cluster that changes nothing of the machine it runs on."""

from __future__ import annotations

import json

import pytest

from tests.k8s.cluster import Cluster, machine_sysctls
from tests.k8s.conftest import machine_paths

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_nodes_are_ready_only_once_podwire_can_serve_adds(cluster: Cluster) -> None:
    for worker in cluster.workers.values():
        # registered by kubelet before the agent ran: not ready, for want of a network
        assert worker.before_agent["status"] == "False"
        assert "NetworkPluginNotReady" in worker.before_agent["message"]
        assert (worker.ready() or {}).get("status") == "True"
        # the agent wrote the conflist only once it was ready, and it is podwire's
        events = [e.get("msg") for e in worker.agent.log_events()]
        assert "cni config installed" in events
        conflist = json.loads((worker.containerd.conf_dir / "10-podwire.conflist").read_text())
        assert conflist["cniVersion"] == "1.0.0"  # containerd 1.6 parses results up to 1.0.0
        assert [p["type"] for p in conflist["plugins"]] == ["podwire"]
        assert worker.agent.call("agent.status")["ready"] is True


def test_the_machine_keeps_its_kernel_settings_and_paths(
    cluster: Cluster, machine_before: tuple[dict[str, str], dict[str, bool]]
) -> None:
    sysctls, paths = machine_before
    now = machine_sysctls()
    changed = {k: (v, now.get(k)) for k, v in sysctls.items() if now.get(k) != v}
    assert changed == {}
    assert machine_paths() == paths
    for worker in cluster.workers.values():
        # what kubelet believes, in the node's own view, is not what the machine has
        seen = worker.host.run("cat", "/proc/sys/vm/overcommit_memory").stdout.strip()
        assert seen == "1"
        assert (worker.dir / "kubelet" / "pods").is_dir()
