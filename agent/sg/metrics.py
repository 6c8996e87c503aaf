"""Prometheus metrics of security groups for pods, in the agent's registry.

Events: ``podwire_branch_workflows_total{workflow,outcome}`` and
``podwire_branch_workflow_duration_seconds{workflow}`` (create: create + associate; delete:
disassociate + delete), ``podwire_sg_adds_total{source}`` (eks, annotation, policy).
State read at scrape time: ``podwire_branch_enis{state}``, ``podwire_branch_limit``,
``podwire_branch_vlans_held_by_others``, ``podwire_trunk_attached``,
``podwire_branch_link_info{kind}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "podwire_"
# Create + associate: two EC2 calls, a second or two; tens when throttled.
WORKFLOW_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)


class BranchCollector(Collector):
    """The branch manager's counts and the trunk's state, at scrape time."""

    def __init__(self, state: Callable[[], Mapping[str, float]]) -> None:
        self._state = state

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                f"{PREFIX}branch_enis", "Branch ENIs of this node by state.", labels=("state",)
            ),
            GaugeMetricFamily(f"{PREFIX}branch_limit", "Branch ENIs the trunk can carry."),
            GaugeMetricFamily(
                f"{PREFIX}branch_vlans_held_by_others",
                "VLANs of the trunk held by branches the agent did not make (EKS's).",
            ),
            GaugeMetricFamily(f"{PREFIX}trunk_attached", "1 while the trunk ENI is attached."),
            GaugeMetricFamily(
                f"{PREFIX}branch_link_info",
                "How branch links carry 802.1Q here: vlan (VLAN devices), ebpf (a veth tagged "
                "by eBPF under tc, where the kernel has no VLAN devices).",
                labels=("kind",),
            ),
        )

    def collect(self) -> Iterator[Metric]:
        enis, limit, others, trunk, link = self._families()
        state = self._state()
        for name in ("creating", "associated", "cooling", "deleting"):
            enis.add_metric((name,), state.get(name, 0))
        limit.add_metric((), state.get("limit", 0))
        others.add_metric((), state.get("others", 0))
        trunk.add_metric((), state.get("trunk", 0))
        for key, value in state.items():
            if key.startswith("link:"):
                link.add_metric((key[5:],), value)
        yield from (enis, limit, others, trunk, link)


class SgMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.workflows = Counter(
            f"{PREFIX}branch_workflows",
            "Branch ENI workflows by kind (create, delete) and outcome (ok or the error).",
            ("workflow", "outcome"),
            registry=r,
        )
        self.workflow_duration = Histogram(
            f"{PREFIX}branch_workflow_duration_seconds",
            "Time a branch ENI workflow took, by kind.",
            ("workflow",),
            buckets=WORKFLOW_BUCKETS,
            registry=r,
        )
        self.adds = Counter(
            f"{PREFIX}sg_adds",
            "ADDs of pods with security groups, by where the groups came from.",
            ("source",),
            registry=r,
        )
        for w in ("create", "delete"):
            self.workflow_duration.labels(w)
        self._collector: BranchCollector | None = None

    def workflow(self, workflow: str, outcome: str, seconds: float) -> None:
        self.workflows.labels(workflow, outcome).inc()
        self.workflow_duration.labels(workflow).observe(seconds)

    def add(self, source: str) -> None:
        self.adds.labels(source).inc()

    def watch(self, state: Callable[[], Mapping[str, float]]) -> None:
        """Read the branch gauges from ``state`` (a later call replaces an earlier one: the
        daemon makes a new SgService on every attempt to restore)."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = BranchCollector(state)
        self.registry.register(self._collector)
