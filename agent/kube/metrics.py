"""Prometheus metrics of the agent's watches of its cluster, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.kube.service import KubeService

PREFIX = "podwire_kube_"


class KubeCollector(Collector):
    """Per watch: connected, synced, objects, lists, 410s, errors, events."""

    def __init__(self, kube: KubeService) -> None:
        self.kube = kube

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        w = ("watch",)
        return [
            GaugeMetricFamily(
                f"{PREFIX}watch_connected", "1 while the watch's last request succeeded.", labels=w
            ),
            GaugeMetricFamily(
                f"{PREFIX}watch_synced", "1 once a complete list has landed.", labels=w
            ),
            GaugeMetricFamily(f"{PREFIX}objects", "Objects held by the watch.", labels=w),
            CounterMetricFamily(f"{PREFIX}lists", "Complete lists of the watch.", labels=w),
            CounterMetricFamily(
                f"{PREFIX}expired", "410 Gone answers (each followed by a list).", labels=w
            ),
            CounterMetricFamily(f"{PREFIX}errors", "Failed list or watch requests.", labels=w),
            CounterMetricFamily(f"{PREFIX}events", "Watch events applied.", labels=w),
        ]

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        for r in self.kube.reflectors():
            s = r.status
            values = (
                s.connected,
                s.synced,
                s.objects,
                s.lists,
                s.expired,
                s.errors,
                s.events,
            )
            for fam, value in zip(fams, values, strict=True):
                fam.add_metric([s.name], float(value))
        yield from fams
