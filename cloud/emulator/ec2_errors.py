"""The EC2 errors the emulator's rules raise, with the codes and messages EC2 uses.

Each is moto's ``EC2ClientError``, which moto serialises as a real EC2 error response (HTTP 400,
``<Response><Errors><Error><Code>``), so aiobotocore surfaces it as ``ClientError`` with the code.
"""

from __future__ import annotations

from moto.ec2.exceptions import EC2ClientError


class AttachmentLimitExceeded(EC2ClientError):
    def __init__(self, instance_type: str, limit: int) -> None:
        super().__init__(
            "AttachmentLimitExceeded",
            f"Interface count {limit + 1} exceeds the limit for {instance_type}",
        )


class PrivateIpAddressLimitExceeded(EC2ClientError):
    def __init__(self) -> None:
        super().__init__(
            "PrivateIpAddressLimitExceeded", "Number of private addresses will exceed limit."
        )


class DeviceIndexInUse(EC2ClientError):
    def __init__(self, instance_id: str, device_index: int) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Instance '{instance_id}' already has an interface attached at device index "
            f"'{device_index}'.",
        )


class NetworkInterfaceInUse(EC2ClientError):
    def __init__(self, eni_id: str) -> None:
        super().__init__("InvalidNetworkInterface.InUse", f"Interface: [{eni_id}] in use.")


class AvailabilityZoneMismatch(EC2ClientError):
    def __init__(self) -> None:
        super().__init__(
            "InvalidParameterCombination",
            "You may not attach a network interface to an instance if they are not in the same "
            "availability zone",
        )


class IncorrectInstanceState(EC2ClientError):
    def __init__(self, instance_id: str, state: str) -> None:
        super().__init__(
            "IncorrectInstanceState",
            f"The instance '{instance_id}' is not in a valid state for this operation ({state}).",
        )


class PrimaryInterfaceDetach(EC2ClientError):
    def __init__(self) -> None:
        super().__init__(
            "OperationNotPermitted", "The network interface at device index 0 cannot be detached."
        )


class AddressNotAssigned(EC2ClientError):
    def __init__(self, eni_id: str) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Some of the specified addresses are not assigned to interface {eni_id}",
        )


class PrefixNotAssigned(EC2ClientError):
    def __init__(self, eni_id: str) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Some of the specified prefixes are not assigned to interface {eni_id}",
        )


class InsufficientFreeAddressesInSubnet(EC2ClientError):
    def __init__(self) -> None:
        super().__init__(
            "InsufficientFreeAddressesInSubnet",
            "The specified subnet does not have enough free addresses to satisfy the request.",
        )


class InsufficientCidrBlocks(EC2ClientError):
    def __init__(self) -> None:
        super().__init__(
            "InsufficientCidrBlocks",
            "The specified subnet does not have enough free cidr blocks to satisfy the request.",
        )


class AddressInUse(EC2ClientError):
    def __init__(self, what: str) -> None:
        super().__init__("InvalidIPAddress.InUse", f"Address {what} is in use.")


class InvalidAddress(EC2ClientError):
    def __init__(self, reason: str) -> None:
        super().__init__("InvalidParameterValue", reason)


class MixedAddressesAndPrefixes(EC2ClientError):
    def __init__(self) -> None:
        super().__init__(
            "InvalidParameterCombination",
            "You may specify secondary private IP addresses or IPv4 prefixes, but not both.",
        )


class NotATrunk(EC2ClientError):
    def __init__(self, eni_id: str, expected: str) -> None:
        super().__init__(
            "InvalidParameterValue", f"Interface {eni_id} is not of interface type '{expected}'."
        )


class InvalidVlanId(EC2ClientError):
    def __init__(self, vlan_id: int | None) -> None:
        super().__init__(
            "InvalidParameterValue", f"VlanId {vlan_id} is invalid: expected 1 to 4094."
        )


class VlanInUse(EC2ClientError):
    def __init__(self, trunk_id: str, vlan_id: int) -> None:
        super().__init__(
            "InvalidParameterValue", f"VlanId {vlan_id} is already in use on trunk {trunk_id}."
        )


class BranchAlreadyAssociated(EC2ClientError):
    def __init__(self, branch_id: str) -> None:
        super().__init__(
            "InvalidParameterValue", f"Interface {branch_id} is already associated with a trunk."
        )


class TrunkAssociationNotFound(EC2ClientError):
    def __init__(self, association_id: str) -> None:
        super().__init__(
            "InvalidAssociationID.NotFound", f"Association ID '{association_id}' not found."
        )


class InterfaceTypeInvalid(EC2ClientError):
    def __init__(self, value: str) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Invalid value '{value}' for InterfaceType: expected interface, efa, efa-only or "
            "trunk.",
        )


class TrunkNotAttached(EC2ClientError):
    def __init__(self, trunk_id: str) -> None:
        super().__init__(
            "InvalidParameterValue", f"Trunk interface {trunk_id} is not attached to an instance."
        )


class TrunkingNotSupported(EC2ClientError):
    def __init__(self, trunk_id: str, instance_type: str) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Trunk interface {trunk_id} is attached to a {instance_type} instance, which does "
            "not support interface trunking.",
        )


class BranchLimitExceeded(EC2ClientError):
    def __init__(self, trunk_id: str, instance_type: str, limit: int) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Trunk interface {trunk_id} already has {limit} branch interfaces, the maximum for "
            f"{instance_type}.",
        )


class BranchAttached(EC2ClientError):
    def __init__(self, branch_id: str) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Interface {branch_id} is attached to an instance and cannot be a branch interface.",
        )


class BranchNotPlain(EC2ClientError):
    def __init__(self, branch_id: str, interface_type: str) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Interface {branch_id} of type '{interface_type}' cannot be a branch interface.",
        )


class BranchPlacementMismatch(EC2ClientError):
    def __init__(self, branch_id: str, trunk_id: str, what: str) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Branch interface {branch_id} and trunk interface {trunk_id} are in different "
            f"{what}s.",
        )


class GreNotSupported(EC2ClientError):
    def __init__(self) -> None:
        super().__init__(
            "InvalidParameterValue", "Only the VLAN interface protocol is supported: give a VlanId."
        )


class IdempotentParameterMismatch(EC2ClientError):
    def __init__(self, token: str) -> None:
        super().__init__(
            "IdempotentParameterMismatch",
            f"The client token '{token}' was already used with different parameters.",
        )


class InvalidMaxResults(EC2ClientError):
    def __init__(self, value: int, low: int, high: int) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Value ({value}) for parameter maxResults is invalid. Expected a value between "
            f"{low} and {high}.",
        )


class InvalidNextToken(EC2ClientError):
    def __init__(self, token: str) -> None:
        super().__init__("InvalidParameterValue", f"The token '{token}' is invalid.")


class InvalidFilter(EC2ClientError):
    def __init__(self, name: str) -> None:
        super().__init__("InvalidParameterValue", f"The filter '{name}' is invalid")


# --- security groups ---


class SecurityGroupIdNotFound(EC2ClientError):
    """An ENI (CreateNetworkInterface, ModifyNetworkInterfaceAttribute) names a group that does
    not exist: EC2's code here differs from the rules API's ``InvalidGroup.NotFound``."""

    def __init__(self, group_id: str, vpc_id: str) -> None:
        super().__init__(
            "InvalidSecurityGroupID.NotFound",
            f"The security group '{group_id}' does not exist in VPC '{vpc_id}'",
        )


class SecurityGroupsPerInterfaceLimitExceeded(EC2ClientError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            "SecurityGroupsPerInterfaceLimitExceeded",
            f"The maximum number of security groups per interface ({limit}) has been reached.",
        )


class SecurityGroupsRequired(EC2ClientError):
    def __init__(self) -> None:
        super().__init__(
            "InvalidParameterValue", "At least one security group must be given for Groups."
        )


class SecurityGroupOtherNetwork(EC2ClientError):
    def __init__(self, group_id: str, subnet_id: str) -> None:
        super().__init__(
            "InvalidParameter",
            f"Security group {group_id} and subnet {subnet_id} belong to different networks.",
        )


class CannotDeleteDefaultGroup(EC2ClientError):
    def __init__(self, group_id: str) -> None:
        super().__init__(
            "CannotDelete",
            f'the specified group: "{group_id}" name: "default" cannot be deleted by a user',
        )


class GroupHasDependents(EC2ClientError):
    def __init__(self, group_id: str) -> None:
        super().__init__("DependencyViolation", f"resource {group_id} has a dependent object")


class UnknownProtocol(EC2ClientError):
    def __init__(self, value: str) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Invalid value '{value}' for IP protocol. Unknown protocol.",
        )


class PortRangeMissing(EC2ClientError):
    def __init__(self, protocol: str) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Invalid value for portRange. Must specify both from and to ports with "
            f"{protocol.upper()}.",
        )


class PortRangeInvalid(EC2ClientError):
    def __init__(self, protocol: str, low: int, high: int) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Invalid {protocol.upper()} port range: {low} to {high}.",
        )


class IcmpTypeCodeInvalid(EC2ClientError):
    def __init__(self, icmp_type: int, icmp_code: int) -> None:
        super().__init__(
            "InvalidParameterValue",
            f"Invalid ICMP type {icmp_type} / code {icmp_code}: both -1 or 0-255, and a code "
            "only with a type.",
        )
