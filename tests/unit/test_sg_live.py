"""Live changes of running pods' security groups (the plan, as rows), and what the cluster's
view says at ADD when it cannot decide: the policies not listed, the API unreachable, an EKS
pod waiting for the controller's annotation."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import attrs
import pytest
import trio
import trio.testing

from agent.checkpoint import Allocation
from agent.kube.service import KubeService
from agent.sg.annotations import POD_ENI, PodEni
from agent.sg.kube import KubeGroups
from agent.sg.live import LiveGroups, RestartToApply, Retarget, Running, plan
from agent.sg.policy import ORDINARY, Decision, PodIdentity, Source
from agent.sg.records import SgAttachment
from cloud.errors import CloudUnavailable
from tests.unit.kube_fakes import FakeCollections, pod, policy

EKS_A = PodEni(
    eni_id="eni-0aaaaaaaaaaaaaaaa",
    mac="02:00:00:00:00:01",
    ip=IPv4Address("10.0.1.5"),
    vlan=1,
    subnet_cidr=IPv4Network("10.0.1.0/24"),
)
EKS_B = PodEni(
    eni_id="eni-0bbbbbbbbbbbbbbbb",
    mac="02:00:00:00:00:02",
    ip=IPv4Address("10.0.1.6"),
    vlan=2,
    subnet_cidr=IPv4Network("10.0.1.0/24"),
)


def policy_d(*groups: str) -> Decision:
    return Decision(source=Source.POLICY, groups=groups, policies=("p",))


# running source, running groups, running branch | resolved | what to do
ROWS = [
    ("none", (), "", ORDINARY, None),
    ("none", (), "", policy_d("sg-1"), "restart"),
    ("policy", ("sg-1",), "eni-b", policy_d("sg-1"), None),
    ("policy", ("sg-1",), "eni-b", policy_d("sg-2", "sg-1"), ("retarget", ("sg-2", "sg-1"))),
    (
        "annotation",
        ("sg-1",),
        "eni-b",
        Decision(source=Source.ANNOTATION, groups=("sg-3",)),
        ("retarget", ("sg-3",)),
    ),
    ("policy", ("sg-1",), "eni-b", ORDINARY, "restart"),
    ("policy", ("sg-1",), "eni-b", Decision(source=Source.EKS, branch=EKS_A), "restart"),
    ("eks", (), EKS_A.eni_id, Decision(source=Source.EKS, branch=EKS_A), None),
    ("eks", (), EKS_A.eni_id, Decision(source=Source.EKS, branch=EKS_B), "restart"),
    ("eks", (), EKS_A.eni_id, policy_d("sg-1"), "restart"),
    ("policy", ("sg-1",), "eni-b", None, None),  # the cache cannot tell: never act
]


# eni mode: a pod on its set's ENI; any other set is another ENI (running groups | resolved)
SET_ROWS = [
    (("sg-1", "sg-2"), policy_d("sg-2", "sg-1"), None),  # the same set, in another order
    (("sg-1",), policy_d("sg-1", "sg-2"), "another set is another ENI"),
    (("sg-1",), ORDINARY, "no longer selected"),
    (("sg-1",), Decision(source=Source.EKS, branch=EKS_A), "another set is another ENI"),
]


@pytest.mark.parametrize(("groups", "resolved", "want"), SET_ROWS)
def test_plan_rows_of_eni_mode_pods(groups, resolved, want) -> None:  # type: ignore[no-untyped-def]
    r = Running(key="k", pod="ns/p", source="policy", groups=groups, on_set=True)
    actions = plan([r], {"k": resolved})
    if want is None:
        assert actions == []
    else:
        (a,) = actions
        assert isinstance(a, RestartToApply) and want in a.reason and a.running == groups


@pytest.mark.parametrize(("source", "groups", "branch", "resolved", "want"), ROWS)
def test_plan_rows(source, groups, branch, resolved, want) -> None:  # type: ignore[no-untyped-def]
    r = Running(key="k", pod="ns/p", source=source, groups=groups, branch=branch)
    actions = plan([r], {"k": resolved})
    if want is None:
        assert actions == []
    elif want == "restart":
        (a,) = actions
        assert isinstance(a, RestartToApply) and a.pod == "ns/p"
    else:
        (a,) = actions
        assert isinstance(a, Retarget)
        assert (a.branch, a.old, a.new) == ("eni-b", groups, want[1])


@pytest.mark.trio
async def test_facts_say_why_the_cluster_cannot_decide(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fc = FakeCollections()
    fc.policies_api.down = True  # the policies cannot be listed yet
    kube = KubeService(fc, "n1")
    groups = KubeGroups(kube, pod_wait=5)
    async with trio.open_nursery() as n:
        await n.start(kube.run)
        await trio.sleep(3)
        facts = await groups.facts("free", "x", "")
        assert "SecurityGroupPolicy objects not listed yet" in facts.pending
        assert "connection refused" in facts.pending
        fc.policies_api.down = False
        fc.policies_api.put(policy("db", "shop", ("sg-db",), pod_selector={}))
        await kube.policies.synced.wait()  # type: ignore[union-attr]
        await kube.pods.synced.wait()
        # the API unreachable: a pod a policy may select cannot be decided, and says why
        fc.pods_api.down = True
        fc.pods_api.cut()
        await trio.testing.wait_all_tasks_blocked()
        facts = await groups.facts("shop", "new", "")
        assert "not in the agent's cache" in facts.pending
        assert "the Kubernetes API cannot be reached" in facts.pending
        # an ordinary pod (no policy in its namespace) is decided all the same
        assert (await groups.facts("free", "x", "")).pending == ""
        n.cancel_scope.cancel()


@pytest.mark.trio
async def test_eks_pods_wait_for_the_controllers_annotation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fc = FakeCollections()
    kube = KubeService(fc, "n1")
    groups = KubeGroups(kube, pod_wait=5, eks=True)
    annotation = '[{"eniId":"eni-0aaaaaaaaaaaaaaaa"}]'
    async with trio.open_nursery() as n:
        await n.start(kube.run)
        await kube.pods.synced.wait()
        fc.pods_api.put(pod("web", "shop", requests_pod_eni=True))

        async def controller() -> None:
            await trio.sleep(2)
            fc.pods_api.put(
                pod("web", "shop", requests_pod_eni=True, annotations={POD_ENI: annotation})
            )

        n.start_soon(controller)
        t0 = trio.current_time()
        facts = await groups.facts("shop", "web", "")
        assert facts.pending == "" and facts.annotations[POD_ENI] == annotation
        assert trio.current_time() - t0 == pytest.approx(2)
        # never annotated: try again later, saying what it waits for
        fc.pods_api.put(pod("late", "shop", requests_pod_eni=True))
        facts = await groups.facts("shop", "late", "")
        assert "waiting for EKS's resource controller" in facts.pending
        # a pod that does not ask is not held up
        fc.pods_api.put(pod("plain", "shop"))
        assert (await groups.facts("shop", "plain", "")).pending == ""
        n.cancel_scope.cancel()


def _alloc(name: str, sg: SgAttachment | None = None) -> Allocation:
    return Allocation(
        network="podwire",
        container_id=f"c-{name}",
        ifname="eth0",
        ip=IPv4Address("10.0.1.9"),
        netns="/x",
        host_veth="v",
        owner="o",
        pod_namespace="shop",
        pod_name=name,
        sg=sg,
    )


@pytest.mark.trio
async def test_live_groups_carries_out_the_plan(autojump_clock: trio.testing.MockClock) -> None:
    branch = SgAttachment(
        source="policy",
        branch="eni-b",
        vlan=1,
        mac="02:00:00:00:00:09",
        subnet_cidr=IPv4Network("10.0.1.0/24"),
        groups=("sg-1",),
    )
    allocs = {"web": _alloc("web", branch), "plain": _alloc("plain")}
    resolved = {"web": policy_d("sg-2"), "plain": policy_d("sg-2")}
    calls: list[tuple[str, tuple[str, ...]]] = []
    announced: list[tuple[str, str]] = []
    refuse = {"on": True}

    async def retarget(key: str, groups: tuple[str, ...]) -> None:
        calls.append((key, groups))
        if refuse["on"]:
            raise CloudUnavailable("ModifyNetworkInterfaceAttribute", "503")

    async def update(key: str, action: Retarget) -> bool:
        name = key.split("/")[1].removeprefix("c-")
        a = allocs[name]
        assert a.sg is not None
        allocs[name] = attrs.evolve(a, sg=attrs.evolve(a.sg, groups=action.new))
        return True

    async def announce(pod: str, reason: str, message: str, type: str) -> None:
        announced.append((pod, reason))

    outcomes: list[str] = []
    live = LiveGroups(
        allocations=lambda: list(allocs.values()),
        resolve=lambda identity: resolved[identity.name] if identity else None,
        identity=lambda ns, name: PodIdentity(namespace=ns, name=name),
        retarget=retarget,
        update=update,
        announce=announce,
        on_outcome=outcomes.append,
        retry=30.0,
    )
    async with trio.open_nursery() as n:
        await n.start(live.run)
        live.wake()
        await trio.sleep(1)  # past the debounce
        # EC2 refused: reported, the pod keeps what it has; the shared-pool pod: restart
        assert [r["state"].split(":")[0] for r in live.status()["pods"]] == [
            "restart to apply",
            "failed",
        ]
        assert allocs["web"].sg.groups == ("sg-1",)  # type: ignore[union-attr]
        assert sorted(outcomes) == ["failed", "restart_to_apply"]
        # retried after `retry` seconds, without a change in the cluster
        refuse["on"] = False
        await trio.sleep(31)
        await trio.testing.wait_all_tasks_blocked()
        assert allocs["web"].sg.groups == ("sg-2",)  # type: ignore[union-attr]
        assert live.applied == 1 and outcomes.count("applied") == 1
        assert [r["pod"] for r in live.status()["pods"]] == ["shop/plain"]
        # reported once per state, not on every pass
        live.wake()
        await trio.sleep(1)  # past the debounce
        assert outcomes.count("restart_to_apply") == 1
        assert announced.count(("shop/plain", "SecurityGroupsRestartToApply")) == 1
        assert ("shop/web", "SecurityGroupsChanged") in announced
        # the cluster back to what the pod runs with: no longer reported
        resolved["plain"] = ORDINARY
        live.wake()
        await trio.sleep(1)  # past the debounce
        assert live.status()["pods"] == []
        n.cancel_scope.cancel()
