"""Security groups for pods in eni mode through the CNI service, with the refiller running, on
trio's virtual clock against the in-memory cloud: pods asking for the same groups share an ENI
made with exactly those groups, the next pod of a set needs no EC2 call, a set with no pods
goes after its cooldown, a node out of ENI slots answers 11 naming the limit, bad groups 111,
and a restart rebuilds the sets from the cloud and the checkpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agent import checkpoint as ckpt
from agent.checkpoint import Snapshot
from agent.cni.service import CniService
from agent.cni.spec import CniError, CniRequest, validate
from agent.config import SecurityGroupsSection
from agent.pool.ipam import IpPool
from agent.pool.pool_math import InstanceLimits, PoolTargets, SetTargets
from agent.pool.refiller import Refiller
from agent.sg.metrics import SgMetrics
from agent.sg.service import SgService
from cloud.errors import NotFound
from tests.unit.fake_cloud import FakeCloudProvider
from tests.unit.fakes import FakeDatapath

pytestmark = pytest.mark.trio

CONF = {"cniVersion": "1.0.0", "name": "podwire", "type": "podwire"}
NETNS = "/run/netns/p"
APP = "sg-0000a990"
DB = "sg-00000db0"
M5 = InstanceLimits(max_enis=3, ipv4_per_eni=10)
BOTH = tuple(sorted((APP, DB)))  # a set's groups, as its key and its ENI have them
KEY = ",".join(BOTH)


async def write_here(path: Path, data: bytes) -> None:
    ckpt.write_atomically(path, data)


class Node:
    def __init__(self, tmp: Path, cloud: FakeCloudProvider | None = None, **sg: Any) -> None:
        self.tmp = tmp
        self.cloud = cloud or FakeCloudProvider(M5)
        self.settings = SecurityGroupsSection(
            **{"enabled": True, "mode": "eni", "branch_wait": 5.0, "set_cooldown": 20.0, **sg}
        )
        self.dp = FakeDatapath()
        self.dp.netns.add(NETNS)
        self.metrics = SgMetrics()
        self.make()

    def make(self) -> None:
        pool = IpPool(cooldown=10.0)
        self.sg = SgService(
            self.settings,
            provider=None,
            link_waiter=None,
            rules=None,
            branch_cloud=None,
            branch_limit=lambda itype: None,
            metrics=self.metrics,
            wall=trio.current_time,
            pool=pool,
        )
        self.sg.enis = self.cloud.enis
        self.cni = CniService(
            pool=pool,
            datapath=self.dp,
            provider=self.cloud,
            checkpoint_path=self.tmp / "state.json",
            mtu=9001,
            add_wait=1.0,
            sg=self.sg,
            checkpoint_writer=write_here,
        )
        demand = self.cni.demand

        def take() -> trio.Event:
            nonlocal demand
            event = self.cni.demand
            if event.is_set():
                self.cni.demand = trio.Event()  # type: ignore[assignment]
            demand = event
            return event  # type: ignore[return-value]

        assert self.sg.sets is not None
        self.sg.sets.wake = lambda: self.cni.demand.set()
        self.refiller = Refiller(
            pool,
            self.cloud,
            PoolTargets(warm_ip=1),
            M5,
            cni_notify=self.cni.notify_pool_changed,
            demand=take,
            min_eni_age=30.0,
            sets=self.sg.sets,
            set_targets=SetTargets(
                warm_ips=self.settings.set_warm_ips, reserve_enis=self.settings.shared_reserve
            ),
            set_cooldown=self.settings.set_cooldown,
        )


def req(command: str, cid: str, *groups: str, ip: str = "") -> CniRequest:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=shop;K8S_POD_NAME={cid}" + (f";IP={ip}" if ip else ""),
    }
    conf: dict[str, Any] = dict(CONF)
    if groups:
        conf["runtimeConfig"] = {
            "io.kubernetes.cri.pod-annotations": {"podwire.io/security-groups": ",".join(groups)}
        }
    return validate(env, conf)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    yield Node(tmp_path, shared_reserve=0)  # an m5.large: two sets beside the primary


async def start(n: Node, tg: trio.Nursery, snap: Snapshot | None = None) -> None:
    await tg.start(n.cni.run)
    await n.cni.restore(snap or Snapshot())
    await tg.start(n.sg.run)
    await tg.start(n.refiller.run)


def creates(n: Node) -> list[tuple[Any, ...]]:
    return [c.args for c in n.cloud.ops("create_eni")]


async def test_pods_of_one_set_share_an_eni_made_with_exactly_their_groups(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as tg:
        await start(node, tg)
        plain = await node.cni.add(req("ADD", "plain"))
        first = await node.cni.add(req("ADD", "app1", DB, APP))
        a1 = node.cni.allocations[req("ADD", "app1").key]
        assert creates(node) == [(2, 0, *BOTH)]  # the pod + the margin, the set's groups
        eni = next(e for e in node.cloud.enis() if e.pod_groups)
        assert eni.pod_groups == BOTH and a1.owner == eni.eni_id
        assert a1.table == eni.table and a1.sg is None  # routed like any secondary ENI's pod
        assert a1.sg_set is not None and a1.sg_set.groups == (DB, APP)
        assert a1.sg_set.key == KEY and a1.sg_set.source == "annotation"
        assert first["ips"][0]["address"] == f"{a1.ip}/32"
        assert plain["ips"][0]["address"] not in {f"{ip}/32" for ip in eni.ips}
        # the second pod of the set: its address is there already, no EC2 call on its way
        calls = len(node.cloud.calls)
        await node.cni.add(req("ADD", "app2", APP, DB))
        assert len(node.cloud.calls) == calls
        a2 = node.cni.allocations[req("ADD", "app2").key]
        assert a2.owner == eni.eni_id and a2.ip != a1.ip
        await trio.sleep(1)  # ... and the refiller tops the margin up behind it
        assert [c.args for c in node.cloud.ops("assign_ips") if c.args[0] == eni.eni_id] == [
            (eni.eni_id, 1)
        ]
        # another set: another ENI
        await node.cni.add(req("ADD", "other", DB))
        assert creates(node)[-1] == (2, 0, DB)
        view = node.sg.sets_view(node.cni.allocations.values())
        rows = {r["set"]: r for r in view["rows"]}
        assert rows[KEY]["pods"] == ["shop/app1", "shop/app2"]
        assert rows[KEY]["assigned"] == 2 and rows[KEY]["free"] == 1
        assert rows[DB]["enis"][0]["groups"] == [DB]
        assert view["eni_mode"] and "stays on the node" in view["same_node"]
        on_disk = ckpt.load(node.cni.checkpoint.path)
        assert {a.sg_set.key for a in on_disk.allocations if a.sg_set} == {KEY, DB}
        tg.cancel_scope.cancel()


async def test_the_margin_an_add_takes_is_topped_up_once_that_add_has_answered(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as tg:
        await start(node, tg)
        await node.cni.add(req("ADD", "app1", APP))
        await trio.sleep(1)  # the set and its margin of one are there
        eni = next(e for e in node.cloud.enis() if e.pod_groups)
        node.dp.wire_delay = 0.5
        started = trio.current_time()
        await node.cni.add(req("ADD", "app2", APP))  # takes the margin
        answered = trio.current_time()
        assert answered - started >= 0.5
        await trio.sleep(1)
        (topup,) = [c for c in node.cloud.ops("assign_ips") if c.args[0] == eni.eni_id]
        # the top-up's EC2 call never runs beside the ADD that caused it
        assert topup.at >= answered
        assert topup.at - answered < 0.1  # ... but at once after it, not at the next tick
        tg.cancel_scope.cancel()


async def test_the_last_pod_of_a_set_leaves_and_its_eni_goes_after_the_cooldown(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as tg:
        await start(node, tg)
        await node.cni.add(req("ADD", "app", APP))
        eni = next(e for e in node.cloud.enis() if e.pod_groups).eni_id
        await trio.sleep(100)
        assert node.cloud.ops("free_eni") == []  # in use
        await node.cni.delete(req("DEL", "app"))
        left = trio.current_time()
        await trio.sleep(60)
        (free,) = node.cloud.ops("free_eni")
        # the address cools 10 s, the set stays in use 20 s: freed at the next tick after that
        assert free.args == (eni,) and left + 20 <= free.at <= left + 25
        assert node.sg.sets_view(node.cni.allocations.values())["rows"] == []
        tg.cancel_scope.cancel()


async def test_no_slot_left_for_a_new_set_is_code_11_naming_the_limit_then_it_recovers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    node = Node(tmp_path, shared_reserve=1)  # m5.large: the primary, 1 reserved, 1 for sets
    async with trio.open_nursery() as tg:
        await start(node, tg)
        await node.cni.add(req("ADD", "app", APP))
        with pytest.raises(CniError) as e:
            await node.cni.add(req("ADD", "db", DB))
        assert e.value.code == 11 and e.value.msg == "no ENI for the pod's security groups"
        assert "no ENI slot left for a new set of security groups: 3 ENI slots" in (
            e.value.details or ""
        )
        assert "security_groups.shared_reserve = 1" in (e.value.details or "")
        assert node.metrics.refusals.labels("eni_slots")._value.get() == 1
        assert node.sg.status()["refused"].keys() == {DB}
        await node.cni.delete(req("DEL", "app"))  # the set empties: its ENI goes ...
        await trio.sleep(60)
        await node.cni.add(req("ADD", "db", DB))  # ... and the new set gets the slot
        assert [c.args[-1] for c in node.cloud.ops("create_eni")] == [APP, DB]
        tg.cancel_scope.cancel()


async def test_what_cannot_be_served_is_refused_with_a_clear_code(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as tg:
        await start(node, tg)
        node.cloud.inject(
            "create_eni", NotFound("CreateNetworkInterface", "InvalidSecurityGroupID.NotFound")
        )
        with pytest.raises(CniError) as e:
            await node.cni.add(req("ADD", "bad", "sg-00000bad"))
        assert e.value.code == 111 and e.value.msg == "security group does not exist"
        with pytest.raises(CniError) as asked:
            await node.cni.add(req("ADD", "ip", APP, ip="10.0.0.50"))
        assert asked.value.code == 7
        eks = validate(
            {
                "CNI_COMMAND": "ADD",
                "CNI_CONTAINERID": "eks",
                "CNI_NETNS": NETNS,
                "CNI_IFNAME": "eth0",
                "CNI_PATH": "/opt/cni/bin",
            },
            {
                **CONF,
                "runtimeConfig": {
                    "io.kubernetes.cri.pod-annotations": {
                        "vpc.amazonaws.com/pod-eni": '[{"eniId":"eni-0123456789abcdef0",'
                        '"ifAddress":"02:00:00:00:00:01","privateIp":"10.0.0.9","vlanId":1,'
                        '"subnetCidr":"10.0.0.0/24"}]'
                    }
                },
            },
        )
        with pytest.raises(CniError) as branch:
            await node.cni.add(eks)
        assert branch.value.code == 112
        # nothing was handed out for any of them
        assert list(node.cni.allocations) == []
        tg.cancel_scope.cancel()


async def test_an_add_that_waits_too_long_answers_11_and_its_retry_gets_the_address(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    node.cloud.delays["create_eni"] = 8.0  # longer than branch_wait (5 s)
    async with trio.open_nursery() as tg:
        await start(node, tg)
        t0 = trio.current_time()
        with pytest.raises(CniError) as e:
            await node.cni.add(req("ADD", "slow", APP))
        assert e.value.code == 11 and trio.current_time() - t0 == pytest.approx(5.0)
        await trio.sleep(4)
        calls = len(node.cloud.calls)
        await node.cni.add(req("ADD", "slow", APP))  # the runtime's retry
        assert len(node.cloud.calls) == calls
        tg.cancel_scope.cancel()


async def test_a_restart_rebuilds_the_sets_from_the_cloud_and_the_checkpoint(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as tg:
        await start(node, tg)
        await node.cni.add(req("ADD", "a1", APP))
        await node.cni.add(req("ADD", "a2", APP))
        await node.cni.delete(req("DEL", "a2"))  # its address cools, in the set
        tg.cancel_scope.cancel()
    before = dict(node.cni.allocations)
    cooled = node.cni.pool.cooling_items()
    snap = ckpt.load(node.cni.checkpoint.path)
    node.dp.pods = {a.host_veth: node.cni.pod_net(a) for a in before.values()}
    node.make()  # a new agent: pool, services and refiller from nothing
    async with trio.open_nursery() as tg:
        await start(node, tg, snap)
        assert dict(node.cni.allocations) == before
        a1 = before[req("ADD", "a1").key]
        key = f"{APP}"
        pool = node.cni.pool
        assert pool.holder(a1.ip) == a1.key and pool.group_of(a1.owner) == key
        assert [ip for ip, _ in pool.cooling_items()] == [ip for ip, _ in cooled]
        assert pool.available(trio.current_time()) >= 1  # the shared pool is its own
        # the next pod of the set gets an address of the same ENI, not the one still cooling
        await node.cni.add(req("ADD", "a3", APP))
        a3 = node.cni.allocations[req("ADD", "a3").key]
        assert a3.owner == a1.owner and a3.ip not in {ip for ip, _ in cooled}
        assert len(node.cloud.ops("create_eni")) == 1  # made once, before the restart
        tg.cancel_scope.cancel()


async def test_agentctl_shows_each_set_and_says_pods_on_a_node_meet_locally(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    from agent.api import pod_row
    from agent.ctl import show_pods, show_sets, show_sg_line, show_status

    async with trio.open_nursery() as tg:
        await start(node, tg)
        await node.cni.add(req("ADD", "app1", APP))
        await node.cni.add(req("ADD", "plain"))
        view = node.sg.sets_view(node.cni.allocations.values())
        tg.cancel_scope.cancel()
    eni = next(e for e in node.cloud.enis() if e.pod_groups).eni_id
    text = show_sets(view)
    assert "eni mode (an ENI per set of groups); 1 sets on 1 ENIs: 1 pods, 1 free" in text
    assert "traffic on the node stays on the node" in text
    header, row = text.splitlines()[-2:]
    assert header.split() == [
        "GROUPS", "ENI", "TOTAL", "ASSIGNED", "COOLING", "FREE", "PODS", "WAITING", "REFUSED"
    ]  # fmt: skip
    assert row.split() == [APP, eni, "2", "1", "0", "1", "shop/app1"]
    assert show_sg_line(view) in show_status(
        {
            "pid": 1,
            "uptime_s": 1.0,
            "ready": True,
            "provider": "aws",
            "socket": "/s",
            "pods": 2,
            "pool": {"total": 1, "assigned": 1, "cooling": 0, "available": 0, "cooldown_s": 30},
            "checkpoint": {"path": "/x", "writes": 1},
            "snat": {},
            "security_groups": view,
        }
    )
    pods = show_pods([pod_row(a, 0.0) for a in node.cni.allocations.values()])
    assert f"{APP} (eni)" in pods and "shared pool" in pods
    off = show_sets({"enabled": False})
    assert 'security_groups.mode = "eni"' in off
