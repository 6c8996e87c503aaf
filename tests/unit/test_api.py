"""The socket's read methods as agentctl sees them (agent.api), over fakes."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path

import anyio
import attrs
import pytest

from agent.api import AgentApi
from agent.checkpoint import Snapshot
from agent.cni.service import CniService
from agent.config import Config, SnatSection
from agent.daemon import snat_off_reason
from agent.pool.ipam import IpPool
from cloud.provider import AddressBlock
from cloud.static import usable_hosts
from tests.unit.fakes import FakeDatapath, FakeProvider
from tests.unit.test_cni_service import req


@pytest.mark.anyio
async def test_status_counts_cooling_after_the_cooldown_ended(tmp_path: Path) -> None:
    now = [0.0]
    dp = FakeDatapath()
    dp.netns.add("/run/netns/p")
    cidr = "10.0.1.0/29"  # six addresses
    svc = CniService(
        pool=IpPool(cooldown=30.0),
        datapath=dp,
        provider=FakeProvider([AddressBlock(owner=cidr, ips=usable_hosts(IPv4Network(cidr)))]),
        checkpoint_path=tmp_path / "state.json",
        mtu=1500,
        add_wait=0.0,
        clock=lambda: now[0],
    )
    api = AgentApi(svc, Config())
    async with anyio.create_task_group() as tg:
        await tg.start(svc.run)
        await svc.restore(Snapshot())
        await svc.add(req("ADD", "c1"))
        await svc.delete(req("DEL", "c1"))
        pool = api.status()["pool"]
        assert (pool["cooling"], pool["available"]) == (1, 5)
        now[0] = 31.0  # the cooldown is over: no address is cooling any more
        pool = api.status()["pool"]
        assert (pool["cooling"], pool["available"], pool["assigned"]) == (0, 6, 0)
        tg.cancel_scope.cancel()


def test_the_snat_off_warning_says_what_to_change() -> None:
    off = attrs.evolve(Config(), snat=SnatSection(enabled=False))
    assert "snat.enabled is false" in snat_off_reason(off)
    no_cidrs = snat_off_reason(Config())
    assert "snat.vpc_cidrs" in no_cidrs and "enable it and" not in no_cidrs
