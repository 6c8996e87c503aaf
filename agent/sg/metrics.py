"""Prometheus metrics of security groups for pods, in the agent's registry.

Events: ``podwire_branch_workflows_total{workflow,outcome}`` and
``podwire_branch_workflow_duration_seconds{workflow}`` (create: create + associate; delete:
disassociate + delete), ``podwire_sg_adds_total{source}`` (eks, annotation, policy).
State read at scrape time: ``podwire_branch_enis{state}``, ``podwire_branch_limit``,
``podwire_branch_vlans_held_by_others``, ``podwire_trunk_attached``,
``podwire_branch_link_info{kind}``.

eni mode: ``podwire_sg_refused_total{limit}`` (ADDs answered 11 because their set could get
no address: ``eni_slots``), and at scrape time ``podwire_sg_set_enis{set}``,
``podwire_sg_set_addresses{set,state}`` (assigned, cooling, free) and
``podwire_sg_set_waiting{set}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from agent.metrics import ScrapeCollector

PREFIX = "podwire_"
# Create + associate: two EC2 calls, a second or two; tens when throttled.
WORKFLOW_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)


class BranchCollector(ScrapeCollector):
    """The branch manager's counts and the trunk's state, at scrape time."""

    def __init__(self, state: Callable[[], Mapping[str, float]]) -> None:
        self._state = state

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
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


class SetCollector(ScrapeCollector):
    """eni mode's sets (``SetPools.rows``), at scrape time."""

    def __init__(self, rows: Callable[[], Sequence[Mapping[str, Any]]]) -> None:
        self._rows = rows

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                f"{PREFIX}sg_set_enis", "ENIs of a set of security groups.", labels=("set",)
            ),
            GaugeMetricFamily(
                f"{PREFIX}sg_set_addresses",
                "Addresses of a set of security groups by state.",
                labels=("set", "state"),
            ),
            GaugeMetricFamily(
                f"{PREFIX}sg_set_waiting",
                "ADDs waiting for an address of a set of security groups.",
                labels=("set",),
            ),
        )

    def collect(self) -> Iterator[Metric]:
        enis, addresses, waiting = self._families()
        for r in self._rows():
            enis.add_metric((r["set"],), len(r["enis"]))
            for state in ("assigned", "cooling", "free"):
                addresses.add_metric((r["set"], state), r[state])
            waiting.add_metric((r["set"],), r["waiting"])
        yield from (enis, addresses, waiting)


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
        self.refusals = Counter(
            f"{PREFIX}sg_refused",
            "ADDs of pods with security groups answered 11 because of a node limit.",
            ("limit",),
            registry=r,
        )
        for w in ("create", "delete"):
            self.workflow_duration.labels(w)
        self._collector: BranchCollector | None = None
        self._sets: SetCollector | None = None

    def workflow(self, workflow: str, outcome: str, seconds: float) -> None:
        self.workflows.labels(workflow, outcome).inc()
        self.workflow_duration.labels(workflow).observe(seconds)

    def add(self, source: str) -> None:
        self.adds.labels(source).inc()

    def refused(self, limit: str) -> None:
        self.refusals.labels(limit).inc()

    def watch_sets(self, rows: Callable[[], Sequence[Mapping[str, Any]]]) -> None:
        """Read the sets' gauges from ``rows`` (a later call replaces an earlier one)."""
        if self._sets is not None:
            self.registry.unregister(self._sets)
        self._sets = SetCollector(rows)
        self.registry.register(self._sets)

    def watch(self, state: Callable[[], Mapping[str, float]]) -> None:
        """Read the branch gauges from ``state`` (a later call replaces an earlier one: the
        daemon makes a new SgService on every attempt to restore)."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = BranchCollector(state)
        self.registry.register(self._collector)
