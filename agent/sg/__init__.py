"""Security groups for pods: which groups a pod gets, and the branch ENIs that carry them.

``policy`` and ``annotations`` are pure (the decision); ``branches`` is the branch ENI state
machine and its workflows on the trunk; ``service`` is what the CNI service calls for a pod
that has groups. See DESIGN.md "Security groups for pods".
"""

from agent.sg.annotations import POD_ENI, SECURITY_GROUPS, AnnotationError, PodEni
from agent.sg.policy import (
    Decision,
    LabelSelector,
    PodIdentity,
    Requirement,
    SecurityGroupPolicy,
    Source,
    decide,
)

__all__ = [
    "POD_ENI",
    "SECURITY_GROUPS",
    "AnnotationError",
    "Decision",
    "LabelSelector",
    "PodEni",
    "PodIdentity",
    "Requirement",
    "SecurityGroupPolicy",
    "Source",
    "decide",
]
