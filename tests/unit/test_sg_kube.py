"""The matcher fed by the agent's Kubernetes watch: selectors as the API gives them, a pod
whose groups cannot be decided yet, and SecurityGroupPolicy matching through the CNI service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from agent.cni.spec import CniError
from agent.sg.kube import KubeGroups, selector
from agent.sg.policy import LabelSelector, Requirement
from cloud.kube.objects import PodInfo, PolicyObject, ServiceAccountInfo
from tests.unit.test_sg_service import SG, Node, req, start

pytestmark = pytest.mark.trio


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (None, None),
        ({}, LabelSelector()),
        ({"matchLabels": {"role": "db"}}, LabelSelector(match_labels={"role": "db"})),
        (
            {"matchExpressions": [{"key": "env", "operator": "In", "values": ["qa", "prod"]}]},
            LabelSelector(
                match_expressions=(Requirement(key="env", operator="In", values=("qa", "prod")),)
            ),
        ),
    ],
)
async def test_selectors_as_the_api_gives_them(raw: Any, want: LabelSelector | None) -> None:
    assert selector(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        {"matchLabels": ["role"]},
        {"matchExpressions": {"key": "x"}},
        {"matchExpressions": [5]},
        {"matchExpressions": [{"key": "x", "operator": "In", "values": "qa"}]},
        {"matchExpressions": [{"invalid": "what the parser keeps of a bad shape"}]},
    ],
)
async def test_a_selector_kubernetes_would_reject_matches_nothing(raw: Any) -> None:
    sel = selector(raw)
    assert sel is not None and not sel.matches({}) and not sel.matches({"role": "db", "x": "1"})


def pol(name: str, groups: tuple[str, ...], **spec: Any) -> PolicyObject:
    return PolicyObject(
        namespace="shop", name=name, uid=name, resource_version="1", group_ids=groups, **spec
    )


@attrs.define
class FakeKube:
    pods: dict[tuple[str, str], PodInfo] = attrs.Factory(dict)
    accounts: dict[tuple[str, str], ServiceAccountInfo] = attrs.Factory(dict)
    sa_synced: bool = True
    pols: list[PolicyObject] = attrs.Factory(list)
    waited: list[float] = attrs.Factory(list)

    def policies_of(self, namespace: str) -> list[PolicyObject]:
        return [p for p in self.pols if p.namespace == namespace]

    async def wait_pod(self, namespace: str, name: str, uid: str, timeout: float) -> Any:
        self.waited.append(timeout)
        pod = self.pods.get((namespace, name))
        if pod is None:
            await trio.sleep(timeout)
        return pod

    def service_account(self, namespace: str, name: str) -> Any:
        return self.accounts.get((namespace, name))

    def service_accounts_known(self, namespace: str) -> bool:
        return self.sa_synced


def pod(name: str, labels: dict[str, str], sa: str = "default") -> PodInfo:
    return PodInfo(
        namespace="shop",
        name=name,
        uid=f"u-{name}",
        resource_version="1",
        labels=labels,
        service_account=sa,
    )


async def test_policies_select_pods_by_their_labels_and_service_account(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    kube = FakeKube()
    kube.pols = [
        pol("db", ("sg-000000db",), pod_selector={"matchLabels": {"role": "db"}}),
        pol("batch", ("sg-0000ba70",), service_account_selector={"matchLabels": {"team": "b"}}),
        pol("broken", ("sg-0000dead",), pod_selector={}, problem="spec.securityGroups..."),
    ]
    kube.pods[("shop", "db1")] = pod("db1", {"role": "db"})
    kube.pods[("shop", "job1")] = pod("job1", {"role": "job"}, sa="batcher")
    kube.pods[("shop", "web1")] = pod("web1", {"role": "web"})
    kube.accounts[("shop", "batcher")] = ServiceAccountInfo(
        namespace="shop", name="batcher", uid="sa", resource_version="1", labels={"team": "b"}
    )
    node = Node(tmp_path)
    groups = KubeGroups(kube, pod_wait=5.0)
    node.sg.policies = node.sg.identities = groups
    async with trio.open_nursery() as tg:
        await start(node, tg)
        for name in ("db1", "job1", "web1"):
            await node.cni.add(req("ADD", name))
        got = {
            k.container_id: a.sg.groups if a.sg else None for k, a in node.cni.allocations.items()
        }
        assert got == {"db1": ("sg-000000db",), "job1": ("sg-0000ba70",), "web1": None}
        # the explicit annotation needs no cluster: decided before asking it
        kube.waited.clear()
        await node.cni.add(req("ADD", "ann", annotations=SG))
        assert kube.waited == []
        tg.cancel_scope.cancel()


async def test_a_pod_not_in_the_cache_or_accounts_not_synced_is_not_decided_on_guesses(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    kube = FakeKube(sa_synced=False)
    kube.pols = [pol("batch", ("sg-0000ba70",), service_account_selector={})]
    node = Node(tmp_path)
    node.sg.policies = node.sg.identities = KubeGroups(kube, pod_wait=5.0)
    async with trio.open_nursery() as tg:
        await start(node, tg)
        started = trio.current_time()
        with pytest.raises(CniError) as e:
            await node.cni.add(req("ADD", "ghost"))
        assert e.value.code == 11 and "not in the agent's cache yet" in e.value.details
        assert trio.current_time() - started == pytest.approx(5.0)  # it waited for the pod
        kube.pods[("shop", "job1")] = pod("job1", {})
        with pytest.raises(CniError) as e:
            await node.cni.add(req("ADD", "job1"))
        assert e.value.code == 11 and "service accounts of shop" in e.value.details
        kube.sa_synced = True
        await node.cni.add(req("ADD", "job1"))  # the account is missing: no labels, {} matches
        (a,) = node.cni.allocations.values()
        assert a.sg is not None and a.sg.groups == ("sg-0000ba70",)
        tg.cancel_scope.cancel()


async def test_without_policies_an_unknown_pod_is_an_ordinary_pod(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    node = Node(tmp_path)
    node.sg.policies = node.sg.identities = KubeGroups(FakeKube(), pod_wait=5.0)
    async with trio.open_nursery() as tg:
        await start(node, tg)
        await node.cni.add(req("ADD", "ghost"))
        (a,) = node.cni.allocations.values()
        assert a.sg is None
        tg.cancel_scope.cancel()
