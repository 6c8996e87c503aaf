"""Which instance types support ENI trunking, and how many branch ENIs each takes.

EC2 publishes no API for this: Amazon's VPC resource controller ships a generated table
(pkg/aws/vpc/limits.go, "not publicly available") and refuses nodes whose type is not in it as
trunking compatible. The emulator ships the rows podwire's tests and demo use, taken from that
table (see ../shared/SG-FOR-PODS.md §1.4); the limit is not derivable from the ENI limit, so a
type that is not listed is treated as not supporting trunking.
"""

from __future__ import annotations

from types import MappingProxyType

# Branch ENIs per trunk, by instance type (0: trunking not supported).
BRANCH_INTERFACES: MappingProxyType[str, int] = MappingProxyType(
    {
        "m5.large": 9,
        "m5.xlarge": 18,
        "m5.2xlarge": 38,
        "m5.4xlarge": 54,
        "m5.8xlarge": 54,
        "m5.12xlarge": 54,
        "m5.16xlarge": 107,
        "m5.24xlarge": 107,
        "m5.metal": 120,
        "c5.large": 9,
        "c5.2xlarge": 38,
        "c5.4xlarge": 54,
        "c5.9xlarge": 54,
        "c5.18xlarge": 107,
        "m6i.large": 9,
        "m7i.large": 9,
        "c7g.large": 9,
        "m8g.large": 9,
        "m6g.medium": 4,
        "c6g.medium": 4,
        "r6g.medium": 4,
        "m7g.medium": 4,
        "a1.medium": 10,
        "g4dn.xlarge": 39,
        "i4i.xlarge": 6,
        "i4i.large": 0,
        "p5.48xlarge": 120,
    }
)

# Whole families that are not trunking compatible (burstable types and Xen-based ones).
UNSUPPORTED_FAMILIES = frozenset({"t2", "t3", "t3a", "t4g", "m4", "c4"})


def branch_interfaces(instance_type: str) -> int:
    """Return how many branch ENIs one trunk on ``instance_type`` can carry; 0 when the type
    does not support trunking (or is not in the table)."""
    if instance_type.partition(".")[0] in UNSUPPORTED_FAMILIES:
        return 0
    return BRANCH_INTERFACES.get(instance_type, 0)


def supports_trunking(instance_type: str) -> bool:
    """Whether a trunk ENI attached to an instance of this type can take branches."""
    return branch_interfaces(instance_type) > 0
