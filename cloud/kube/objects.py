"""The few fields of Kubernetes objects the agent looks at, as frozen data, and their parsers.

Parsers take the API's JSON (a dict as decoded) and never raise for an object the API server
accepted: a field of an unexpected shape reads as absent, and a SecurityGroupPolicy whose spec
cannot be used carries the reason in ``problem`` (the matcher skips it and says why). Label
selectors stay as the API gave them (``Mapping``); the security-group matcher parses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Network, ip_network
from typing import Any, Final

import attrs

POD_ENI_RESOURCE: Final = "vpc.amazonaws.com/pod-eni"

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


@attrs.frozen(kw_only=True)
class PodInfo:
    namespace: str
    name: str
    uid: str
    resource_version: str
    node_name: str = ""
    service_account: str = "default"
    labels: Mapping[str, str] = attrs.field(factory=dict)
    annotations: Mapping[str, str] = attrs.field(factory=dict)
    phase: str = ""
    host_network: bool = False
    pod_ip: str = ""
    deleting: bool = False  # deletionTimestamp set: graceful deletion under way
    # containers[0] asks for vpc.amazonaws.com/pod-eni (EKS's webhook adds it to pods that
    # SecurityGroupPolicy selects; EKS's controller then makes the branch)
    requests_pod_eni: bool = False

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


@attrs.frozen(kw_only=True)
class ServiceAccountInfo:
    namespace: str
    name: str
    uid: str
    resource_version: str
    labels: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


@attrs.frozen(kw_only=True)
class NodeInfo:
    name: str
    uid: str
    resource_version: str
    pod_cidrs: tuple[IPv4Network, ...] = ()  # spec.podCIDRs, IPv4 only (in their order)
    provider_id: str = ""
    labels: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def namespace(self) -> str:
        return ""

    @property
    def key(self) -> Key:
        return ("", self.name)


@attrs.frozen(kw_only=True)
class PolicyObject:
    """A SecurityGroupPolicy (``vpcresources.k8s.aws/v1beta1``) as stored: the selectors as
    given (None: the field is absent), the group ids, and ``problem`` when the spec is
    unusable as it is."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    group_ids: tuple[str, ...] = ()
    pod_selector: Mapping[str, Any] | None = None
    service_account_selector: Mapping[str, Any] | None = None
    problem: str = ""

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _map(value).items()}


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return _map(obj.get("metadata"))


def _common(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = _meta(obj)
    return {
        "name": str(meta.get("name", "")),
        "uid": str(meta.get("uid", "")),
        "resource_version": str(meta.get("resourceVersion", "")),
    }


def resource_version(obj: Mapping[str, Any]) -> str:
    """metadata.resourceVersion of any object (a watch BOOKMARK carries only that)."""
    return str(_meta(obj).get("resourceVersion", ""))


def _requests_pod_eni(spec: Mapping[str, Any]) -> bool:
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return False
    resources = _map(_map(containers[0]).get("resources"))
    return any(POD_ENI_RESOURCE in _map(resources.get(k)) for k in ("limits", "requests"))


def parse_pod(obj: Mapping[str, Any]) -> PodInfo:
    meta, spec, status = _meta(obj), _map(obj.get("spec")), _map(obj.get("status"))
    return PodInfo(
        namespace=str(meta.get("namespace", "")),
        **_common(obj),
        node_name=str(spec.get("nodeName") or ""),
        service_account=str(spec.get("serviceAccountName") or "default"),
        labels=_strings(meta.get("labels")),
        annotations=_strings(meta.get("annotations")),
        phase=str(status.get("phase") or ""),
        host_network=bool(spec.get("hostNetwork")),
        pod_ip=str(status.get("podIP") or ""),
        deleting=bool(meta.get("deletionTimestamp")),
        requests_pod_eni=_requests_pod_eni(spec),
    )


def parse_service_account(obj: Mapping[str, Any]) -> ServiceAccountInfo:
    meta = _meta(obj)
    return ServiceAccountInfo(
        namespace=str(meta.get("namespace", "")),
        **_common(obj),
        labels=_strings(meta.get("labels")),
    )


def parse_node(obj: Mapping[str, Any]) -> NodeInfo:
    spec = _map(obj.get("spec"))
    cidrs = spec.get("podCIDRs")
    if not isinstance(cidrs, list) or not cidrs:
        cidrs = [spec["podCIDR"]] if spec.get("podCIDR") else []
    v4: list[IPv4Network] = []
    for c in cidrs:
        try:
            net = ip_network(str(c), strict=False)
        except ValueError:
            continue  # the API server validates these; an IPv6 one is simply not ours
        if isinstance(net, IPv4Network) and net not in v4:
            v4.append(net)
    return NodeInfo(
        **_common(obj),
        pod_cidrs=tuple(v4),
        provider_id=str(spec.get("providerID") or ""),
        labels=_strings(_meta(obj).get("labels")),
    )


def _selector(spec: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = spec.get(key)
    if value is None:
        return None
    return value if isinstance(value, dict) else {"matchExpressions": [{"invalid": value}]}


def parse_policy(obj: Mapping[str, Any]) -> PolicyObject:
    meta, spec = _meta(obj), _map(obj.get("spec"))
    groups = _map(spec.get("securityGroups")).get("groupIds")
    problem = ""
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        problem = "spec.securityGroups.groupIds is not a list of strings"
        groups = []
    return PolicyObject(
        namespace=str(meta.get("namespace", "")),
        **_common(obj),
        group_ids=tuple(groups),
        pod_selector=_selector(spec, "podSelector"),
        service_account_selector=_selector(spec, "serviceAccountSelector"),
        problem=problem,
    )
