"""What the agent needs from a cloud to give pods their own branch ENIs on the node's trunk.

A branch is created with the pod's security groups and tags, then associated with the trunk on
one VLAN id; it is disassociated and deleted when its pod is gone (after a cooldown). The
implementation for EC2 is ``cloud.aws.branches``; tests use an in-memory fake. Every method
raises the ``cloud`` errors (Throttled, NotFound, LimitExceeded, CloudRequestFailed, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

import attrs


@attrs.frozen(kw_only=True)
class BranchEni:
    """A branch ENI as the cloud shows it. ``vlan`` is the VLAN id its tag records (0: none);
    ``status`` is EC2's (``available`` before association, ``associated`` after)."""

    eni_id: str
    mac: str
    ip: IPv4Address
    subnet_cidr: IPv4Network
    groups: tuple[str, ...] = ()
    vlan: int = 0
    status: str = "available"
    created_at: float | None = None  # wall clock, from the createdAt tag
    pod: str = ""  # the pod it was made for (tag), for operators

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet_cidr.network_address + 1


@attrs.frozen(kw_only=True)
class BranchAssociation:
    """One branch tied to a VLAN of the trunk."""

    association_id: str
    branch_id: str
    vlan: int


class BranchCloud(Protocol):
    """The node's trunk as the branch workflows use it."""

    @property
    def trunk_id(self) -> str: ...

    async def create_branch(
        self, *, vlan: int, groups: Sequence[str], pod: str, client_token: str
    ) -> BranchEni:
        """Create a branch ENI in the trunk's subnet with ``groups`` and our tags."""
        ...

    async def associate(self, *, branch_id: str, vlan: int, client_token: str) -> str:
        """Associate the branch with the trunk on ``vlan``; return the association id."""
        ...

    async def disassociate(self, association_id: str) -> None:
        """Untie the branch; an association already gone is fine."""
        ...

    async def delete_branch(self, eni_id: str) -> None:
        """Delete the branch ENI; one already gone is fine."""
        ...

    async def set_groups(self, eni_id: str, groups: Sequence[str]) -> None:
        """Replace the branch's security groups (the whole set, 1-5): a running pod's groups
        change in place (ModifyNetworkInterfaceAttribute)."""
        ...

    async def branches(self) -> Sequence[BranchEni]:
        """Every branch ENI this node's agent made (by tag), associated or not."""
        ...

    async def associations(self) -> Sequence[BranchAssociation]:
        """Every association of the trunk, whoever made it."""
        ...
