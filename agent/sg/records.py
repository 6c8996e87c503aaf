"""What the checkpoint keeps of a pod with security groups (part of its Allocation)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Final, Literal

import attrs

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
