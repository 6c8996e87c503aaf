"""Which security groups a pod gets: EKS's own matcher cases as rows, then the annotations."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from agent.sg.annotations import AnnotationError, parse_group_ids, parse_pod_eni
from agent.sg.policy import (
    LabelSelector,
    PodIdentity,
    Requirement,
    SecurityGroupPolicy,
    Source,
    decide,
    policy_groups,
)

# The resource controller's test fixtures (pkg/utils/setup_test.go): a pod and its service
# account labelled role=db, environment=qa; groups sg-00001, sg-00002.
NS = "test_namespace"
POD_LABELS = {"role": "db", "environment": "qa", "app": "test_app"}
SA_LABELS = {"role": "db", "environment": "qa"}
GROUPS = ("sg-00001", "sg-00002")
ENV_IN = Requirement(key="environment", operator="In", values=("qa", "production"))
ROLE_DB = {"role": "db"}

POD = PodIdentity(namespace=NS, name="test", labels=POD_LABELS, service_account_labels=SA_LABELS)


def sgp(
    pod: LabelSelector | None = None,
    sa: LabelSelector | None = None,
    groups: tuple[str, ...] = GROUPS,
    name: str = "test",
    namespace: str = NS,
) -> SecurityGroupPolicy:
    return SecurityGroupPolicy(
        namespace=namespace,
        name=name,
        group_ids=groups,
        pod_selector=pod,
        service_account_selector=sa,
    )


FULL = LabelSelector(match_labels=ROLE_DB, match_expressions=(ENV_IN,))
EMPTY = LabelSelector()


@pytest.mark.parametrize(
    ("case", "policies", "pod", "want"),
    [
        # TestCanInjectENI_CombinedSelectors
        ("combined selectors", [sgp(pod=FULL, sa=FULL)], POD, GROUPS),
        # TestCanInjectENI_PodSelectors
        ("pod selector", [sgp(pod=FULL)], POD, GROUPS),
        # TestCanInjectENI_SASelectors
        ("sa selector", [sgp(sa=FULL)], POD, GROUPS),
        # TestCanInjectENI_Multi_SGPs: the union of two policies
        (
            "two policies",
            [sgp(sa=FULL, groups=("sg-00001",)), sgp(pod=FULL, groups=("sg-00002",))],
            POD,
            GROUPS,
        ),
        # TestCanInjectENI_EmptyPodSelector / EmptySASelector: {} matches everything
        ("empty pod selector", [sgp(pod=EMPTY)], POD, GROUPS),
        ("empty sa selector", [sgp(sa=EMPTY)], POD, GROUPS),
        # TestCanInjectENI_MatchLabel* / MatchExpressions*
        ("pod matchLabels", [sgp(pod=LabelSelector(match_labels=ROLE_DB))], POD, GROUPS),
        ("sa matchLabels", [sgp(sa=LabelSelector(match_labels=ROLE_DB))], POD, GROUPS),
        (
            "pod matchExpressions",
            [sgp(pod=LabelSelector(match_expressions=(ENV_IN,)))],
            POD,
            GROUPS,
        ),
        ("sa matchExpressions", [sgp(sa=LabelSelector(match_expressions=(ENV_IN,)))], POD, GROUPS),
        # TestCanInjectENI_MismatchedSASelector: the SA is environment=dev
        (
            "sa mismatch",
            [sgp(sa=FULL)],
            PodIdentity(
                namespace=NS,
                labels=POD_LABELS,
                service_account_labels={"role": "db", "environment": "dev"},
            ),
            (),
        ),
        # TestEmptySecurityGroupInSGP: a policy with no groups is skipped
        ("no groups", [sgp(pod=FULL, groups=())], POD, ()),
        # filterPodSecurityGroups: neither selector set -> skipped as invalid
        ("no selector", [sgp()], POD, ()),
        # both set: both must match (the pod matches, its SA does not)
        (
            "both set, sa fails",
            [sgp(pod=FULL, sa=LabelSelector(match_labels={"role": "web"}))],
            POD,
            (),
        ),
        # TestShouldAddENILimits: another namespace's policies never apply
        ("other namespace", [sgp(pod=EMPTY, namespace="other")], POD, ()),
        # duplicates across policies: first-seen order, once each (RemoveDuplicatedSg)
        (
            "dedupe",
            [
                sgp(pod=EMPTY, groups=("sg-00002", "sg-00001")),
                sgp(sa=EMPTY, groups=("sg-00001", "sg-00003", "sg-00002")),
            ],
            POD,
            ("sg-00002", "sg-00001", "sg-00003"),
        ),
        # a selector Kubernetes would reject matches nothing (LabelSelectorAsSelector fails)
        (
            "In without values",
            [sgp(pod=LabelSelector(match_expressions=(Requirement(key="role", operator="In"),)))],
            POD,
            (),
        ),
        (
            "unknown operator",
            [
                sgp(
                    pod=LabelSelector(
                        match_expressions=(Requirement(key="role", operator="Gt", values=("1",)),)
                    )
                )
            ],
            POD,
            (),
        ),
        (
            "Exists with values",
            [
                sgp(
                    pod=LabelSelector(
                        match_expressions=(
                            Requirement(key="role", operator="Exists", values=("db",)),
                        )
                    )
                )
            ],
            POD,
            (),
        ),
        # the other operators
        (
            "NotIn, DoesNotExist, Exists",
            [
                sgp(
                    pod=LabelSelector(
                        match_expressions=(
                            Requirement(key="environment", operator="NotIn", values=("prod",)),
                            Requirement(key="tier", operator="DoesNotExist"),
                            Requirement(key="app", operator="Exists"),
                        )
                    )
                )
            ],
            POD,
            GROUPS,
        ),
        (
            "NotIn excludes",
            [
                sgp(
                    pod=LabelSelector(
                        match_expressions=(
                            Requirement(key="environment", operator="NotIn", values=("qa",)),
                        )
                    )
                )
            ],
            POD,
            (),
        ),
        # labels not known (no Kubernetes watch): only selectors that need no labels match
        ("unknown labels, matchLabels", [sgp(pod=FULL)], PodIdentity(namespace=NS), ()),
        ("unknown labels, empty selector", [sgp(pod=EMPTY)], PodIdentity(namespace=NS), GROUPS),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_policy_matching_rows(
    case: str, policies: list[SecurityGroupPolicy], pod: PodIdentity, want: tuple[str, ...]
) -> None:
    groups, _ = policy_groups(pod, policies)
    assert groups == want, case
    decision = decide(pod, policies)
    assert decision.groups == want
    assert decision.source is (Source.POLICY if want else Source.NONE)


def test_policy_decision_names_the_matching_policies() -> None:
    policies = [sgp(pod=FULL, name="a"), sgp(pod=LabelSelector(match_labels={"x": "y"}), name="b")]
    policies.append(sgp(sa=EMPTY, name="c", groups=("sg-00009",)))
    d = decide(POD, policies)
    assert d.policies == ("a", "c")
    assert d.groups == ("sg-00001", "sg-00002", "sg-00009")
    assert d.describe() == "sg-00001,sg-00002,sg-00009 from SecurityGroupPolicy a,c"


POD_ENI_DOC = [
    {
        "eniId": "eni-0123456789abcdef0",
        "ifAddress": "0A:1B:2C:3D:4E:5F",
        "privateIp": "10.0.3.7",
        "ipv6Addr": "",
        "vlanId": 1,
        "subnetCidr": "10.0.0.0/19",
        "subnetV6Cidr": "",
        "associationID": "trunk-assoc-0123456789abcdef0",
    }
]


def test_eks_annotation_wins_over_everything_and_needs_no_groups() -> None:
    pod = PodIdentity(
        namespace=NS,
        labels=POD_LABELS,
        annotations={
            "vpc.amazonaws.com/pod-eni": json.dumps(POD_ENI_DOC),
            "podwire.io/security-groups": "sg-0000aaaa",
        },
    )
    d = decide(pod, [sgp(pod=EMPTY)])
    assert d.source is Source.EKS and d.groups == ()
    assert d.branch is not None
    assert d.branch.eni_id == "eni-0123456789abcdef0"
    assert d.branch.mac == "0a:1b:2c:3d:4e:5f"
    assert d.branch.ip == IPv4Address("10.0.3.7")
    assert d.branch.vlan == 1
    assert d.branch.subnet_cidr == IPv4Network("10.0.0.0/19")
    assert d.branch.gateway == IPv4Address("10.0.0.1")
    assert d.branch.association_id == "trunk-assoc-0123456789abcdef0"


def test_group_annotation_wins_over_policies() -> None:
    pod = PodIdentity(
        namespace=NS, labels=POD_LABELS, annotations={"podwire.io/security-groups": "sg-0000aaaa"}
    )
    d = decide(pod, [sgp(pod=EMPTY)])
    assert (d.source, d.groups) == (Source.ANNOTATION, ("sg-0000aaaa",))


def test_vlan_id_spelt_either_way_and_only_element_0_counts() -> None:
    doc = [dict(POD_ENI_DOC[0]), {"eniId": "garbage"}]
    del doc[0]["vlanId"]
    doc[0]["vlanID"] = 7
    assert parse_pod_eni(json.dumps(doc)).vlan == 7


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"vlanId": 0}, "outside 1..4094"),
        ({"vlanId": 4095}, "outside 1..4094"),
        ({"vlanId": "3"}, "must be an integer"),
        ({"vlanId": True}, "must be an integer"),
        ({"vlanId": None}, "must be an integer"),
        ({"ifAddress": ""}, "no ifAddress"),
        ({"ifAddress": "0a:1b"}, "not a MAC"),
        ({"privateIp": "0.0.0.0"}, "0.0.0.0"),
        ({"privateIp": "10.1.0.7"}, "not in subnetCidr"),
        ({"privateIp": "fe80::1"}, "privateIp"),
        ({"eniId": "sg-01234567"}, "not an ENI id"),
        ({"subnetCidr": "10.0.0.0/40"}, "subnetCidr"),
        ({"associationID": 5}, "associationID"),
    ],
)
def test_bad_eks_annotation_is_refused_with_its_reason(
    change: dict[str, object], reason: str
) -> None:
    doc = [{**POD_ENI_DOC[0], **change}]
    with pytest.raises(AnnotationError, match=reason) as e:
        decide(
            PodIdentity(namespace=NS, annotations={"vpc.amazonaws.com/pod-eni": json.dumps(doc)})
        )
    assert e.value.annotation == "vpc.amazonaws.com/pod-eni"


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "not JSON"), ("[]", "non-empty"), ("{}", "non-empty"), ("[5]", "not an object")],
)
def test_eks_annotation_that_is_not_a_branch_list(text: str, reason: str) -> None:
    with pytest.raises(AnnotationError, match=reason):
        parse_pod_eni(text)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("sg-0123abcd", ("sg-0123abcd",)),
        (" sg-0123abcd , sg-0123456789abcdef0,", ("sg-0123abcd", "sg-0123456789abcdef0")),
        ("sg-0123abcd,sg-0123abcd", ("sg-0123abcd",)),
        (",".join(f"sg-0000000{i}" for i in range(5)), tuple(f"sg-0000000{i}" for i in range(5))),
    ],
)
def test_group_ids(text: str, want: tuple[str, ...]) -> None:
    assert parse_group_ids(text) == want


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no security group ids"),
        (" , ", "no security group ids"),
        ("default", "not a security group id"),
        ("sg-XYZ12345", "not a security group id"),
        (",".join(f"sg-0000000{i}" for i in range(6)), "6 security groups; at most 5"),
    ],
)
def test_bad_group_ids(text: str, reason: str) -> None:
    with pytest.raises(AnnotationError, match=reason):
        decide(PodIdentity(namespace=NS, annotations={"podwire.io/security-groups": text}))
