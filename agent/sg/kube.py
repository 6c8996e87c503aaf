"""The matcher's inputs from the agent's Kubernetes watch (``agent.kube.service.KubeService``):
SecurityGroupPolicy objects of a namespace, and a pod's labels, its service account's labels
and its annotations.

The API's label selectors are parsed here (``selector``): a shape Kubernetes would reject
becomes a selector that matches nothing, as ``LabelSelectorAsSelector`` fails for EKS's
controller. A pod whose groups cannot be decided yet -- it is not in the cache, or a policy of
its namespace selects by service account and that namespace's accounts are not synced -- is
reported as such (``Facts.pending``) and its ADD answers "try again later": deciding on
missing labels would give it the wrong groups for its whole life.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import anyio
import attrs

from agent.sg.annotations import POD_ENI
from agent.sg.policy import LabelSelector, Requirement, SecurityGroupPolicy


def selector(raw: Mapping[str, Any] | None) -> LabelSelector | None:
    """A ``metav1.LabelSelector`` as the API gave it; None when the field is absent."""
    if raw is None:
        return None
    labels = raw.get("matchLabels") or {}
    exprs = raw.get("matchExpressions") or []
    bad = LabelSelector(match_expressions=(Requirement(key="", operator="invalid"),))
    if not isinstance(labels, Mapping) or not isinstance(exprs, list):
        return bad
    reqs = []
    for e in exprs:
        if not isinstance(e, Mapping):
            return bad
        values = e.get("values") or []
        if not isinstance(values, list):
            return bad
        reqs.append(
            Requirement(
                key=str(e.get("key", "")),
                operator=str(e.get("operator", "")),
                values=tuple(str(v) for v in values),
            )
        )
    return LabelSelector(
        match_labels={str(k): str(v) for k, v in labels.items()}, match_expressions=tuple(reqs)
    )


class PolicyView(Protocol):
    """``cloud.kube.objects.PolicyObject``."""

    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def group_ids(self) -> tuple[str, ...]: ...
    @property
    def pod_selector(self) -> Mapping[str, Any] | None: ...
    @property
    def service_account_selector(self) -> Mapping[str, Any] | None: ...
    @property
    def problem(self) -> str: ...


def policy(obj: PolicyView) -> SecurityGroupPolicy | None:
    """The matcher's policy, or None for one whose spec cannot be used."""
    if obj.problem:
        return None
    return SecurityGroupPolicy(
        namespace=obj.namespace,
        name=obj.name,
        group_ids=obj.group_ids,
        pod_selector=selector(obj.pod_selector),
        service_account_selector=selector(obj.service_account_selector),
    )


@attrs.frozen(kw_only=True)
class Facts:
    """What the cluster says about one pod; ``pending`` says why it cannot be used yet."""

    labels: Mapping[str, str] | None = None
    service_account_labels: Mapping[str, str] | None = None
    annotations: Mapping[str, str] = attrs.field(factory=dict)
    pending: str = ""


class Kube(Protocol):
    """What is read of ``agent.kube.service.KubeService``."""

    def policies_of(self, namespace: str) -> Sequence[Any]: ...
    async def wait_pod(self, namespace: str, name: str, uid: str, timeout: float) -> Any: ...
    def service_account(self, namespace: str, name: str) -> Any: ...
    def service_accounts_known(self, namespace: str) -> bool: ...
    def pod(self, namespace: str, name: str) -> Any: ...
    async def changed(self) -> None: ...


class KubeGroups:
    """``PolicySource`` and ``IdentitySource`` over the agent's watch of its cluster."""

    def __init__(self, kube: Kube, *, pod_wait: float = 5.0, eks: bool = False) -> None:
        self.kube = kube
        self.pod_wait = pod_wait
        # EKS's resource controller makes the branches: a pod that asks for
        # vpc.amazonaws.com/pod-eni waits (pod_wait) for the controller's annotation
        self.eks = eks

    def policies(self, namespace: str) -> Sequence[SecurityGroupPolicy]:
        found = (policy(p) for p in self.kube.policies_of(namespace))
        return [p for p in found if p is not None]

    async def facts(self, namespace: str, name: str, uid: str) -> Facts:
        listed = getattr(self.kube, "policies", None)  # the policies' reflector
        if getattr(getattr(listed, "status", None), "synced", True) is False:
            # deciding without the policies would put a pod they select on the shared pool
            return Facts(pending=f"SecurityGroupPolicy objects not listed yet ({_cause(listed)})")
        usable = [p for p in self.policies(namespace) if p.usable]
        pod = await self.kube.wait_pod(namespace, name, uid, self.pod_wait) if name else None
        if pod is None:
            if usable:
                return Facts(
                    pending=f"pod {namespace}/{name} is not in the agent's cache yet"
                    + _unreachable(self.kube)
                )
            return Facts()
        if self.eks and pod.requests_pod_eni and POD_ENI not in pod.annotations:
            pod = await self._wait_pod_eni(pod, uid)
            if POD_ENI not in pod.annotations:
                return Facts(
                    pending=f"pod {namespace}/{name} asks for {POD_ENI}: waiting for EKS's "
                    "resource controller to make its branch ENI" + _unreachable(self.kube)
                )
        sa_labels = None
        if any(p.service_account_selector is not None for p in usable):
            if not self.kube.service_accounts_known(namespace):
                return Facts(
                    annotations=pod.annotations,
                    pending=f"service accounts of {namespace} are not in the agent's cache yet",
                )
            account = self.kube.service_account(namespace, pod.service_account)
            sa_labels = account.labels if account is not None else {}
        return Facts(
            labels=pod.labels, service_account_labels=sa_labels, annotations=pod.annotations
        )

    async def _wait_pod_eni(self, pod: Any, uid: str) -> Any:
        """The pod once its ``vpc.amazonaws.com/pod-eni`` annotation is in the cache (up to
        ``pod_wait``); the pod as it was when it is not."""
        with anyio.move_on_after(self.pod_wait):
            while True:
                now = self.kube.pod(pod.namespace, pod.name)
                if now is not None and (not uid or now.uid == uid) and POD_ENI in now.annotations:
                    return now
                if not _connected(self.kube):
                    break
                await self.kube.changed()
        return pod


def _cause(reflector: Any) -> str:
    return str(reflector.status.last_error or "the first list has not landed")


def _connected(kube: Any) -> bool:
    """Whether the pods' watch is up (a view without one counts as up)."""
    return bool(getattr(getattr(getattr(kube, "pods", None), "status", None), "connected", True))


def _unreachable(kube: Any) -> str:
    """``; the Kubernetes API cannot be reached: <why>`` while the pods' watch is down."""
    if _connected(kube):
        return ""
    return f"; the Kubernetes API cannot be reached: {_cause(kube.pods)}"
