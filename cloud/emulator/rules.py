"""Patches that make moto's EC2 backend behave like EC2 where podwire depends on it.

Theory of operation: moto keeps the state and serialises it; ``apply()`` (idempotent) replaces
the few backend methods whose behaviour the agent depends on and moto gets wrong or skips:
address allocation (a collision-free allocator per subnet instead of moto's random picker),
ENI and IP limits per instance type, attach/detach/delete rules, /28 prefix delegation, the
``attaching`` phase, the missing DescribeNetworkInterfaces filters, and terminating an instance
detaching its ENIs. Security groups are ``groups``' and trunk associations ``trunks``' (this
module applies both and drops associations when their ENIs go). Every refusal is an
``EC2ClientError`` with EC2's own code (``ec2_errors``). Emulator-only state lives on moto's
objects under ``_podwire*`` names (``backend_state``), so it disappears with them when moto's
state is reset. The request handlers that use the new parameters are in ``actions``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import attrs
from moto.ec2.exceptions import InvalidNetworkAttachmentIdError, InvalidNetworkInterfaceIdError
from moto.ec2.models.elastic_network_interfaces import (
    Attachment,
    NetworkInterface,
    NetworkInterfaceBackend,
)
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto.ec2.models.instances import Instance
from moto.ec2.models.subnets import Subnet

from cloud.emulator import ec2_errors, groups, trunks
from cloud.emulator.allocator import SubnetAllocator
from cloud.emulator.backend_state import extras, is_attaching
from cloud.emulator.errors import (
    AddressInUse,
    AddressOutsideSubnet,
    AddressReserved,
    AllocatorError,
    InsufficientAddresses,
    InsufficientPrefixes,
)


@attrs.frozen(kw_only=True)
class EniLimits:
    """What an instance type allows: ENIs per instance and IPv4 slots per ENI."""

    max_enis: int
    ips_per_eni: int


def limits_for(instance_type: str) -> EniLimits | None:
    """Return the ENI limits of ``instance_type`` from moto's instance-type data, or None."""
    info = INSTANCE_TYPES.get(instance_type, {}).get("NetworkInfo")
    if not info:
        return None
    return EniLimits(
        max_enis=int(info["MaximumNetworkInterfaces"]),
        ips_per_eni=int(info["Ipv4AddressesPerInterface"]),
    )


def allocator_of(subnet: Any) -> SubnetAllocator:
    """Return the allocator of a moto subnet, creating it on first use."""
    found = subnet.__dict__.get("_podwire_alloc")
    if found is None:
        found = subnet.__dict__["_podwire_alloc"] = SubnetAllocator(IPv4Network(subnet.cidr_block))
    return found  # type: ignore[no-any-return]


def _preclaimed(subnet: Any) -> set[str]:
    # Addresses moto took for an instance's primary ENI just before it creates that ENI.
    return subnet.__dict__.setdefault("_podwire_preclaimed", set())  # type: ignore[no-any-return]


def prefixes_of(eni: Any) -> list[IPv4Network]:
    """Return the /28 prefixes delegated to an ENI (the live list)."""
    return eni.__dict__.setdefault("_podwire_prefixes", [])  # type: ignore[no-any-return]


def private_ips_of(eni: Any) -> list[str]:
    """Return an ENI's IPv4 addresses, primary first."""
    ips = [item["PrivateIpAddress"] for item in eni.private_ip_addresses]
    ips.sort(key=lambda ip: ip != eni.private_ip_address)
    return ips


def _slots(eni: Any) -> int:
    # EC2 counts the primary IP, each secondary IP and each /28 prefix against one limit.
    return len(eni.private_ip_addresses) + len(prefixes_of(eni))


@contextlib.contextmanager
def _as_ec2_errors() -> Iterator[None]:
    try:
        yield
    except InsufficientAddresses:
        raise ec2_errors.InsufficientFreeAddressesInSubnet() from None
    except InsufficientPrefixes:
        raise ec2_errors.InsufficientCidrBlocks() from None
    except AddressInUse as e:
        raise ec2_errors.AddressInUse(str(e.what)) from None
    except AddressReserved as e:
        raise ec2_errors.InvalidAddress(
            f"Address {e.what} is in subnet's reserved address range"
        ) from None
    except AddressOutsideSubnet as e:
        raise ec2_errors.InvalidAddress(
            f"Address {e.what} does not fall within the subnet's address range"
        ) from None


class _Taking:
    """All-or-nothing claims on one allocator: everything taken is given back on error."""

    def __init__(self, alloc: SubnetAllocator) -> None:
        self.alloc = alloc
        self.ips: list[IPv4Address] = []
        self.prefixes: list[IPv4Network] = []

    def __enter__(self) -> _Taking:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            return
        for ip in self.ips:
            self.alloc.release_ip(ip)
        for prefix in self.prefixes:
            self.alloc.release_prefix(prefix)
        if isinstance(exc, AllocatorError):
            with _as_ec2_errors():
                raise exc

    def claim(self, ip: str) -> str:
        self.alloc.claim_ip(IPv4Address(ip))
        self.ips.append(IPv4Address(ip))
        return ip

    def allocate(self, count: int) -> list[str]:
        got = self.alloc.allocate_ips(count)
        self.ips.extend(got)
        return [str(ip) for ip in got]

    def claim_prefix(self, prefix: str) -> IPv4Network:
        net = IPv4Network(prefix)
        self.alloc.claim_prefix(net)
        self.prefixes.append(net)
        return net

    def allocate_prefixes(self, count: int) -> list[IPv4Network]:
        got = self.alloc.allocate_prefixes(count)
        self.prefixes.extend(got)
        return got


def _release_all(eni: Any) -> None:
    alloc = allocator_of(eni.subnet)
    for ip in private_ips_of(eni):
        alloc.release_ip(IPv4Address(ip))
    for prefix in prefixes_of(eni):
        alloc.release_prefix(prefix)
    prefixes_of(eni).clear()


# --- subnet: moto's own callers (RunInstances' primary address) go through the allocator ---


def _subnet_get_available_ip(self: Subnet, instance: Any) -> str:
    with _as_ec2_errors():
        ip = str(allocator_of(self).allocate_ips(1)[0])
    _preclaimed(self).add(ip)
    return ip


def _subnet_request_ip(self: Subnet, ip: str, instance: Any) -> None:
    with _as_ec2_errors():
        allocator_of(self).claim_ip(IPv4Address(ip))
    _preclaimed(self).add(ip)


def _subnet_del_ip(self: Subnet, ip: str) -> None:
    _preclaimed(self).discard(ip)
    with contextlib.suppress(ValueError):
        allocator_of(self).release_ip(IPv4Address(ip))


# --- network interfaces ---

_orig_create_eni = NetworkInterfaceBackend.create_network_interface
_orig_all_enis = NetworkInterfaceBackend.get_all_network_interfaces
_orig_attachment_init = Attachment.__init__
_orig_terminate = Instance.terminate
_orig_prep_nics = Instance.prep_nics


# What CreateNetworkInterface accepts (a branch is an ordinary ENI, associated later).
INTERFACE_TYPES = frozenset({"interface", "trunk", "efa", "efa-only"})


def create_network_interface(
    self: Any,
    subnet: Any,
    private_ip_address: str | list[str] | None,
    private_ip_addresses: list[Any] | None = None,
    group_ids: list[str] | None = None,
    description: str | None = None,
    tags: dict[str, str] | None = None,
    delete_on_termination: bool | None = False,
    **kwargs: Any,
) -> NetworkInterface:
    """CreateNetworkInterface with every address from the subnet's allocator (no collisions),
    ``Ipv4PrefixCount`` / ``Ipv4Prefixes`` and ``InterfaceType`` honoured, and the groups
    checked as EC2 does (``groups.eni_groups``)."""
    if isinstance(subnet, str):
        subnet = self.get_subnet(subnet)
    if isinstance(private_ip_address, list):
        private_ip_address = private_ip_address[0] if private_ip_address else None
    wanted: list[str] = []
    for item in private_ip_addresses or []:
        ip, primary = (
            (item, False)
            if isinstance(item, str)
            else (item.get("PrivateIpAddress"), bool(item.get("Primary")))
        )
        if primary and not private_ip_address:
            private_ip_address = ip
        elif ip and ip != private_ip_address:
            wanted.append(ip)
    count = int(kwargs.pop("secondary_ips_count", None) or 0)
    prefix_count = int(kwargs.pop("ipv4_prefix_count", None) or 0)
    prefixes = list(kwargs.pop("ipv4_prefixes", None) or [])
    interface_type = kwargs.pop("interface_type", None) or "interface"
    if interface_type not in INTERFACE_TYPES:
        raise ec2_errors.InterfaceTypeInvalid(interface_type)
    if (wanted or count) and (prefixes or prefix_count):
        raise ec2_errors.MixedAddressesAndPrefixes()
    group_ids = [g.id for g in groups.eni_groups(self, group_ids or [], subnet)]

    preclaimed = _preclaimed(subnet)
    with _Taking(allocator_of(subnet)) as taking:
        if private_ip_address is None:
            primary_ip = taking.allocate(1)[0]
        elif private_ip_address in preclaimed:
            preclaimed.discard(private_ip_address)
            primary_ip = private_ip_address
        else:
            primary_ip = taking.claim(private_ip_address)
        secondaries = [taking.claim(ip) for ip in wanted] + taking.allocate(count)
        new_prefixes = [taking.claim_prefix(p) for p in prefixes]
        new_prefixes += taking.allocate_prefixes(prefix_count)

    addresses = [{"Primary": True, "PrivateIpAddress": primary_ip}]
    addresses += [{"Primary": False, "PrivateIpAddress": ip} for ip in secondaries]
    eni = _orig_create_eni(
        self,
        subnet,
        primary_ip,
        addresses,
        group_ids,
        description,
        tags,
        delete_on_termination,
        **kwargs,
    )
    eni.interface_type = interface_type
    prefixes_of(eni).extend(new_prefixes)
    return eni


def delete_network_interface(self: Any, eni_id: str) -> None:
    """DeleteNetworkInterface: refused while attached; gives the addresses back."""
    eni = self.enis.get(eni_id)
    if eni is None:
        raise InvalidNetworkInterfaceIdError(eni_id)
    if eni.instance is not None:
        raise ec2_errors.NetworkInterfaceInUse(eni_id)
    _release_all(eni)
    # The trunk's associations go with it; so does a deleted branch's own.
    extras(self).trunks.drop_eni(eni_id)
    del self.enis[eni_id]


def attach_network_interface(
    self: Any, eni_id: str, instance_id: str, device_index: int
) -> Attachment:
    """AttachNetworkInterface with EC2's checks: the ENI is free, the slot is free, same AZ,
    within the instance type's ENI and IP limits. With an injected attach delay the attachment
    stays ``attaching`` for that long."""
    eni = self.get_network_interface(eni_id)
    instance = self.get_instance(instance_id)
    device_index = int(device_index)
    if eni.instance is not None or extras(self).trunks.of_branch(eni_id) is not None:
        raise ec2_errors.NetworkInterfaceInUse(eni_id)
    if instance.state not in ("pending", "running", "stopped"):
        raise ec2_errors.IncorrectInstanceState(instance_id, instance.state)
    if device_index in instance.nics:
        raise ec2_errors.DeviceIndexInUse(instance_id, device_index)
    if eni.subnet.availability_zone != instance.placement.zone:
        raise ec2_errors.AvailabilityZoneMismatch()
    limits = limits_for(instance.instance_type)
    if limits is not None:
        if len(instance.nics) >= limits.max_enis:
            raise ec2_errors.AttachmentLimitExceeded(instance.instance_type, limits.max_enis)
        if _slots(eni) > limits.ips_per_eni:
            raise ec2_errors.PrivateIpAddressLimitExceeded()
    instance.attach_eni(eni, device_index)
    state = extras(self)
    if state.attach_delay > 0:
        state.attaching_until[eni.id] = time.monotonic() + state.attach_delay
    attachment: Attachment = eni.attachment
    return attachment


def detach_network_interface(self: Any, attachment_id: str, *args: Any) -> None:
    """DetachNetworkInterface: the primary ENI (device index 0) cannot be detached."""
    for eni in self.enis.values():
        if eni.attachment_id == attachment_id:
            if eni.device_index == 0:
                raise ec2_errors.PrimaryInterfaceDetach()
            eni.instance.detach_eni(eni)
            extras(self).attaching_until.pop(eni.id, None)
            extras(self).trunks.drop_eni(eni.id)
            return
    raise InvalidNetworkAttachmentIdError(attachment_id)


def assign_addresses(
    backend: Any,
    eni_id: str,
    *,
    ips: list[str],
    count: int,
    prefixes: list[str],
    prefix_count: int,
) -> tuple[NetworkInterface, list[str], list[IPv4Network]]:
    """AssignPrivateIpAddresses: return the ENI and only the addresses and prefixes added now.

    Raises PrivateIpAddressLimitExceeded past the instance type's slots per ENI,
    InsufficientFreeAddressesInSubnet / InsufficientCidrBlocks when the subnet cannot serve it.
    """
    eni = backend.get_network_interface(eni_id)
    if (ips or count) and (prefixes or prefix_count):
        raise ec2_errors.MixedAddressesAndPrefixes()
    held = set(private_ips_of(eni))
    ips = [ip for ip in ips if ip not in held]
    if eni.instance is not None:
        limits = limits_for(eni.instance.instance_type)
        wanted = len(ips) + count + len(prefixes) + prefix_count
        if limits is not None and _slots(eni) + wanted > limits.ips_per_eni:
            raise ec2_errors.PrivateIpAddressLimitExceeded()
    with _Taking(allocator_of(eni.subnet)) as taking:
        new_ips = [taking.claim(ip) for ip in ips] + taking.allocate(count)
        new_prefixes = [taking.claim_prefix(p) for p in prefixes]
        new_prefixes += taking.allocate_prefixes(prefix_count)
    eni.private_ip_addresses.extend({"Primary": False, "PrivateIpAddress": ip} for ip in new_ips)
    prefixes_of(eni).extend(new_prefixes)
    return eni, new_ips, new_prefixes


def unassign_addresses(backend: Any, eni_id: str, *, ips: list[str], prefixes: list[str]) -> None:
    """UnassignPrivateIpAddresses: every address must be a secondary IP of this ENI and every
    prefix delegated to it (else InvalidParameterValue, and nothing changes)."""
    eni = backend.get_network_interface(eni_id)
    secondaries = set(private_ips_of(eni)) - {eni.private_ip_address}
    if any(ip not in secondaries for ip in ips):
        raise ec2_errors.AddressNotAssigned(eni_id)
    held = prefixes_of(eni)
    nets = [IPv4Network(p) for p in prefixes]
    if any(net not in held for net in nets):
        raise ec2_errors.PrefixNotAssigned(eni_id)
    alloc = allocator_of(eni.subnet)
    gone = set(ips)
    eni.private_ip_addresses[:] = [
        item for item in eni.private_ip_addresses if item["PrivateIpAddress"] not in gone
    ]
    for ip in gone:
        alloc.release_ip(IPv4Address(ip))
    for net in nets:
        held.remove(net)
        alloc.release_prefix(net)


def _assign_via_backend(
    self: Any,
    eni_id: str,
    private_ip_addresses: list[str] | None = None,
    secondary_ips_count: int | None = None,
) -> NetworkInterface:
    eni, _, _ = assign_addresses(
        self,
        eni_id,
        ips=list(private_ip_addresses or []),
        count=int(secondary_ips_count or 0),
        prefixes=[],
        prefix_count=0,
    )
    return eni


def _unassign_via_backend(
    self: Any, eni_id: str, private_ip_address: list[str] | None = None
) -> NetworkInterface:
    unassign_addresses(self, eni_id, ips=list(private_ip_address or []), prefixes=[])
    eni: NetworkInterface = self.get_network_interface(eni_id)
    return eni


def attachment_status(eni: Any) -> str | None:
    """``attaching`` or ``attached`` for an attached ENI, None for a free one."""
    if eni.instance is None:
        return None
    return "attaching" if is_attaching(eni) else "attached"


def _attachment_init(self: Attachment, eni: NetworkInterface) -> None:
    _orig_attachment_init(self, eni)
    if is_attaching(eni):
        self.status = "attaching"


def _ipv4_prefixes(self: NetworkInterface) -> list[dict[str, str]]:
    return [{"Ipv4Prefix": str(p)} for p in prefixes_of(self)]


_ENI_FILTERS: dict[str, Callable[[Any], list[str]]] = {
    "attachment.device-index": lambda e: [str(e.device_index)] if e.instance else [],
    "attachment.status": lambda e: [s] if (s := attachment_status(e)) else [],
    "attachment.instance-id": lambda e: [e.instance.id] if e.instance else [],
    "addresses.private-ip-address": private_ips_of,
    "private-ip-address": private_ips_of,
    "mac-address": lambda e: [e.mac_address],
    "interface-type": lambda e: [e.interface_type],
    "status": lambda e: [e.status],
}


def get_all_network_interfaces(
    self: Any, eni_ids: list[str] | None = None, filters: Any = None
) -> list[NetworkInterface]:
    """DescribeNetworkInterfaces with EC2's filters moto lacks or gets wrong (any value of the
    ENI matching any value of the filter, ``*`` and ``?`` allowed)."""
    rest = dict(filters or {})
    ours = {name: rest.pop(name) for name in list(rest) if name in _ENI_FILTERS}
    enis: list[NetworkInterface] = _orig_all_enis(self, eni_ids, rest)
    for name, patterns in ours.items():
        pick = _ENI_FILTERS[name]
        enis = [
            e for e in enis if any(fnmatch.fnmatchcase(v, p) for v in pick(e) for p in patterns)
        ]
    return enis


# --- instances ---


def _terminate(self: Instance) -> Any:
    backend = self.ec2_backend
    for nic in sorted(self.nics.values(), key=lambda n: -int(n.device_index or 0)):
        delete = bool(nic.delete_on_termination)
        self.detach_eni(nic)
        extras(backend).attaching_until.pop(nic.id, None)
        extras(backend).trunks.drop_eni(nic.id)
        if delete:
            backend.delete_network_interface(nic.id)
    return _orig_terminate(self)


def _prep_nics(self: Instance, nic_spec: list[dict[str, Any]], *args: Any, **kwargs: Any) -> None:
    _orig_prep_nics(self, nic_spec, *args, **kwargs)
    spec = next((n for n in nic_spec if int(n.get("DeviceIndex", -1)) == 0), None)
    primary = self.nics.get(0)
    # EC2 deletes the primary ENI it created at launch when the instance terminates.
    if primary is not None and (
        spec is None
        or ("NetworkInterfaceId" not in spec and spec.get("DeleteOnTermination") is not False)
    ):
        primary.delete_on_termination = True


def _primary_attr(name: str) -> property:
    def get(self: Instance) -> Any:
        nic = self.nics.get(0)
        return getattr(nic, name) if nic is not None else None

    return property(get)


_applied = False


def apply() -> None:
    """Install the rules into moto's classes (once per process; later calls do nothing)."""
    global _applied
    if _applied:
        return
    groups.apply()
    trunks.apply()
    Subnet.get_available_subnet_ip = _subnet_get_available_ip  # type: ignore[method-assign]
    Subnet.request_ip = _subnet_request_ip  # type: ignore[method-assign]
    Subnet.del_subnet_ip = _subnet_del_ip  # type: ignore[method-assign]
    Subnet.available_ip_address_count = property(  # type: ignore[method-assign,assignment]
        lambda self: allocator_of(self).free_count
    )
    backend_methods: dict[str, Callable[..., Any]] = {
        "create_network_interface": create_network_interface,
        "delete_network_interface": delete_network_interface,
        "attach_network_interface": attach_network_interface,
        "detach_network_interface": detach_network_interface,
        "assign_private_ip_addresses": _assign_via_backend,
        "unassign_private_ip_addresses": _unassign_via_backend,
        "get_all_network_interfaces": get_all_network_interfaces,
    }
    for name, method in backend_methods.items():
        setattr(NetworkInterfaceBackend, name, method)
    Attachment.__init__ = _attachment_init  # type: ignore[method-assign]
    NetworkInterface.ipv4_prefixes = property(_ipv4_prefixes)  # type: ignore[attr-defined]
    Instance.terminate = _terminate  # type: ignore[method-assign]
    Instance.prep_nics = _prep_nics  # type: ignore[method-assign]
    for name in ("private_ip", "private_ip_address"):
        setattr(Instance, name, _primary_attr("private_ip_address"))
    for name in ("public_ip", "public_ip_address"):
        setattr(Instance, name, _primary_attr("public_ip"))
    _applied = True
