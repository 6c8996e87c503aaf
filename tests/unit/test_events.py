from __future__ import annotations

import anyio
import pytest

from agent.events import EventBus


@pytest.mark.anyio
async def test_subscribers_get_events_in_order_and_slow_ones_drop() -> None:
    bus = EventBus(buffer=3)
    bus.publish("before")
    got: list[str] = []
    async with bus.subscribe(replay=True) as fast, bus.subscribe() as slow:
        for i in range(5):
            bus.publish("add", ip=f"10.0.0.{i}")
        async for event in fast:
            got.append(event["kind"] + event.get("ip", ""))
            if len(got) == 3:
                break
        first_slow = await slow.__anext__()
    assert got == ["before", "add10.0.0.0", "add10.0.0.1"]
    assert first_slow["ip"] == "10.0.0.0"
    assert bus.dropped == 3 + 2  # "fast" buffered 3 of 6 (one replayed), "slow" 3 of 5
    bus.publish("after")  # no subscriber left: nothing blocks
    assert [e["kind"] for e in bus.recent()][-1] == "after"


@pytest.mark.anyio
async def test_unsubscribe_on_exit() -> None:
    bus = EventBus()
    async with bus.subscribe():
        assert "subscribers=1" in repr(bus)
    assert "subscribers=0" in repr(bus)
    with anyio.fail_after(1):
        bus.publish("x")
