"""One real cluster for the whole tests/k8s run (see ``tests.k8s.cluster``), and a namespace of
its own for each test. The machine's kernel settings and its Kubernetes paths are recorded
before the cluster starts; a test compares them while it runs and the fixture checks them again
once it has stopped. The cluster lives as long as this package's tests (not the session), so
the rest of a run does not share the machine with it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.k8s.cluster import Cluster, Worker, machine_sysctls
from tests.k8s.workloads import Namespace

# Where a default kubelet, containerd or CNI install would write on the machine itself.
MACHINE_PATHS = (
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/containerd",
    "/opt/containerd",
    "/etc/kubernetes",
    "/etc/cni/net.d",
    "/opt/cni/bin",
)

PROVIDERS = ("static", "aws")
# The aws worker gives pods security groups (branch ENIs on its trunk, strict mode) from the
# SecurityGroupPolicy objects its agent watches; every other pod there is an ordinary pod.
# Branch links carry 802.1Q, as on EC2 (veths tagged by eBPF where the kernel has no VLAN
# devices, as here).
SG = "[security_groups]\nenabled = true\nbranch_cooldown = 2.0\n"
AGENT_CONFIG = {
    "aws": SG,
    # EKS drop-in: branch ENIs made by (a stand-in for) EKS's resource controller, which the
    # agent asks for on its CNINode (tests/k8s/eks_controller.py runs in test_sg.py)
    "eks": SG + 'branch_source = "eks"\ntrunk_retry = 1.0\n',
}


def machine_paths() -> dict[str, bool]:
    return {p: os.path.lexists(p) for p in MACHINE_PATHS}


@pytest.fixture(scope="package")
def machine_before() -> tuple[dict[str, str], dict[str, bool]]:
    return machine_sysctls(), machine_paths()


@pytest.fixture(scope="package")
def cluster(machine_before: tuple[dict[str, str], dict[str, bool]]) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    with Cluster.running((*PROVIDERS, "eks"), agent_config=AGENT_CONFIG) as running:
        yield running
    sysctls, paths = machine_before
    assert machine_sysctls() == sysctls
    assert machine_paths() == paths


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[Namespace]:
    namespace = Namespace(cluster.api)
    try:
        yield namespace
    finally:
        namespace.close()


@pytest.fixture(params=PROVIDERS)
def worker(request: pytest.FixtureRequest, cluster: Cluster) -> Worker:
    """Each worker in turn: the static provider's, then the aws provider's."""
    return cluster.workers[request.param]
