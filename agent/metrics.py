"""Prometheus metrics of the agent, in a registry of their own.

Two kinds: *events* the code reports as they happen (``Metrics.observe_cni``, ``ec2_call``,
...: counters and histograms), and *state* read at scrape time by custom collectors (the pool's
addresses per owner and state, the RPC server's connections, the allocations, health), so a
gauge can never drift from the structure it describes. Names follow Prometheus conventions:
the ``podwire_`` prefix, the unit in the name (``_seconds``), ``_total`` on counters.

Collectors read loop-owned state without locks: scrape from the event loop's thread (the
health server does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.health import Health
from agent.pool.ipam import IpPool
from rpc.server import ServerStats

PREFIX = "podwire_"
CNI_VERBS = ("ADD", "DEL", "CHECK", "GC", "STATUS")

# A CNI verb takes 5-50 ms when all is well; seconds when the pool must grow first.
CNI_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# EC2 answers in 50-500 ms, more when throttled and retried.
EC2_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Create + attach + the link appearing on the node: seconds, tens when EC2 is slow.
ENI_ATTACH_BUCKETS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
# One phase of a CNI request (agent/trace.py): tens of microseconds to milliseconds.
PHASE_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
SNAT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class ScrapeCollector(Collector):
    """State read at scrape time: ``_families`` makes the empty families afresh, ``collect``
    fills them; ``describe`` names them without reading any state."""

    def _families(self) -> tuple[Metric, ...]:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return list(self._families())


class PoolCollector(ScrapeCollector):
    """``podwire_pool_addresses{owner,state}`` from an IpPool at scrape time."""

    def __init__(self, pool: IpPool, clock: Callable[[], float]) -> None:
        self.pool = pool
        self.clock = clock

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        addresses = GaugeMetricFamily(
            f"{PREFIX}pool_addresses",
            "Pod addresses of the node's pool by owner (ENI or CIDR) and state.",
            labels=("owner", "state"),
        )
        cooldown = GaugeMetricFamily(
            f"{PREFIX}pool_cooldown_seconds", "How long a released address cools before reuse."
        )
        withdrawn = GaugeMetricFamily(
            f"{PREFIX}pool_withdrawn_in_use",
            "Addresses that left the node's ranges while a pod holds them (never reused).",
        )
        return addresses, cooldown, withdrawn

    def collect(self) -> Iterator[Metric]:
        addresses, cooldown, withdrawn = self._families()
        for c in self.pool.owner_counts(self.clock()):
            addresses.add_metric((c.owner, "free"), c.total - c.assigned - c.cooling)
            addresses.add_metric((c.owner, "assigned"), c.assigned)
            addresses.add_metric((c.owner, "cooling"), c.cooling)
        cooldown.add_metric((), self.pool.cooldown)
        withdrawn.add_metric((), len(self.pool.withdrawn_in_use()))
        yield addresses
        yield cooldown
        yield withdrawn


class RpcCollector(ScrapeCollector):
    """The RPC server's connection and request counts, from its ServerStats at scrape time."""

    def __init__(self, stats: ServerStats) -> None:
        self.stats = stats

    def _families(
        self,
    ) -> tuple[
        GaugeMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
    ]:
        return (
            GaugeMetricFamily(
                f"{PREFIX}rpc_connections_active", "Open connections to the agent socket."
            ),
            CounterMetricFamily(
                f"{PREFIX}rpc_connections", "Connections accepted on the agent socket."
            ),
            CounterMetricFamily(f"{PREFIX}rpc_requests", "Requests received on the agent socket."),
            CounterMetricFamily(
                f"{PREFIX}rpc_connections_closed",
                "Connections the agent closed or refused to protect itself, by reason.",
                labels=("reason",),
            ),
            CounterMetricFamily(
                f"{PREFIX}rpc_accept_errors",
                "accept() failures for want of descriptors or memory (the agent backs off).",
            ),
        )

    def collect(self) -> Iterator[Metric]:
        active, connections, requests, closed, accept_errors = self._families()
        s = self.stats
        active.add_metric((), s.connections_active)
        connections.add_metric((), s.connections_total)
        requests.add_metric((), s.requests_total)
        closed.add_metric(("refused",), s.connections_refused)
        closed.add_metric(("evicted",), s.connections_evicted)
        closed.add_metric(("timed_out",), s.connections_timed_out)
        accept_errors.add_metric((), s.accept_errors)
        yield from (active, connections, requests, closed, accept_errors)


class HealthCollector(ScrapeCollector):
    """``podwire_service_alive{service}`` and ``podwire_ready_condition{condition}``."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                f"{PREFIX}service_alive", "1 while a tracked service runs.", labels=("service",)
            ),
            GaugeMetricFamily(
                f"{PREFIX}ready_condition",
                "1 while a readiness condition holds.",
                labels=("condition",),
            ),
        )

    def collect(self) -> Iterator[Metric]:
        alive, ready = self._families()
        live = self.health.liveness()
        for name in live.services:
            alive.add_metric((name,), 0 if name in live.dead else 1)
        for c in self.health.readiness().conditions:
            ready.add_metric((c.name,), 1 if c.ok else 0)
        yield alive
        yield ready


class Metrics:
    """The agent's metrics; one instance per daemon, passed to whoever reports events."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cni_requests = Counter(
            f"{PREFIX}cni_requests",
            "CNI requests answered, by verb and CNI result code (0: ok).",
            ("verb", "code"),
            registry=r,
        )
        self.cni_duration = Histogram(
            f"{PREFIX}cni_request_duration_seconds",
            "Time to answer a CNI request, by verb.",
            ("verb",),
            buckets=CNI_BUCKETS,
            registry=r,
        )
        self.ec2_requests = Counter(
            f"{PREFIX}ec2_requests",
            "EC2 API calls by action and outcome (ok, throttled...).",
            ("action", "outcome"),
            registry=r,
        )
        self.ec2_duration = Histogram(
            f"{PREFIX}ec2_request_duration_seconds",
            "EC2 API call latency by action.",
            ("action",),
            buckets=EC2_BUCKETS,
            registry=r,
        )
        self.eni_attach_duration = Histogram(
            f"{PREFIX}eni_attach_duration_seconds",
            "From CreateNetworkInterface to the ENI's link being usable on the node.",
            buckets=ENI_ATTACH_BUCKETS,
            registry=r,
        )
        self.gc_runs = Counter(f"{PREFIX}gc_runs", "Garbage collection passes.", registry=r)
        self.gc_collected = Counter(
            f"{PREFIX}gc_collected",
            "Leaked objects removed by GC, by kind (veth, allocation...).",
            ("kind",),
            registry=r,
        )
        self.gc_repairs = Counter(
            f"{PREFIX}gc_repairs",
            "Objects GC put back in order, by kind (route, rule...).",
            ("kind",),
            registry=r,
        )
        self.snat_reconciles = Counter(
            f"{PREFIX}snat_reconciles",
            "SNAT ruleset reconciles by backend and result.",
            ("backend", "result"),
            registry=r,
        )
        self.snat_duration = Histogram(
            f"{PREFIX}snat_reconcile_duration_seconds",
            "Time to reconcile the SNAT ruleset.",
            ("backend",),
            buckets=SNAT_BUCKETS,
            registry=r,
        )
        self.netlink_events = Counter(
            f"{PREFIX}netlink_events",
            "Netlink events received, by type (link, addr, route...).",
            ("type",),
            registry=r,
        )
        self.allocations = Gauge(
            f"{PREFIX}allocations", "Pod attachments the agent holds an address for.", registry=r
        )
        self.cni_phase = Histogram(
            f"{PREFIX}cni_phase_seconds",
            "Time of each phase of a CNI request, by verb (agent/trace.py names the phases).",
            ("command", "phase"),
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        for verb in CNI_VERBS:  # every verb's histogram exists from the start, at zero
            self.cni_duration.labels(verb)
        self._phase_children: dict[tuple[str, str], Histogram] = {}

    # -- events -----------------------------------------------------------------------------

    def observe_cni(self, verb: str, code: int, seconds: float) -> None:
        """One CNI request answered with ``code`` (0 for success) after ``seconds``."""
        self.cni_requests.labels(verb, str(code)).inc()
        self.cni_duration.labels(verb).observe(seconds)

    def observe_phase(self, verb: str, phase: str, seconds: float) -> None:
        """One phase of one CNI request (agent/trace.py)."""
        # ~10 phases a request: the labelled child is looked up once (labels() takes a lock and
        # validates every time)
        child = self._phase_children.get((verb, phase))
        if child is None:
            child = self._phase_children[(verb, phase)] = self.cni_phase.labels(verb, phase)
        child.observe(seconds)

    def ec2_call(self, action: str, outcome: str, seconds: float) -> None:
        """One EC2 call (``action`` like "AssignPrivateIpAddresses") and how it ended."""
        self.ec2_requests.labels(action, outcome).inc()
        self.ec2_duration.labels(action).observe(seconds)

    def eni_attached(self, seconds: float) -> None:
        self.eni_attach_duration.observe(seconds)

    def gc_run(self, collected: dict[str, int], repaired: dict[str, int]) -> None:
        """One GC pass and what it removed and repaired, counted by kind."""
        self.gc_runs.inc()
        for kind, n in collected.items():
            self.gc_collected.labels(kind).inc(n)
        for kind, n in repaired.items():
            self.gc_repairs.labels(kind).inc(n)

    def snat_reconciled(self, backend: str, result: str, seconds: float) -> None:
        """One SNAT reconcile on ``backend`` ("nft", "iptables") with ``result`` ("ok"...)."""
        self.snat_reconciles.labels(backend, result).inc()
        self.snat_duration.labels(backend).observe(seconds)

    def netlink_event(self, type: str, n: int = 1) -> None:
        self.netlink_events.labels(type).inc(n)

    # -- state read at scrape time ----------------------------------------------------------

    def watch_pool(self, pool: IpPool, clock: Callable[[], float]) -> None:
        self.registry.register(PoolCollector(pool, clock))

    def watch_rpc(self, stats: ServerStats) -> None:
        self.registry.register(RpcCollector(stats))

    def watch_allocations(self, count: Callable[[], int]) -> None:
        self.allocations.set_function(lambda: float(count()))

    def watch_health(self, health: Health) -> None:
        self.registry.register(HealthCollector(health))

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric (call from the event loop)."""
        return generate_latest(self.registry)
