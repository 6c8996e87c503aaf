"""The SNAT reconciler on a fake backend: an ADD's address is NATed before the ADD answers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import trio
import trio.testing

from agent.config import SnatSection
from agent.snat.rules import SnatSpec, UpdatePlan
from agent.snat.service import SnatService
from cloud.provider import NodeFacts

pytestmark = pytest.mark.trio

FACTS = NodeFacts(
    primary_ip=IPv4Address("10.0.0.10"),
    vpc_cidrs=(IPv4Network("10.0.0.0/16"),),
    pod_cidrs=(),
)


class FakeBackend:
    """Records what was applied; ``fail`` makes every change raise."""

    kind = "fake"

    def __init__(self) -> None:
        self.live: SnatSpec | None = None
        self.fail = False

    def apply(self, spec: SnatSpec) -> None:
        if self.fail:
            raise OSError("backend down")
        self.live = spec

    def update(self, old: SnatSpec | None, new: SnatSpec) -> UpdatePlan:
        self.apply(new)
        return "full"

    def remove(self) -> None:
        self.live = None

    def current_spec_matches(self, spec: SnatSpec) -> bool:
        return self.live == spec

    def close(self) -> None:
        pass


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)  # no worker thread: trio's virtual clock would jump while it runs


def nated(backend: FakeBackend, ip: str) -> bool:
    return backend.live is not None and any(IPv4Address(ip) in n for n in backend.live.pod_cidrs)


@pytest.fixture
async def running() -> AsyncIterator[tuple[SnatService, FakeBackend, list[IPv4Network]]]:
    backend = FakeBackend()
    sources = [IPv4Network("10.1.0.0/24")]
    snat = SnatService(
        SnatSection(verify_interval=3600.0),
        facts=lambda: FACTS,
        pod_cidrs=lambda: tuple(sources),
        open_backend=lambda: backend,
        run_sync=inline,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(snat.serve)
        yield snat, backend, sources
        nursery.cancel_scope.cancel()


async def test_an_address_already_covered_needs_no_reconcile(
    autojump_clock: trio.testing.MockClock,
    running: tuple[SnatService, FakeBackend, list[IPv4Network]],
) -> None:
    snat, backend, _ = running
    before = snat.reconciles
    assert await snat.covers(IPv4Address("10.1.0.5"))
    assert snat.reconciles == before and nated(backend, "10.1.0.5")


async def test_a_new_source_is_applied_before_covers_returns(
    autojump_clock: trio.testing.MockClock,
    running: tuple[SnatService, FakeBackend, list[IPv4Network]],
) -> None:
    snat, backend, sources = running
    sources.append(IPv4Network("10.0.1.19/32"))  # a branch pod's address, nobody said changed()
    assert not nated(backend, "10.0.1.19")
    start = trio.current_time()
    assert await snat.covers(IPv4Address("10.0.1.19"))
    assert nated(backend, "10.0.1.19")
    assert trio.current_time() - start < 0.05  # no settling window for a waiting ADD


async def test_an_address_snat_does_not_want_is_not_waited_for(
    autojump_clock: trio.testing.MockClock,
    running: tuple[SnatService, FakeBackend, list[IPv4Network]],
) -> None:
    snat, backend, _ = running
    before = snat.reconciles
    assert await snat.covers(IPv4Address("10.0.1.20"))  # a strict-mode pod: never NATed
    assert snat.reconciles == before and not nated(backend, "10.0.1.20")


async def test_a_failing_backend_gives_up_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
    running: tuple[SnatService, FakeBackend, list[IPv4Network]],
) -> None:
    snat, backend, sources = running
    backend.fail = True
    sources.append(IPv4Network("10.0.1.21/32"))
    start = trio.current_time()
    assert not await snat.covers(IPv4Address("10.0.1.21"), timeout=2.0)
    assert trio.current_time() - start == pytest.approx(2.0)
    assert "backend down" in snat.last_error
