"""Pods with security groups through the CNI service: the decision's sources, the branch
lease, DEL's cooldown, the errors a runtime sees, and a restart, on trio's virtual clock with a
fake trunk and a fake datapath."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from agent import checkpoint as ckpt
from agent.checkpoint import Snapshot
from agent.cni.service import CniService
from agent.cni.spec import CniError, CniRequest, validate
from agent.config import SecurityGroupsSection
from agent.pool.ipam import IpPool
from agent.sg.branches import State
from agent.sg.policy import LabelSelector, SecurityGroupPolicy
from agent.sg.service import SgService, StaticPolicies
from cloud.errors import NotFound
from cloud.provider import AddressBlock
from cloud.static import usable_hosts
from netlink.dot1q.links import Support
from tests.unit.fake_cloud import FakeTrunk
from tests.unit.fakes import FakeDatapath, FakeProvider

pytestmark = pytest.mark.trio

CONF = {"cniVersion": "1.0.0", "name": "podwire", "type": "podwire"}
APP = "sg-0000a990"
NETNS = "/run/netns/p"


@attrs.frozen
class Trunk:
    eni_id: str = "eni-trunk"
    mac: str = "02:00:00:00:0e:01"
    device_index: int = 2
    subnet_id: str = "subnet-1"


@attrs.frozen
class Link:
    index: int = 7
    name: str = "eth2"


class FakeTrunkProvider:
    def __init__(self, instance_type: str = "m5.large", trunk: bool = False) -> None:
        self.instance_type = instance_type
        self._trunk: Trunk | None = Trunk() if trunk else None
        self.created = 0

    def trunk(self) -> Trunk | None:
        return self._trunk

    async def find_trunk(self) -> Trunk | None:
        return self._trunk  # EKS's controller attaching one later: ``attach`` below

    def attach(self) -> None:
        self._trunk = Trunk()

    async def create_trunk(self) -> Trunk:
        self.created += 1
        self._trunk = Trunk()
        return self._trunk

    async def configure_trunk(self) -> Trunk:
        assert self._trunk is not None
        return self._trunk


class Waiter:
    async def wait_link(self, mac: str, timeout: float) -> Link:
        return Link()


NO_VLAN_DEVICES = Support(vlan_devices=False, ebpf="")  # this machine's kernel


class Rules:
    def __init__(self, support: Support = NO_VLAN_DEVICES) -> None:
        self.moved = 0
        self.support = support
        self.probes = 0

    async def move_local_rule(self) -> bool:
        self.moved += 1
        return self.moved == 1

    async def vlan_support(self) -> Support:
        self.probes += 1
        return self.support


async def write_here(path: Path, data: bytes) -> None:
    ckpt.write_atomically(path, data)


def limits(itype: str) -> int | None:
    return {"m5.large": 9, "t3.large": 0}.get(itype)


class Node:
    def __init__(self, tmp: Path, **sg: Any) -> None:
        self.tmp = tmp
        self.trunk_cloud = FakeTrunk(limit=9, subnet="10.0.8.0/24")
        self.provider = FakeTrunkProvider(sg.pop("instance_type", "m5.large"))
        self.rules = Rules(sg.pop("support", NO_VLAN_DEVICES))
        self.settings = SecurityGroupsSection(**{"enabled": True, "branch_wait": 5.0, **sg})
        self.dp = FakeDatapath()
        self.dp.netns.add(NETNS)
        self.policies: list[SecurityGroupPolicy] = []
        self.cni, self.sg = self.make()

    def make(self) -> tuple[CniService, SgService]:
        async def branch_cloud(trunk: Any) -> FakeTrunk:
            return self.trunk_cloud

        sg = SgService(
            self.settings,
            provider=self.provider,
            link_waiter=Waiter(),
            rules=self.rules,
            branch_cloud=branch_cloud,
            branch_limit=limits,
            policies=StaticPolicies(self.policies),
            wall=trio.current_time,
            sweep_interval=10.0,
        )
        cidr = IPv4Network("10.0.1.0/28")
        cni = CniService(
            pool=IpPool(cooldown=30.0),
            datapath=self.dp,
            provider=FakeProvider([AddressBlock(owner="eni-0", ips=usable_hosts(cidr))]),
            checkpoint_path=self.tmp / "state.json",
            mtu=1500,
            add_wait=0.0,
            sg=sg,
            # on the event loop: a write in a worker thread would let the virtual clock jump
            checkpoint_writer=write_here,
        )
        sg.commit = cni.checkpoint.commit
        sg.live = cni.holds
        return cni, sg


def req(
    command: str, cid: str, *, annotations: dict[str, str] | None = None, args: str = ""
) -> CniRequest:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": args or f"K8S_POD_NAMESPACE=shop;K8S_POD_NAME={cid}",
    }
    conf: dict[str, Any] = dict(CONF)
    if annotations is not None:
        conf["runtimeConfig"] = {"io.kubernetes.cri.pod-annotations": annotations}
    return validate(env, conf)


SG = {"podwire.io/security-groups": APP}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    yield Node(tmp_path)


async def start(n: Node, tg: trio.Nursery, snap: Snapshot | None = None) -> None:
    await tg.start(n.cni.run)
    await n.cni.restore(snap or Snapshot())
    await tg.start(n.sg.run)


async def test_a_pod_with_groups_gets_a_branch_and_an_ordinary_pod_the_pool(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as tg:
        await start(node, tg)
        assert node.provider.created == 1 and node.rules.moved == 1  # trunk, local rule
        plain = await node.cni.add(req("ADD", "plain"))
        assert plain["ips"][0]["address"] == "10.0.1.1/32"
        got = await node.cni.add(req("ADD", "app", annotations=SG))
        alloc = node.cni.allocations[req("ADD", "app").key]
        assert (
            alloc.sg is not None and alloc.sg.groups == (APP,) and alloc.sg.source == "annotation"
        )
        assert got["ips"][0]["address"] == f"{alloc.ip}/32"
        assert alloc.ip in IPv4Network("10.0.8.0/24") and alloc.owner == alloc.sg.branch
        assert alloc.host_veth.startswith("pws")  # strict: not the SNAT/connmark prefix
        assert alloc.table is None and alloc.sg.vlan == 1 and alloc.sg.mode == "strict"
        pod = node.cni.pod_net(alloc)
        assert pod.branch is not None and pod.branch.trunk_index == 7 and pod.branch.strict
        # this "kernel" has no VLAN devices: 802.1Q by eBPF, probed once, and said so
        assert pod.branch.kind == "ebpf" and node.rules.probes == 1
        assert node.sg.status()["link"] == "ebpf"
        assert "no VLAN devices" in node.sg.status()["link_detail"]
        assert node.sg.trunk_indexes() == [7]
        on_disk = ckpt.load(node.cni.checkpoint.path)
        assert [a.sg for a in on_disk.allocations if a.sg] == [alloc.sg]
        assert [b.state for b in on_disk.branches] == [State.ASSOCIATED]
        # DEL: the branch cools for 60 s, then goes
        await node.cni.delete(req("DEL", "app"))  # the branch cools from its release on
        deleted_at = trio.current_time()
        assert [b.state for b in ckpt.load(node.cni.checkpoint.path).branches] == [State.COOLING]
        await trio.sleep(61.0)
        assert node.trunk_cloud.times("disassociate") == [pytest.approx(deleted_at + 60.0)]
        assert node.trunk_cloud.enis == {} and ckpt.load(node.cni.checkpoint.path).branches == ()
        tg.cancel_scope.cancel()


async def test_standard_mode_uses_the_branch_table_for_its_rules(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    node = Node(tmp_path, enforcing_mode="standard")
    async with trio.open_nursery() as tg:
        await start(node, tg)
        assert node.rules.moved == 0  # the local rule stays at 0
        await node.cni.add(req("ADD", "app", annotations=SG))
        alloc = node.cni.allocations[req("ADD", "app").key]
        assert alloc.table == 101 and alloc.host_veth.startswith("pwv")
        pod = node.cni.pod_net(alloc)
        assert pod.branch is not None and not pod.branch.strict and pod.table == 101
        tg.cancel_scope.cancel()


async def test_groups_from_cni_args_and_from_policies(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    node.policies.append(
        SecurityGroupPolicy(
            namespace="shop", name="all", group_ids=("sg-00000db0",), pod_selector=LabelSelector()
        )
    )
    node.cni, node.sg = node.make()
    async with trio.open_nursery() as tg:
        await start(node, tg)
        await node.cni.add(
            req("ADD", "a", args="K8S_POD_NAMESPACE=x;podwire.io/security-groups=sg-0000cafe")
        )
        a = node.cni.allocations[req("ADD", "a").key]
        assert a.sg is not None and (a.sg.source, a.sg.groups) == ("annotation", ("sg-0000cafe",))
        await node.cni.add(req("ADD", "b"))  # namespace shop: the policy matches
        b = node.cni.allocations[req("ADD", "b").key]
        assert b.sg is not None and (b.sg.source, b.sg.policies) == ("policy", ("all",))
        assert [c.args[1] for c in node.trunk_cloud.ops("create_branch")] == [
            ("sg-0000cafe",),
            ("sg-00000db0",),
        ]
        tg.cancel_scope.cancel()


async def test_the_eks_annotation_is_wired_without_ec2_and_holds_its_vlan(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    eks = json.dumps(
        [
            {
                "eniId": "eni-0123456789abcdef0",
                "ifAddress": "0a:1b:2c:3d:4e:5f",
                "privateIp": "10.0.8.77",
                "vlanId": 1,
                "subnetCidr": "10.0.8.0/24",
                "associationID": "trunk-assoc-0123",
            }
        ]
    )
    async with trio.open_nursery() as tg:
        await start(node, tg)
        await node.cni.add(req("ADD", "eks", annotations={"vpc.amazonaws.com/pod-eni": eks}))
        a = node.cni.allocations[req("ADD", "eks").key]
        assert a.sg is not None and a.sg.source == "eks" and str(a.ip) == "10.0.8.77"
        assert node.trunk_cloud.ops("create_branch", "associate") == []
        await node.cni.add(req("ADD", "mine", annotations=SG))
        mine = node.cni.allocations[req("ADD", "mine").key]
        assert mine.sg is not None and mine.sg.vlan == 2  # VLAN 1 is EKS's branch
        await node.cni.delete(req("DEL", "eks"))
        await trio.sleep(120.0)
        assert node.trunk_cloud.ops("disassociate", "delete_branch") == []  # EKS's to delete
        tg.cancel_scope.cancel()


async def test_a_full_node_answers_code_11_naming_the_limit(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as tg:
        await start(node, tg)
        for i in range(9):
            await node.cni.add(req("ADD", f"p{i}", annotations=SG))
        await node.cni.delete(req("DEL", "p0"))
        with pytest.raises(CniError) as e:
            await node.cni.add(req("ADD", "p9", annotations=SG))
        assert e.value.code == 11 and e.value.msg == "no branch ENI available"
        assert "limit reached: 9 per trunk; 8 in use, 1 cooling" in e.value.details
        await trio.sleep(61.0)
        await node.cni.add(req("ADD", "p9", annotations=SG))
        tg.cancel_scope.cancel()


async def test_started_means_sg_pods_are_served_and_before_that_they_are_answered_11(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as tg:
        await tg.start(node.cni.run)
        await node.cni.restore(Snapshot())
        # the trunk is there, the branch workflows are not running yet
        assert node.sg.manager is not None and not node.sg.manager.running
        with pytest.raises(CniError) as e:
            await node.cni.add(req("ADD", "early", annotations=SG))
        assert (e.value.code, e.value.details) == (11, "the branch workflows start")
        assert node.cni.allocations == {}
        await tg.start(node.sg.run)
        assert node.sg.manager.running  # no loop turn needed before an ADD is served
        got = await node.cni.add(req("ADD", "early", annotations=SG))
        assert got["ips"] and node.cni.allocations[req("ADD", "early").key].sg is not None
        tg.cancel_scope.cancel()


async def test_errors_a_runtime_sees(node: Node, autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as tg:
        await start(node, tg)
        bad = {"podwire.io/security-groups": "default"}
        with pytest.raises(CniError) as e:
            await node.cni.add(req("ADD", "bad", annotations=bad))
        assert e.value.code == 111 and "not a security group id" in e.value.details
        node.trunk_cloud.inject(
            "create_branch",
            NotFound("CreateNetworkInterface", "InvalidSecurityGroupID.NotFound", "sg-0000dead"),
        )
        with pytest.raises(CniError) as e:
            await node.cni.add(
                req("ADD", "gone2", annotations={"podwire.io/security-groups": "sg-0000dead"})
            )
        assert (e.value.code, e.value.msg) == (111, "security group does not exist")
        assert "sg-0000dead" in e.value.details
        assert node.cni.allocations == {} and node.sg.records() == []
        tg.cancel_scope.cancel()


async def test_a_slow_branch_answers_11_and_the_retry_gets_it(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    node.trunk_cloud.delays["associate"] = 30.0
    async with trio.open_nursery() as tg:
        await start(node, tg)
        with pytest.raises(CniError) as e:
            await node.cni.add(req("ADD", "slow", annotations=SG))
        assert (e.value.code, e.value.msg) == (11, "branch ENI not ready yet")
        assert req("ADD", "slow").key not in node.cni.allocations
        await trio.sleep(30.0)
        await node.cni.add(req("ADD", "slow", annotations=SG))
        assert len(node.trunk_cloud.ops("create_branch")) == 1
        tg.cancel_scope.cancel()


async def test_off_and_unsupported_refuse_pods_with_groups_and_serve_the_others(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    for settings, code, text in (
        ({"enabled": False}, 112, "not enabled"),
        ({"instance_type": "t3.large"}, 112, "t3.large does not support ENI trunking"),
        ({"instance_type": "x9.huge"}, 112, "x9.huge is not known to support ENI trunking"),
        (
            {
                "support": Support(
                    vlan_devices=False, ebpf="load eBPF program: Operation not permitted"
                )
            },
            112,
            "no 802.1Q: this kernel has no VLAN devices and load eBPF program",
        ),
    ):
        node = Node(tmp_path / str(code) / text[:4], **settings)
        (tmp_path / str(code) / text[:4]).mkdir(parents=True)
        async with trio.open_nursery() as tg:
            await start(node, tg)
            with pytest.raises(CniError) as e:
                await node.cni.add(req("ADD", "app", annotations=SG))
            assert e.value.code == code and text in (e.value.msg + e.value.details)
            await node.cni.add(req("ADD", "plain"))
            assert node.provider.created == 0 and not node.sg.reserves_trunk_slot
            tg.cancel_scope.cancel()


async def test_restart_keeps_a_live_pods_branch_and_cools_an_orphan(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as tg:
        await start(node, tg)
        await node.cni.add(req("ADD", "live", annotations=SG))
        await node.cni.add(req("ADD", "dead", annotations=SG))
        tg.cancel_scope.cancel()
    snap = ckpt.load(node.cni.checkpoint.path)
    live = node.cni.allocations[req("ADD", "live").key]
    # the "dead" pod's veth vanished while the agent was down
    node.dp.pods.pop(node.cni.allocations[req("ADD", "dead").key].host_veth)
    node.provider._trunk = Trunk()
    node.cni, node.sg = node.make()
    async with trio.open_nursery() as tg:
        dropped = await node.cni.restore(snap)
        await tg.start(node.cni.run)
        await tg.start(node.sg.run)
        assert [a.container_id for a, _ in dropped] == ["dead"]
        states = {b.vlan: b.state for b in node.sg.records()}
        assert states == {1: State.ASSOCIATED, 2: State.COOLING}
        await trio.sleep(61.0)
        assert set(node.trunk_cloud.enis) == {live.sg.branch if live.sg else ""}
        assert node.provider.created == 1  # the trunk was found, not made again
        tg.cancel_scope.cancel()


async def test_the_service_never_exits_and_a_restore_retry_reuses_the_metrics(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Health counts an exited service as dead; the daemon makes a new SgService on every
    restore attempt, all on one registry."""
    from agent.sg.metrics import SgMetrics

    metrics = SgMetrics()
    for settings in ({"enabled": False}, {"instance_type": "t3.large"}, {}):
        node = Node(tmp_path, **settings)
        node.sg.metrics = metrics
        again = SgService(
            node.settings,
            provider=None,
            link_waiter=None,
            rules=None,
            branch_cloud=None,
            branch_limit=limits,
            metrics=metrics,
        )
        assert again.state in ("disabled", "starting")
        ended: list[str] = []

        async def sg_run(sg: SgService = node.sg, ended: list[str] = ended) -> None:
            await sg.run()
            ended.append(sg.state)

        async with trio.open_nursery() as tg:
            await tg.start(node.cni.run)
            await node.cni.restore(Snapshot())
            tg.start_soon(sg_run)
            await trio.sleep(3600.0)
            assert ended == [], f"the security-groups service exited in state {ended}"
            tg.cancel_scope.cancel()
