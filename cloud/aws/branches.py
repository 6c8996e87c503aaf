"""Branch ENIs on EC2 (``cloud.trunk.BranchCloud``): CreateNetworkInterface with the pod's
groups and our tags, then AssociateTrunkInterface; DisassociateTrunkInterface and
DeleteNetworkInterface afterwards (already gone counts as done).

On AWS the trunk-association calls are reserved for EKS's own control plane (its resource
controller calls them with the EKS service's credentials); an agent's calls succeed in the
emulator and in accounts allowlisted for them. Tags: ``node.k8s.amazonaws.com/instance_id``,
``podwire.io/vlan-id``, ``podwire.io/trunk-eni-id``, the cluster tag, ``createdAt``, and the
pod (``podwire.io/pod``). Ours, not the resource controller's ``vpcresources.k8s.aws/*``: its
restart cleanup deletes every branch carrying those that no pod annotation names.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from ipaddress import IPv4Network

from cloud.aws.ec2 import Ec2, Eni
from cloud.aws.provider import (
    TAG_BRANCH_TRUNK,
    TAG_BRANCH_VLAN,
    TAG_CLUSTER,
    TAG_CREATED_AT,
    TAG_INSTANCE,
    parse_rfc3339,
    rfc3339,
)
from cloud.errors import NotFound
from cloud.trunk import BranchAssociation, BranchEni

TAG_POD = "podwire.io/pod"
BRANCH_DESCRIPTION_PREFIX = "podwire-branch-"


class AwsBranches:
    """``BranchCloud`` for one instance's trunk."""

    def __init__(
        self,
        ec2: Ec2,
        *,
        instance_id: str,
        trunk_id: str,
        subnet_id: str,
        subnet_cidr: IPv4Network,
        cluster_name: str | None = None,
        extra_tags: Mapping[str, str] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.ec2 = ec2
        self.instance_id = instance_id
        self._trunk_id = trunk_id
        self.subnet_id = subnet_id
        self.subnet_cidr = subnet_cidr
        self.cluster_name = cluster_name
        self.extra_tags = dict(extra_tags or {})
        self._wall = wall_clock

    def __repr__(self) -> str:
        return f"<AwsBranches {self.instance_id} trunk={self._trunk_id}>"

    @property
    def trunk_id(self) -> str:
        return self._trunk_id

    def _tags(self, vlan: int, pod: str) -> dict[str, str]:
        tags = dict(self.extra_tags)
        tags[TAG_INSTANCE] = self.instance_id
        tags[TAG_BRANCH_VLAN] = str(vlan)
        tags[TAG_BRANCH_TRUNK] = self._trunk_id
        tags[TAG_CREATED_AT] = rfc3339(self._wall())
        if self.cluster_name:
            tags[TAG_CLUSTER] = self.cluster_name
        if pod:
            tags[TAG_POD] = pod[:255]
        return tags

    def _branch(self, eni: Eni) -> BranchEni:
        try:
            vlan = int(eni.tags.get(TAG_BRANCH_VLAN, "0"))
        except ValueError:
            vlan = 0
        return BranchEni(
            eni_id=eni.eni_id,
            mac=eni.mac,
            ip=eni.primary_ip,
            subnet_cidr=self.subnet_cidr,
            groups=eni.security_groups,
            vlan=vlan,
            status=eni.status,
            created_at=parse_rfc3339(eni.tags.get(TAG_CREATED_AT, "")),
            pod=eni.tags.get(TAG_POD, ""),
        )

    async def create_branch(
        self, *, vlan: int, groups: Sequence[str], pod: str, client_token: str
    ) -> BranchEni:
        eni = await self.ec2.create_network_interface(
            subnet_id=self.subnet_id,
            security_groups=groups,
            description=f"{BRANCH_DESCRIPTION_PREFIX}{self.instance_id}",
            tags=self._tags(vlan, pod),
            client_token=client_token,
        )
        return self._branch(eni)

    async def associate(self, *, branch_id: str, vlan: int, client_token: str) -> str:
        assoc = await self.ec2.associate_trunk_interface(
            branch_id=branch_id, trunk_id=self._trunk_id, vlan=vlan, client_token=client_token
        )
        return assoc.association_id

    async def disassociate(self, association_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.ec2.disassociate_trunk_interface(
                association_id, client_token=f"dis-{association_id}"[:64]
            )

    async def delete_branch(self, eni_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.ec2.delete_network_interface(eni_id)

    async def set_groups(self, eni_id: str, groups: Sequence[str]) -> None:
        await self.ec2.set_security_groups(eni_id, groups)

    async def branches(self) -> Sequence[BranchEni]:
        found = await self.ec2.describe_network_interfaces(
            filters={
                f"tag:{TAG_INSTANCE}": [self.instance_id],
                f"tag:{TAG_BRANCH_TRUNK}": [self._trunk_id],
            }
        )
        return [self._branch(e) for e in found]

    async def associations(self) -> Sequence[BranchAssociation]:
        found = await self.ec2.describe_trunk_interface_associations(self._trunk_id)
        return [
            BranchAssociation(association_id=a.association_id, branch_id=a.branch_id, vlan=a.vlan)
            for a in found
        ]
