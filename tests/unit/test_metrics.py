"""The agent's metrics: names and labels by Prometheus conventions, values that move."""

from __future__ import annotations

import re
from ipaddress import IPv4Address

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.cni.spec import PodKey
from agent.health import Health
from agent.metrics import CNI_VERBS, Metrics
from agent.pool.ipam import IpPool
from rpc.server import ServerStats

NAME = re.compile(r"^podwire_[a-z][a-z0-9_]*$")
LABEL = re.compile(r"^[a-z][a-z0-9_]*$")


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def wired(clock: Clock | None = None) -> tuple[Metrics, IpPool, ServerStats, Health]:
    m = Metrics()
    pool = IpPool(cooldown=30)
    stats = ServerStats()
    health = Health(conditions=("state",), clock=lambda: 0.0)
    m.watch_pool(pool, clock or Clock())
    m.watch_rpc(stats)
    m.watch_allocations(lambda: 7)
    m.watch_health(health)
    return m, pool, stats, health


def test_names_labels_and_types_follow_the_conventions() -> None:
    m, *_ = wired()
    m.observe_cni("ADD", 0, 0.012)
    m.ec2_call("AssignPrivateIpAddresses", "ok", 0.2)
    m.eni_attached(3.5)
    m.gc_run({"veth": 1}, {"route": 2})
    m.snat_reconciled("nft", "ok", 0.004)
    m.netlink_event("link")
    families = {
        f.name: f
        for f in text_string_to_metric_families(m.text().decode())
        if not f.name.endswith("_created")  # prometheus_client's creation timestamps
    }
    expected = {
        "podwire_pool_addresses": "gauge",
        "podwire_pool_cooldown_seconds": "gauge",
        "podwire_pool_withdrawn_in_use": "gauge",
        "podwire_cni_requests": "counter",
        "podwire_cni_request_duration_seconds": "histogram",
        "podwire_ec2_requests": "counter",
        "podwire_ec2_request_duration_seconds": "histogram",
        "podwire_eni_attach_duration_seconds": "histogram",
        "podwire_gc_runs": "counter",
        "podwire_gc_collected": "counter",
        "podwire_gc_repairs": "counter",
        "podwire_snat_reconciles": "counter",
        "podwire_snat_reconcile_duration_seconds": "histogram",
        "podwire_netlink_events": "counter",
        "podwire_rpc_connections_active": "gauge",
        "podwire_rpc_connections": "counter",
        "podwire_rpc_requests": "counter",
        "podwire_rpc_connections_closed": "counter",
        "podwire_rpc_accept_errors": "counter",
        "podwire_cni_phase_seconds": "histogram",
        "podwire_allocations": "gauge",
        "podwire_service_alive": "gauge",
        "podwire_ready_condition": "gauge",
    }
    assert {n: f.type for n, f in families.items()} == expected
    for f in families.values():
        assert NAME.match(f.name), f.name
        assert f.documentation
        if f.type == "histogram":
            assert f.name.endswith("_seconds"), f.name
        for s in f.samples:
            assert all(LABEL.match(k) for k in s.labels), s
            if f.type == "counter":
                assert s.name.endswith("_total"), s.name


def test_a_dedicated_registry() -> None:
    m = Metrics()
    Metrics()  # a second instance does not collide: nothing goes to the global registry
    m.observe_cni("ADD", 0, 0.01)
    assert (
        prometheus_client.REGISTRY.get_sample_value(
            "podwire_cni_requests_total", {"verb": "ADD", "code": "0"}
        )
        is None
    )


def test_event_methods_move_the_values() -> None:
    m = Metrics()
    for verb in CNI_VERBS:  # present before the first request
        assert value(m, "podwire_cni_request_duration_seconds_count", verb=verb) == 0
    m.observe_cni("ADD", 0, 0.012)
    m.observe_cni("ADD", 11, 2.0)
    m.observe_cni("ADD", 0, 0.02)
    assert value(m, "podwire_cni_requests_total", verb="ADD", code="0") == 2
    assert value(m, "podwire_cni_requests_total", verb="ADD", code="11") == 1
    assert value(m, "podwire_cni_request_duration_seconds_count", verb="ADD") == 3
    assert value(m, "podwire_cni_request_duration_seconds_bucket", verb="ADD", le="0.025") == 2
    assert value(m, "podwire_cni_request_duration_seconds_sum", verb="ADD") == pytest.approx(2.032)

    m.ec2_call("AttachNetworkInterface", "ok", 0.3)
    m.ec2_call("AttachNetworkInterface", "RequestLimitExceeded", 0.1)
    assert (
        value(
            m,
            "podwire_ec2_requests_total",
            action="AttachNetworkInterface",
            outcome="RequestLimitExceeded",
        )
        == 1
    )
    assert (
        value(m, "podwire_ec2_request_duration_seconds_count", action="AttachNetworkInterface") == 2
    )

    m.eni_attached(4.2)
    assert value(m, "podwire_eni_attach_duration_seconds_bucket", le="8.0") == 1
    assert value(m, "podwire_eni_attach_duration_seconds_bucket", le="4.0") == 0

    m.gc_run({"veth": 3, "allocation": 1}, {"rule": 2})
    m.gc_run({}, {})
    assert value(m, "podwire_gc_runs_total") == 2
    assert value(m, "podwire_gc_collected_total", kind="veth") == 3
    assert value(m, "podwire_gc_repairs_total", kind="rule") == 2

    m.snat_reconciled("iptables", "error", 0.2)
    assert value(m, "podwire_snat_reconciles_total", backend="iptables", result="error") == 1
    m.netlink_event("link", 5)
    m.netlink_event("link")
    assert value(m, "podwire_netlink_events_total", type="link") == 6


def test_state_is_read_at_scrape_time() -> None:
    m, _, stats, health = wired()
    assert value(m, "podwire_allocations") == 7
    assert value(m, "podwire_rpc_connections_active") == 0
    stats.connections_active, stats.connections_total, stats.requests_total = 2, 9, 40
    assert value(m, "podwire_rpc_connections_active") == 2
    assert value(m, "podwire_rpc_connections_total") == 9
    assert value(m, "podwire_rpc_requests_total") == 40
    assert value(m, "podwire_ready_condition", condition="state") == 0
    health.set_ready("state", True, "restored")
    assert value(m, "podwire_ready_condition", condition="state") == 1


def test_the_pool_collector_reports_counts_per_owner_and_state() -> None:
    clock = Clock()
    m, pool, *_ = wired(clock)
    assert value(m, "podwire_pool_addresses", owner="eni-1", state="free") is None
    pool.add_block("eni-1", [IPv4Address(f"10.0.1.{i}") for i in range(1, 6)], table=2)
    pool.add_block("eni-2", [IPv4Address(f"10.0.2.{i}") for i in range(1, 3)], table=3)
    keys = [PodKey(network="podwire", container_id=f"c{i}", ifname="eth0") for i in range(4)]
    leases = [pool.assign(k, now=0.0) for k in keys]
    assert [lease.owner for lease in leases] == ["eni-1"] * 4
    pool.release(leases[0].ip, now=90.0)  # the collector's clock says 100: still cooling
    counts = {
        (owner, state): value(m, "podwire_pool_addresses", owner=owner, state=state)
        for owner in ("eni-1", "eni-2")
        for state in ("free", "assigned", "cooling")
    }
    assert counts == {
        ("eni-1", "free"): 1,
        ("eni-1", "assigned"): 3,
        ("eni-1", "cooling"): 1,
        ("eni-2", "free"): 2,
        ("eni-2", "assigned"): 0,
        ("eni-2", "cooling"): 0,
    }
    clock.now = 120.0  # cooldown 30 elapsed: free again
    assert value(m, "podwire_pool_addresses", owner="eni-1", state="free") == 2
    assert value(m, "podwire_pool_addresses", owner="eni-1", state="cooling") == 0
    assert value(m, "podwire_pool_cooldown_seconds") == 30
    # the agent's own view agrees
    assert sum(c.total for c in pool.owner_counts(clock.now)) == pool.total == 7


def test_watching_twice_is_a_bug() -> None:
    m = Metrics()
    stats = ServerStats()
    m.watch_rpc(stats)
    with pytest.raises(ValueError, match="Duplicated"):
        m.watch_rpc(stats)
