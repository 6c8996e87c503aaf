"""Which instance types take a trunk ENI, and how many branch ENIs it carries.

EC2 has no API for this: Amazon's VPC resource controller ships a generated table
(``pkg/aws/vpc/limits.go``, "not publicly available", SG-FOR-PODS.md §1.4), and the limit does
not follow from the ENI limit (a1.medium: 2 ENIs, 10 branches; m5.large: 3 ENIs, 9 branches).
These rows are taken from that table. A type that is not listed is treated as not trunking
compatible unless ``[security_groups] max_branches`` gives its limit.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

BRANCH_INTERFACES: Final[MappingProxyType[str, int]] = MappingProxyType(
    {
        # general purpose
        "m5.large": 9,
        "m5.xlarge": 18,
        "m5.2xlarge": 38,
        "m5.4xlarge": 54,
        "m5.8xlarge": 54,
        "m5.12xlarge": 54,
        "m5.16xlarge": 107,
        "m5.24xlarge": 107,
        "m5.metal": 120,
        "m6i.large": 9,
        "m7i.large": 9,
        "m8g.large": 9,
        "m6g.medium": 4,
        "m7g.medium": 4,
        "a1.medium": 10,
        "a1.large": 9,
        "a1.xlarge": 18,
        "a1.2xlarge": 38,
        "a1.4xlarge": 54,
        "a1.metal": 54,
        # compute optimised
        "c5.large": 9,
        "c5.xlarge": 18,
        "c5.2xlarge": 38,
        "c5.4xlarge": 54,
        "c5.9xlarge": 54,
        "c5.12xlarge": 54,
        "c5.18xlarge": 107,
        "c5.24xlarge": 107,
        "c5.metal": 107,
        "c5a.large": 9,
        "c5a.xlarge": 18,
        "c5a.2xlarge": 38,
        "c5a.4xlarge": 54,
        "c5a.8xlarge": 54,
        "c5a.12xlarge": 54,
        "c5a.16xlarge": 107,
        "c5a.24xlarge": 107,
        "c5ad.large": 9,
        "c5ad.xlarge": 18,
        "c5ad.2xlarge": 38,
        "c5ad.4xlarge": 54,
        "c5ad.8xlarge": 54,
        "c5ad.12xlarge": 54,
        "c5ad.16xlarge": 107,
        "c5ad.24xlarge": 107,
        "c6g.medium": 4,
        "c7g.large": 9,
        # memory, accelerated, storage
        "r6g.medium": 4,
        "g4dn.xlarge": 39,
        "p5.48xlarge": 120,
        "i4i.xlarge": 6,
        "i4i.large": 0,
    }
)

# Families with no trunking at all: burstable types and Xen-based ones.
UNSUPPORTED_FAMILIES: Final = frozenset({"t2", "t3", "t3a", "t4g", "m4", "c4", "c3", "c1", "m3"})


def branch_limit(instance_type: str) -> int | None:
    """Branch ENIs one trunk carries on ``instance_type``: 0 when the type cannot take a trunk,
    None when the table does not know the type."""
    if instance_type.partition(".")[0] in UNSUPPORTED_FAMILIES:
        return 0
    return BRANCH_INTERFACES.get(instance_type)
