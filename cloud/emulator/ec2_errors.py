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
