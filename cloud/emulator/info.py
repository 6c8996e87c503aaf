"""What the emulator reports about itself and accepts over its control endpoint (JSON)."""

from __future__ import annotations

from typing import Literal

import attrs
from cattrs.preconf.orjson import make_converter

converter = make_converter(forbid_extra_keys=True)


@attrs.frozen(kw_only=True)
class SubnetInfo:
    id: str
    cidr: str
    az: str
    gateway: str


@attrs.frozen(kw_only=True)
class NodeInfo:
    instance_id: str
    instance_type: str
    subnet_id: str
    primary_ip: str
    mac: str
    pod_cidr: str | None
    netns: str | None
    netns_path: str | None
    # Seen from inside the node's namespace (what an agent there uses).
    ec2_url: str | None
    imds_url: str | None
    # Seen from the machine's loopback.
    imds_local_url: str


@attrs.frozen(kw_only=True)
class InstanceInfo:
    """A plain instance (``Vpc.add_instance``): one ENI, its own namespace."""

    instance_id: str
    instance_type: str
    subnet_id: str
    eni_id: str
    primary_ip: str
    mac: str
    security_groups: list[str]
    netns: str | None
    netns_path: str | None


@attrs.frozen(kw_only=True)
class VpcInfo:
    vpc_id: str
    cidr: str
    region: str
    ec2_url: str
    control_url: str
    router_netns: str | None
    internet_netns: str | None
    internet_ip: str | None
    subnets: list[SubnetInfo]
    nodes: list[NodeInfo]
    instances: list[InstanceInfo] = attrs.field(factory=list)


@attrs.frozen(kw_only=True)
class AddSubnet:
    cidr: str
    az: str | None = None


@attrs.frozen(kw_only=True)
class AddNode:
    instance_type: str = "m5.large"
    subnet_id: str | None = None
    pod_cidr: str | None = None
    security_groups: list[str] = attrs.field(factory=list)


@attrs.frozen(kw_only=True)
class AddInstance:
    instance_type: str = "t3.micro"
    subnet_id: str | None = None
    security_groups: list[str] = attrs.field(factory=list)


@attrs.frozen(kw_only=True)
class Serve:
    """Start an echo service in an instance's namespace."""

    port: int
    protocol: Literal["tcp", "udp"] = "tcp"


@attrs.frozen(kw_only=True)
class SetAliasRanges:
    """Replace a node's GCE alias IP ranges."""

    cidrs: list[str]


@attrs.frozen(kw_only=True)
class AliasRanges:
    instance_id: str
    alias_ranges: list[str]


@attrs.frozen(kw_only=True)
class GceMetadataFault:
    """While down, every GCE metadata request answers 503."""

    down: bool = True


@attrs.frozen(kw_only=True)
class Drops:
    """Packets the VPC dropped for one ENI: denied by its inbound or outbound rules, and frames
    refused on its cable (a trunk's: unassociated VLAN id or a MAC that does not match)."""

    inbound: int = 0
    outbound: int = 0
    frames: int = 0

    @property
    def total(self) -> int:
        return self.inbound + self.outbound + self.frames


@attrs.frozen(kw_only=True)
class Throttle:
    action: str
    count: int


@attrs.frozen(kw_only=True)
class ServerError:
    action: str
    count: int
    status: int = 500


@attrs.frozen(kw_only=True)
class Latency:
    action: str
    seconds: float


@attrs.frozen(kw_only=True)
class AttachDelay:
    seconds: float
