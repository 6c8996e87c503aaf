"""The branch datapath's GC (agent/sg/gc.py) on a fake kernel: leaked links go after the grace,
and every run ends by bringing the trunk's 802.1Q demultiplexer back to the live links."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from agent.checkpoint import Allocation
from agent.sg.gc import SgGc
from agent.sg.records import SgAttachment
from netlink.requests import Link
from netlink.vlan import IifRule

pytestmark = pytest.mark.anyio


def link(name: str) -> Link:
    return Link(index=0, flags=1, name=name, mac="", mtu=9001, peer_index=None, kind="veth")


class Kernel:
    def __init__(self, links: list[str]) -> None:
        self.links = {n: link(n) for n in links}
        self.stale_vlans: list[int] = []  # in the demultiplexer, their link gone
        self.syncs: list[tuple[list[int], bool]] = []

    async def branch_links(self) -> dict[str, Link]:
        return dict(self.links)

    async def sync_dot1q(self, parents: list[int], dry_run: bool = False) -> list[str]:
        self.syncs.append((parents, dry_run))
        live = sorted(int(n.rsplit(".", 1)[1]) for n in self.links)
        if not self.stale_vlans:
            return []
        line = f"802.1Q demultiplexer on ifindex 7 for VLANs {live}: held {self.stale_vlans}"
        if not dry_run:
            self.stale_vlans = []
        return [line]

    async def iif_rules(self) -> list[IifRule]:
        return []

    async def delete_iif_rules(self, rules: list[IifRule]) -> None:
        raise AssertionError("none to delete")

    async def strict_chains(self) -> dict[str, str]:
        return {}

    async def delete_strict_chains(self, host_veths: list[str]) -> None:
        raise AssertionError("none to delete")


def branch_pod(vlan: int) -> Allocation:
    return Allocation(
        network="podwire",
        container_id=f"c{vlan}",
        ifname="eth0",
        ip=IPv4Address(f"10.0.8.{vlan}"),
        netns=f"/run/netns/p{vlan}",
        host_veth=f"pwv00000000000{vlan}",
        owner=f"eni-b{vlan}",
        table=100 + vlan,
        sg=SgAttachment(
            source="annotation",
            branch=f"eni-b{vlan}",
            vlan=vlan,
            mac="02:00:00:00:00:01",
            subnet_cidr=IPv4Network("10.0.8.0/24"),
            mode="standard",
        ),
    )


async def test_a_leaked_link_goes_and_the_demultiplexer_follows() -> None:
    kernel = Kernel(["vlan.eth.1", "vlan.eth.9"])  # 9: a crashed ADD's, no pod
    now = [0.0]
    deleted: list[list[str]] = []

    async def delete_links(names: list[str]) -> None:
        deleted.append(names)
        for n in names:
            kernel.links.pop(n)
        kernel.stale_vlans = [9]  # as the kernel: its VLAN stays until the next sync

    gc = SgGc(
        kernel,
        lambda: [branch_pod(1)],
        delete_links,
        grace=10.0,
        clock=lambda: now[0],
        trunks=lambda: [7],
    )
    first = await gc.run_once()
    assert (first.collected, deleted, kernel.syncs) == (0, [], [([7], False)])
    now[0] = 10.0
    assert (await gc.run_once(dry_run=True)).lines == (
        "delete link vlan.eth.9: no branch pod owns it",
    )
    report = await gc.run_once()
    assert deleted == [["vlan.eth.9"]]
    assert report.collected == 2 and report.errors == ()
    assert report.lines == (
        "delete link vlan.eth.9: no branch pod owns it",
        "802.1Q demultiplexer on ifindex 7 for VLANs [1]: held [9]",
    )
    assert kernel.syncs[-1] == ([7], False)
    assert (await gc.run_once()).collected == 0
