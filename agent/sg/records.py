"""What the checkpoint keeps of a pod with security groups (part of its Allocation): its branch
ENI (branch mode), or the set of groups whose shared ENI holds its address (eni mode)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Final, Literal

import attrs

from cloud.provider import group_key

Mode = Literal["strict", "standard"]
SOURCES: Final = ("eks", "annotation", "policy")


@attrs.frozen(kw_only=True)
class SgAttachment:
    """A pod's branch ENI and how it is wired: where its groups came from (``source``: eks,
    annotation, policy), the branch (ENI id, VLAN, MAC, subnet) and the enforcing mode it was
    wired in (a mode change affects new pods only)."""

    source: str
    branch: str  # the branch ENI id
    vlan: int
    mac: str
    subnet_cidr: IPv4Network
    mode: Mode = "strict"
    groups: tuple[str, ...] = ()  # () for source eks: EKS's controller chose them
    policies: tuple[str, ...] = ()  # the SecurityGroupPolicy objects that matched
    association: str = ""

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet_cidr.network_address + 1

    @property
    def strict(self) -> bool:
        return self.mode == "strict"

    @property
    def agent_made(self) -> bool:
        """Whether the agent made (and so deletes) the branch; EKS's controller otherwise."""
        return self.source != "eks"


@attrs.frozen(kw_only=True)
class SetMembership:
    """A pod of eni mode: its address is a secondary IP of an ENI made with exactly ``groups``
    (shared with the other pods asking for that set), wired like any pod of a secondary ENI.
    ``source``: annotation or policy; ``policies``: the SecurityGroupPolicy objects that
    matched."""

    source: str
    groups: tuple[str, ...]
    policies: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The set's key: its pool group, and the tag value of its ENIs."""
        return group_key(self.groups)
