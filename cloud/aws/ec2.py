"""EC2 for the agent: one client, our own retry policy, a rate limit, errors mapped once.

Theory of operation. Every call goes through ``Ec2._call``: take a token from the bucket (a
steady request rate with a burst, as EC2's own token-bucket throttling expects), run the
request under a per-attempt timeout, and classify the outcome with one table
(``ERROR_KINDS``). Throttling and server/connection failures are retried with exponential
backoff and full jitter (sleep uniform in [0, min(cap, base * 2**n)]) until ``max_attempts`` or
the call's overall deadline; everything else is raised at once as a ``cloud`` exception. botocore's
own retries are off (``total_max_attempts=1``) so exactly one policy governs. ``on_call`` sees
every attempt: (action, outcome, seconds), outcome ``ok`` or the error code.

The class only needs an object with aiobotocore's method names (``describe_network_interfaces``
...) that returns the parsed dicts and raises botocore's ``ClientError``; it uses anyio only, so
its retry and rate-limit behaviour is tested on trio's virtual clock with a fake client. Opening
the real aiobotocore client (``open_ec2``) is asyncio-only.
"""

from __future__ import annotations

import contextlib
import enum
import random
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import anyio
import attrs
from botocore.exceptions import BotoCoreError, ClientError

from cloud.errors import (
    CloudError,
    CloudRequestFailed,
    CloudUnavailable,
    LimitExceeded,
    NotFound,
    SubnetExhausted,
    Throttled,
)

OnCall = Callable[[str, str, float], None]
"""Metrics hook: (EC2 action, outcome ``ok`` or error code, seconds the attempt took)."""


# --- errors: one table -----------------------------------------------------------------------


class ErrorKind(enum.Enum):
    THROTTLED = "throttled"
    UNAVAILABLE = "unavailable"
    NOT_FOUND = "not-found"
    LIMIT = "limit"
    SUBNET = "subnet"
    FAILED = "failed"

    @property
    def retryable(self) -> bool:
        return self in (ErrorKind.THROTTLED, ErrorKind.UNAVAILABLE)


ERROR_KINDS: Mapping[str, ErrorKind] = {
    "RequestLimitExceeded": ErrorKind.THROTTLED,
    "Throttling": ErrorKind.THROTTLED,
    "ThrottlingException": ErrorKind.THROTTLED,
    "RequestThrottled": ErrorKind.THROTTLED,
    "EC2ThrottledException": ErrorKind.THROTTLED,
    "InternalError": ErrorKind.UNAVAILABLE,
    "InternalFailure": ErrorKind.UNAVAILABLE,
    "ServiceUnavailable": ErrorKind.UNAVAILABLE,
    "Unavailable": ErrorKind.UNAVAILABLE,
    "InvalidNetworkInterfaceID.NotFound": ErrorKind.NOT_FOUND,
    "InvalidAttachmentID.NotFound": ErrorKind.NOT_FOUND,
    "InvalidInstanceID.NotFound": ErrorKind.NOT_FOUND,
    "InvalidSubnetID.NotFound": ErrorKind.NOT_FOUND,
    "PrivateIpAddressLimitExceeded": ErrorKind.LIMIT,
    "AttachmentLimitExceeded": ErrorKind.LIMIT,
    "NetworkInterfaceLimitExceeded": ErrorKind.LIMIT,
    "SecurityGroupsPerInterfaceLimitExceeded": ErrorKind.LIMIT,
    "InsufficientFreeAddressesInSubnet": ErrorKind.SUBNET,
    "InsufficientCidrBlocks": ErrorKind.SUBNET,
}


def error_kind(code: str, status: int | None) -> ErrorKind:
    """Classify an EC2 error code (and HTTP status): the table, then ``*.NotFound``, then 5xx."""
    kind = ERROR_KINDS.get(code)
    if kind is not None:
        return kind
    if code.endswith(".NotFound"):
        return ErrorKind.NOT_FOUND
    if status is not None and status >= 500:
        return ErrorKind.UNAVAILABLE
    return ErrorKind.FAILED


def to_cloud_error(
    kind: ErrorKind, action: str, code: str, message: str, attempts: int
) -> CloudError:
    """Build the ``cloud`` exception for one classified failure."""
    if kind is ErrorKind.THROTTLED:
        return Throttled(action, attempts)
    if kind is ErrorKind.UNAVAILABLE:
        return CloudUnavailable(action, f"{code}: {message}" if message else code)
    if kind is ErrorKind.NOT_FOUND:
        return NotFound(action, code, message)
    if kind is ErrorKind.LIMIT:
        return LimitExceeded(code, action, message)
    if kind is ErrorKind.SUBNET:
        return SubnetExhausted(code, action)
    return CloudRequestFailed(action, code, message)


# botocore's transport failures (aiobotocore wraps aiohttp's into these).
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, OSError)


# --- policy ----------------------------------------------------------------------------------


def full_jitter(ceiling: float) -> float:
    """A sleep drawn uniformly from [0, ceiling] (AWS's "full jitter")."""
    return random.uniform(0.0, ceiling)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n (1-based) failing sleeps
    ``jitter(min(cap, base * 2**(n-1)))``; at most ``max_attempts`` attempts, each bounded by
    ``attempt_timeout``, all bounded by ``deadline`` seconds."""

    base: float = 0.1
    cap: float = 5.0
    max_attempts: int = 6
    attempt_timeout: float = 10.0
    deadline: float = 60.0
    jitter: Callable[[float], float] = full_jitter

    def __attrs_post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt ``attempt`` (1-based)."""
        return self.jitter(min(self.cap, self.base * 2 ** (attempt - 1)))


class TokenBucket:
    """``rate`` requests per second on average, bursts of up to ``burst``; waiters queue in
    order. Time comes from anyio, so a virtual clock drives it in tests."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<TokenBucket rate={self.rate}/s burst={self.burst} tokens={self._tokens:.2f}>"

    def _refill(self) -> float:
        now = anyio.current_time()
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return now

    async def take(self) -> None:
        """Wait until a token is available and take it."""
        async with self._lock:
            self._refill()
            if self._tokens < 1:
                await anyio.sleep((1 - self._tokens) / self.rate)
                self._refill()
            self._tokens -= 1


# --- data ------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class InstanceTypeInfo:
    instance_type: str
    max_enis: int
    ipv4_per_eni: int
    vcpus: int


@attrs.frozen(kw_only=True)
class Attachment:
    attachment_id: str
    instance_id: str
    device_index: int
    status: str
    delete_on_termination: bool


@attrs.frozen(kw_only=True)
class Eni:
    """One network interface as DescribeNetworkInterfaces shows it."""

    eni_id: str
    mac: str
    subnet_id: str
    vpc_id: str
    status: str
    primary_ip: IPv4Address
    secondary_ips: tuple[IPv4Address, ...] = ()
    prefixes: tuple[IPv4Network, ...] = ()
    security_groups: tuple[str, ...] = ()
    description: str = ""
    tags: Mapping[str, str] = attrs.field(factory=dict)
    attachment: Attachment | None = None
    interface_type: str = "interface"  # "trunk", "branch", ...


@attrs.frozen(kw_only=True)
class TrunkAssociation:
    """One branch ENI tied to a VLAN of a trunk (DescribeTrunkInterfaceAssociations)."""

    association_id: str
    branch_id: str
    trunk_id: str
    vlan: int


@attrs.frozen(kw_only=True)
class Subnet:
    subnet_id: str
    cidr: IPv4Network
    availability_zone: str
    available_ips: int

    @property
    def gateway(self) -> IPv4Address:
        """The VPC router in this subnet: base + 1."""
        return self.cidr.network_address + 1


def eni_from_wire(d: Mapping[str, Any]) -> Eni:
    """Parse one ``NetworkInterface`` dict of the EC2 API."""
    primary = IPv4Address(d["PrivateIpAddress"])
    secondary = tuple(
        IPv4Address(a["PrivateIpAddress"])
        for a in d.get("PrivateIpAddresses", ())
        if not a.get("Primary") and a["PrivateIpAddress"] != str(primary)
    )
    att = d.get("Attachment")
    attachment = None
    if att and att.get("InstanceId"):
        attachment = Attachment(
            attachment_id=att["AttachmentId"],
            instance_id=att["InstanceId"],
            device_index=int(att.get("DeviceIndex", 0)),
            status=att.get("Status", ""),
            delete_on_termination=bool(att.get("DeleteOnTermination", False)),
        )
    return Eni(
        eni_id=d["NetworkInterfaceId"],
        mac=d.get("MacAddress", "").lower(),
        subnet_id=d.get("SubnetId", ""),
        vpc_id=d.get("VpcId", ""),
        status=d.get("Status", ""),
        primary_ip=primary,
        secondary_ips=secondary,
        prefixes=tuple(IPv4Network(p["Ipv4Prefix"]) for p in d.get("Ipv4Prefixes", ())),
        security_groups=tuple(g["GroupId"] for g in d.get("Groups", ())),
        description=d.get("Description", "") or "",
        tags={t["Key"]: t.get("Value", "") for t in d.get("TagSet", ())},
        attachment=attachment,
        interface_type=d.get("InterfaceType") or "interface",
    )


def association_from_wire(d: Mapping[str, Any]) -> TrunkAssociation:
    """Parse one ``InterfaceAssociation`` dict of the EC2 API."""
    return TrunkAssociation(
        association_id=d["AssociationId"],
        branch_id=d["BranchInterfaceId"],
        trunk_id=d["TrunkInterfaceId"],
        vlan=int(d.get("VlanId", 0)),
    )


def _tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _filter_list(filters: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    return [{"Name": k, "Values": list(v)} for k, v in filters.items()]


_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def method_name(action: str) -> str:
    """The aiobotocore method of an EC2 action: ``DescribeSubnets`` -> ``describe_subnets``."""
    return _CAMEL.sub("_", action).lower()


# --- the client ------------------------------------------------------------------------------


class Ec2:
    """The EC2 calls the agent makes, with retries, a rate limit and mapped errors.

    ``client`` is an aiobotocore EC2 client (or a fake with the same methods). Every method
    raises the ``cloud`` exceptions: Throttled, CloudUnavailable, NotFound, LimitExceeded,
    SubnetExhausted, CloudRequestFailed.
    """

    def __init__(
        self,
        client: Any,
        *,
        policy: RetryPolicy | None = None,
        bucket: TokenBucket | None = None,
        on_call: OnCall | None = None,
    ) -> None:
        self._client = client
        self.policy = policy or RetryPolicy()
        self.bucket = bucket or TokenBucket(rate=10.0, burst=20)
        self.on_call = on_call
        self._types: dict[str, InstanceTypeInfo] = {}

    def __repr__(self) -> str:
        return f"<Ec2 {self.policy} {self.bucket!r}>"

    async def call(self, action: str, **params: Any) -> dict[str, Any]:
        """Run one EC2 action under the policy and return its reply dict."""
        method = getattr(self._client, method_name(action))
        policy = self.policy
        attempt = 0
        last: CloudError | None = None
        try:
            with anyio.fail_after(policy.deadline):
                while True:
                    attempt += 1
                    await self.bucket.take()
                    started = anyio.current_time()
                    kind, code, message = ErrorKind.FAILED, "", ""
                    try:
                        with anyio.fail_after(policy.attempt_timeout):
                            reply: dict[str, Any] = await method(**params)
                    except ClientError as e:
                        error = e.response.get("Error", {})
                        code = str(error.get("Code", "Unknown"))
                        message = str(error.get("Message", ""))
                        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                        kind = error_kind(code, status)
                    except TimeoutError:
                        kind, code, message = ErrorKind.UNAVAILABLE, "Timeout", "attempt timed out"
                    except _TRANSPORT_ERRORS as e:
                        kind, code, message = ErrorKind.UNAVAILABLE, "Connection", str(e)
                    else:
                        self._report(action, "ok", started)
                        return reply
                    self._report(action, code, started)
                    last = to_cloud_error(kind, action, code, message, attempt)
                    if not kind.retryable or attempt >= policy.max_attempts:
                        raise last
                    await anyio.sleep(policy.backoff(attempt))
        except TimeoutError:
            if isinstance(last, Throttled):
                raise Throttled(action, attempt) from None
            raise CloudUnavailable(action, f"no answer within {policy.deadline:g}s") from last

    def _report(self, action: str, outcome: str, started: float) -> None:
        if self.on_call is not None:
            self.on_call(action, outcome, anyio.current_time() - started)

    # -- reads --------------------------------------------------------------------------------

    async def describe_instance_type(self, instance_type: str) -> InstanceTypeInfo:
        """Return the type's ENI/IP limits (cached per type); raises NotFound if unknown."""
        found = self._types.get(instance_type)
        if found is not None:
            return found
        reply = await self.call("DescribeInstanceTypes", InstanceTypes=[instance_type])
        items = reply.get("InstanceTypes", [])
        if not items:
            raise NotFound("DescribeInstanceTypes", "InvalidInstanceType", instance_type)
        item = items[0]
        net = item["NetworkInfo"]
        info = InstanceTypeInfo(
            instance_type=instance_type,
            max_enis=int(net["MaximumNetworkInterfaces"]),
            ipv4_per_eni=int(net["Ipv4AddressesPerInterface"]),
            vcpus=int(item.get("VCpuInfo", {}).get("DefaultVCpus", 0)),
        )
        self._types[instance_type] = info
        return info

    async def describe_network_interfaces(
        self,
        *,
        eni_ids: Sequence[str] = (),
        filters: Mapping[str, Sequence[str]] | None = None,
    ) -> list[Eni]:
        """Return the ENIs matching ``eni_ids`` and ``filters``, following NextToken pages.

        Raises NotFound when an id in ``eni_ids`` does not exist.
        """
        params: dict[str, Any] = {}
        if eni_ids:
            params["NetworkInterfaceIds"] = list(eni_ids)
        if filters:
            params["Filters"] = _filter_list(filters)
        out: list[Eni] = []
        while True:
            reply = await self.call("DescribeNetworkInterfaces", **params)
            out += [eni_from_wire(d) for d in reply.get("NetworkInterfaces", [])]
            token = reply.get("NextToken")
            if not token:
                return out
            params["NextToken"] = token

    async def describe_network_interface(self, eni_id: str) -> Eni:
        """Return one ENI; raises NotFound when it does not exist."""
        found = await self.describe_network_interfaces(eni_ids=[eni_id])
        if not found:
            code = "InvalidNetworkInterfaceID.NotFound"
            raise NotFound("DescribeNetworkInterfaces", code, eni_id)
        return found[0]

    async def describe_subnet(self, subnet_id: str) -> Subnet:
        """Return one subnet; raises NotFound when it does not exist."""
        reply = await self.call("DescribeSubnets", SubnetIds=[subnet_id])
        items = reply.get("Subnets", [])
        if not items:
            raise NotFound("DescribeSubnets", "InvalidSubnetID.NotFound", subnet_id)
        s = items[0]
        return Subnet(
            subnet_id=s["SubnetId"],
            cidr=IPv4Network(s["CidrBlock"]),
            availability_zone=s.get("AvailabilityZone", ""),
            available_ips=int(s.get("AvailableIpAddressCount", 0)),
        )

    # -- ENIs ---------------------------------------------------------------------------------

    async def create_network_interface(
        self,
        *,
        subnet_id: str,
        security_groups: Sequence[str],
        description: str,
        tags: Mapping[str, str],
        ip_count: int = 0,
        prefix_count: int = 0,
        interface_type: str | None = None,
        client_token: str | None = None,
    ) -> Eni:
        """Create an ENI carrying ``ip_count`` secondary IPs or ``prefix_count`` /28s (in the
        same call) and ``tags``; return it. ``interface_type`` ``trunk`` makes a trunk ENI;
        ``client_token`` makes a retried call return the ENI the first one made."""
        if ip_count and prefix_count:
            raise ValueError("an ENI is created with secondary IPs or prefixes, not both")
        params: dict[str, Any] = {
            "SubnetId": subnet_id,
            "Description": description,
            "TagSpecifications": [{"ResourceType": "network-interface", "Tags": _tag_list(tags)}],
        }
        if security_groups:
            params["Groups"] = list(security_groups)
        if ip_count:
            params["SecondaryPrivateIpAddressCount"] = ip_count
        if prefix_count:
            params["Ipv4PrefixCount"] = prefix_count
        if interface_type:
            params["InterfaceType"] = interface_type
        if client_token:
            params["ClientToken"] = client_token
        reply = await self.call("CreateNetworkInterface", **params)
        return eni_from_wire(reply["NetworkInterface"])

    async def attach_network_interface(
        self, *, eni_id: str, instance_id: str, device_index: int
    ) -> str:
        """Attach and return the attachment id."""
        reply = await self.call(
            "AttachNetworkInterface",
            NetworkInterfaceId=eni_id,
            InstanceId=instance_id,
            DeviceIndex=device_index,
        )
        return str(reply["AttachmentId"])

    async def detach_network_interface(self, attachment_id: str, *, force: bool = False) -> None:
        await self.call("DetachNetworkInterface", AttachmentId=attachment_id, Force=force)

    async def delete_network_interface(self, eni_id: str) -> None:
        await self.call("DeleteNetworkInterface", NetworkInterfaceId=eni_id)

    async def set_delete_on_termination(self, eni_id: str, attachment_id: str) -> None:
        """Make EC2 delete the ENI when the instance terminates."""
        await self.call(
            "ModifyNetworkInterfaceAttribute",
            NetworkInterfaceId=eni_id,
            Attachment={"AttachmentId": attachment_id, "DeleteOnTermination": True},
        )

    async def set_security_groups(self, eni_id: str, groups: Sequence[str]) -> None:
        """Replace the ENI's security groups (the whole set; EC2 needs at least one)."""
        await self.call(
            "ModifyNetworkInterfaceAttribute", NetworkInterfaceId=eni_id, Groups=list(groups)
        )

    async def assign_private_ips(self, eni_id: str, count: int) -> tuple[IPv4Address, ...]:
        """Add ``count`` secondary IPs to the ENI in one call; return the new addresses."""
        reply = await self.call(
            "AssignPrivateIpAddresses",
            NetworkInterfaceId=eni_id,
            SecondaryPrivateIpAddressCount=count,
        )
        return tuple(
            IPv4Address(a["PrivateIpAddress"]) for a in reply.get("AssignedPrivateIpAddresses", [])
        )

    async def assign_prefixes(self, eni_id: str, count: int) -> tuple[IPv4Network, ...]:
        """Delegate ``count`` /28 prefixes to the ENI in one call; return the new prefixes."""
        reply = await self.call(
            "AssignPrivateIpAddresses", NetworkInterfaceId=eni_id, Ipv4PrefixCount=count
        )
        return tuple(IPv4Network(p["Ipv4Prefix"]) for p in reply.get("AssignedIpv4Prefixes", []))

    async def unassign_private_ips(self, eni_id: str, ips: Sequence[IPv4Address]) -> None:
        await self.call(
            "UnassignPrivateIpAddresses",
            NetworkInterfaceId=eni_id,
            PrivateIpAddresses=[str(ip) for ip in ips],
        )

    async def unassign_prefixes(self, eni_id: str, prefixes: Sequence[IPv4Network]) -> None:
        await self.call(
            "UnassignPrivateIpAddresses",
            NetworkInterfaceId=eni_id,
            Ipv4Prefixes=[str(p) for p in prefixes],
        )

    async def create_tags(self, resource_ids: Sequence[str], tags: Mapping[str, str]) -> None:
        await self.call("CreateTags", Resources=list(resource_ids), Tags=_tag_list(tags))

    # -- trunks and branches (allowlisted on AWS: EKS's control plane calls them) -------------

    async def associate_trunk_interface(
        self, *, branch_id: str, trunk_id: str, vlan: int, client_token: str
    ) -> TrunkAssociation:
        """Tie the branch ENI to the trunk on ``vlan``; a retry with the same ``client_token``
        returns the association the first call made."""
        reply = await self.call(
            "AssociateTrunkInterface",
            BranchInterfaceId=branch_id,
            TrunkInterfaceId=trunk_id,
            VlanId=vlan,
            ClientToken=client_token,
        )
        return association_from_wire(reply["InterfaceAssociation"])

    async def disassociate_trunk_interface(self, association_id: str, client_token: str) -> None:
        """Untie a branch; raises NotFound (``InvalidAssociationID.NotFound``) when gone."""
        await self.call(
            "DisassociateTrunkInterface", AssociationId=association_id, ClientToken=client_token
        )

    async def describe_trunk_interface_associations(self, trunk_id: str) -> list[TrunkAssociation]:
        """Every association of one trunk, following NextToken pages."""
        params: dict[str, Any] = {
            "Filters": _filter_list({"trunk-interface-association.trunk-interface-id": [trunk_id]})
        }
        out: list[TrunkAssociation] = []
        while True:
            reply = await self.call("DescribeTrunkInterfaceAssociations", **params)
            out += [association_from_wire(d) for d in reply.get("InterfaceAssociations", [])]
            token = reply.get("NextToken")
            if not token:
                return out
            params["NextToken"] = token


EC2_ACTIONS_USED = (
    "DescribeInstanceTypes",
    "DescribeNetworkInterfaces",
    "DescribeSubnets",
    "CreateNetworkInterface",
    "AttachNetworkInterface",
    "DetachNetworkInterface",
    "DeleteNetworkInterface",
    "ModifyNetworkInterfaceAttribute",
    "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses",
    "CreateTags",
    "AssociateTrunkInterface",
    "DisassociateTrunkInterface",
    "DescribeTrunkInterfaceAssociations",
)
"""Every EC2 action this module calls (for the IAM policy and ``cloud.aws_actions``)."""


@attrs.frozen(kw_only=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None


@contextlib.asynccontextmanager
async def open_ec2(
    *,
    region: str,
    endpoint_url: str | None = None,
    credentials: Credentials | None = None,
    policy: RetryPolicy | None = None,
    rate: float = 10.0,
    burst: int = 20,
    on_call: OnCall | None = None,
) -> AsyncIterator[Ec2]:
    """Open one aiobotocore EC2 client (asyncio only) and yield it wrapped in ``Ec2``.

    Without ``credentials`` botocore's default chain applies (environment, IRSA, instance
    profile). botocore's retries are off: ``Ec2``'s policy is the only one.
    """
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    policy = policy or RetryPolicy()
    config = AioConfig(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=min(policy.attempt_timeout, 5.0),
        read_timeout=policy.attempt_timeout,
    )
    kwargs: dict[str, Any] = {"region_name": region, "config": config}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if credentials is not None:
        kwargs["aws_access_key_id"] = credentials.access_key_id
        kwargs["aws_secret_access_key"] = credentials.secret_access_key
        if credentials.session_token:
            kwargs["aws_session_token"] = credentials.session_token
    async with get_session().create_client("ec2", **kwargs) as client:
        yield Ec2(
            client, policy=policy, bucket=TokenBucket(rate=rate, burst=burst), on_call=on_call
        )
