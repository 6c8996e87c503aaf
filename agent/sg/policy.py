"""Which security groups a pod gets: a pure function of the pod's identity and the policies.

Theory of operation. ``decide`` looks at three sources, first match wins:

1. the annotation ``vpc.amazonaws.com/pod-eni`` (EKS's resource controller made and associated
   the branch; the agent only wires it): source ``eks``;
2. the annotation ``podwire.io/security-groups`` (1-5 ids; the agent makes the branch):
   source ``annotation``;
3. SecurityGroupPolicy objects (``vpcresources.k8s.aws/v1beta1``) of the pod's namespace, matched
   as EKS's resource controller does (``filterPodSecurityGroups``): a policy with neither
   selector, or with no groups, is skipped; a set selector must match (both, when both are set);
   an empty selector ``{}`` matches everything, an absent one does not take part; a selector
   Kubernetes would reject (an unknown operator, ``In`` without values...) matches nothing; the
   result is the union of every matching policy's groups, de-duplicated in first-seen order:
   source ``policy``;
4. otherwise the pod is an ordinary pod on the shared warm pool: source ``none``.

A pod's labels and its service account's labels come from whoever knows them (the agent's
Kubernetes watch); without them (``None``) selectors see no labels. Policies only apply to pods
being created: nothing here ever looks at a running pod again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import attrs

from agent.sg.annotations import (
    POD_ENI,
    SECURITY_GROUPS,
    AnnotationError,
    PodEni,
    parse_group_ids,
    parse_pod_eni,
)

OPERATORS: Final = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


class Source(enum.Enum):
    """Where a pod's security groups came from."""

    EKS = "eks"  # vpc.amazonaws.com/pod-eni: a branch made by EKS's resource controller
    ANNOTATION = "annotation"  # podwire.io/security-groups
    POLICY = "policy"  # SecurityGroupPolicy objects
    NONE = "none"  # an ordinary pod


@attrs.frozen(kw_only=True)
class Requirement:
    """One ``matchExpressions`` entry of a Kubernetes label selector."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        """Whether Kubernetes would accept it (``LabelSelectorAsSelector``)."""
        if not self.key or self.operator not in OPERATORS:
            return False
        if self.operator in ("In", "NotIn"):
            return bool(self.values)
        return not self.values

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@attrs.frozen(kw_only=True)
class LabelSelector:
    """A Kubernetes label selector; the empty selector matches everything."""

    match_labels: Mapping[str, str] = attrs.field(factory=dict)
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def valid(self) -> bool:
        return all(r.valid for r in self.match_expressions) and all(k for k in self.match_labels)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy every term; an invalid selector matches nothing."""
        if not self.valid:
            return False
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        return all(r.matches(labels) for r in self.match_expressions)


@attrs.frozen(kw_only=True)
class SecurityGroupPolicy:
    """A ``SecurityGroupPolicy`` object: ``spec.podSelector``, ``spec.serviceAccountSelector``
    (None: not set) and ``spec.securityGroups.groupIds``."""

    namespace: str
    name: str
    group_ids: tuple[str, ...]
    pod_selector: LabelSelector | None = None
    service_account_selector: LabelSelector | None = None

    @property
    def usable(self) -> bool:
        """EKS skips a policy with neither selector or with no groups."""
        has_selector = self.pod_selector is not None or self.service_account_selector is not None
        return has_selector and bool(self.group_ids)

    def selects(self, pod: PodIdentity) -> bool:
        """Whether this policy applies to ``pod`` (namespace, then every set selector)."""
        if pod.namespace != self.namespace or not self.usable:
            return False
        if self.pod_selector is not None and not self.pod_selector.matches(pod.labels or {}):
            return False
        sa = self.service_account_selector
        return sa is None or sa.matches(pod.service_account_labels or {})


@attrs.frozen(kw_only=True)
class PodIdentity:
    """What the decision may look at: the pod's namespace and name, its labels and its service
    account's labels (None: unknown, matched as no labels), and its annotations."""

    namespace: str
    name: str = ""
    labels: Mapping[str, str] | None = None
    service_account_labels: Mapping[str, str] | None = None
    annotations: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Decision:
    """A pod's security groups and where they came from.

    ``branch`` is set for source EKS (the branch to wire; its groups are EKS's business, so
    ``groups`` is empty); ``policies`` names the policies that matched for source POLICY.
    """

    source: Source
    groups: tuple[str, ...] = ()
    branch: PodEni | None = None
    policies: tuple[str, ...] = ()

    @property
    def wants_branch(self) -> bool:
        return self.source is not Source.NONE

    def describe(self) -> str:
        if self.source is Source.EKS:
            assert self.branch is not None
            return f"branch {self.branch.eni_id} from {POD_ENI} (vlan {self.branch.vlan})"
        if self.source is Source.ANNOTATION:
            return f"{','.join(self.groups)} from {SECURITY_GROUPS}"
        if self.source is Source.POLICY:
            return f"{','.join(self.groups)} from SecurityGroupPolicy {','.join(self.policies)}"
        return "shared pool"


ORDINARY: Final = Decision(source=Source.NONE)


def policy_groups(
    pod: PodIdentity, policies: Iterable[SecurityGroupPolicy]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (the union of the matching policies' groups in first-seen order, the names of the
    matching policies in order)."""
    groups: list[str] = []
    names: list[str] = []
    for p in policies:
        if not p.selects(pod):
            continue
        names.append(p.name)
        for g in p.group_ids:
            if g not in groups:
                groups.append(g)
    return tuple(groups), tuple(names)


def decide(pod: PodIdentity, policies: Sequence[SecurityGroupPolicy] = ()) -> Decision:
    """Return the pod's security groups (see the module's theory). Raises AnnotationError for an
    annotation that is present but unusable: a pod that asks for groups never silently gets
    none."""
    eni = pod.annotations.get(POD_ENI)
    if eni is not None:
        return Decision(source=Source.EKS, branch=parse_pod_eni(eni))
    groups = pod.annotations.get(SECURITY_GROUPS)
    if groups is not None:
        return Decision(source=Source.ANNOTATION, groups=parse_group_ids(groups))
    found, names = policy_groups(pod, policies)
    if found:
        return Decision(source=Source.POLICY, groups=found, policies=names)
    return ORDINARY


__all__ = [
    "ORDINARY",
    "AnnotationError",
    "Decision",
    "LabelSelector",
    "PodEni",
    "PodIdentity",
    "Requirement",
    "SecurityGroupPolicy",
    "Source",
    "decide",
    "policy_groups",
]
