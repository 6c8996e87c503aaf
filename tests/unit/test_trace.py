"""The phase trace (agent/trace.py) through the agent's API, over fakes."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from agent.api import AgentApi
from agent.checkpoint import Snapshot
from agent.config import Config
from agent.trace import Traces, mark
from rpc.server import CURRENT_REQUEST, RequestTiming
from tests.unit.test_cni_service import CONF, service


def test_marks_become_phases_and_outside_a_trace_nothing_happens() -> None:
    mark("ipam")  # no trace: a no-op
    seen: list[tuple[str, str, float]] = []
    traces = Traces(observe=lambda c, p, s: seen.append((c, p, s)))
    t = traces.start("ADD", "k", [1_000_000, 3_000_000], 4_000_000)
    t.marks.append(("validate", 4_500_000))
    traces.finish(t, 6_000_000)
    assert t.phases() == [
        ("connect", 0.002),
        ("send", 0.001),
        ("validate", 0.0005),
        ("reply", 0.0015),
    ]
    assert [p for _, p, _ in seen] == ["connect", "send", "validate", "reply"]
    assert traces.recent(since=1_000_000)[0]["marks"][0] == ["start", 1_000_000]
    assert traces.recent(since=1_000_001) == []


@pytest.mark.anyio
async def test_an_add_and_a_del_are_traced_phase_by_phase(tmp_path: Path) -> None:
    svc, _ = service(tmp_path)
    api = AgentApi(svc, Config())
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/run/netns/p",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
    }
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.restore(Snapshot())
        for method, command in (("cni.add", "ADD"), ("cni.del", "DEL")):
            now = time.monotonic_ns()
            timing = RequestTiming(received=now)
            token = CURRENT_REQUEST.set(timing)
            try:
                params = {
                    "env": {**env, "CNI_COMMAND": command},
                    "config": CONF,
                    "trace": [now - 2000, now - 1000],
                }
                await api(method, params, None)  # type: ignore[arg-type]
            finally:
                CURRENT_REQUEST.reset(token)
            assert timing.on_replied is not None
            timing.on_replied(time.monotonic_ns())
        tg.cancel_scope.cancel()
    add, delete = api.traces.recent()
    assert [n for n, _ in add["marks"]] == [
        "start",
        "connect",
        "send",
        "validate",
        "ipam",
        "checkpoint",
        "wire",
        "reply",
    ]
    assert [n for n, _ in delete["marks"]] == [
        "start",
        "connect",
        "send",
        "validate",
        "delete",
        "checkpoint",
        "reply",
    ]
    assert add["key"] == "podwire/c1/eth0" and add["code"] == 0
    times = [t for _, t in add["marks"]]
    assert times == sorted(times)
    text = api.metrics.text().decode()
    assert 'podwire_cni_phase_seconds_count{command="ADD",phase="wire"} 1.0' in text


@pytest.mark.anyio
async def test_an_add_is_logged_and_counted_once_its_reply_is_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    svc, _ = service(tmp_path)
    api = AgentApi(svc, Config())
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/run/netns/p",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
    }
    counted = 'podwire_cni_requests_total{code="0",verb="ADD"} 1.0'

    def logged() -> bool:
        return any(r.getMessage() == "ADD" and r.levelname == "INFO" for r in caplog.records)

    caplog.set_level("INFO", logger="podwire")
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.restore(Snapshot())
        timing = RequestTiming(received=time.monotonic_ns())
        token = CURRENT_REQUEST.set(timing)
        try:
            result = await api("cni.add", {"env": env, "config": CONF}, None)  # type: ignore[arg-type]
        finally:
            CURRENT_REQUEST.reset(token)
        assert result["ips"] and not logged() and counted not in api.metrics.text().decode()
        assert timing.on_replied is not None
        timing.on_replied(time.monotonic_ns())
        tg.cancel_scope.cancel()
    assert logged() and counted in api.metrics.text().decode()
    assert api.traces.recent()[0]["marks"][-1][0] == "reply"  # the trace is finished too
