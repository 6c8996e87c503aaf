"""Request handlers moto lacks or gets wrong, installed on moto's EC2 response class.

They read the request parameters (moto parses them with the service model) and call the rules in
``rules``; moto serialises what they return with the same model, so the XML is EC2's.
"""

from __future__ import annotations

import secrets
from typing import Any

from moto.core.responses import ActionResult, EmptyResult
from moto.ec2.responses import EC2Response
from moto.ec2.responses.elastic_network_interfaces import ElasticNetworkInterfaces
from moto.ec2.utils import add_tag_specification

from cloud.emulator import ec2_errors, rules

_orig_modify_eni = ElasticNetworkInterfaces.modify_network_interface_attribute


def create_network_interface(self: Any) -> ActionResult:
    subnet = self.ec2_backend.get_subnet(self._get_param("SubnetId"))
    self.error_on_dryrun()
    eni = self.ec2_backend.create_network_interface(
        subnet,
        self._get_param("PrivateIpAddress"),
        self._get_param("PrivateIpAddresses", []),
        self._get_param("Groups", []),
        self._get_param("Description"),
        add_tag_specification(self._get_param("TagSpecifications", [])),
        secondary_ips_count=self._get_int_param("SecondaryPrivateIpAddressCount", 0),
        ipv4_prefix_count=self._get_int_param("Ipv4PrefixCount", 0),
        ipv4_prefixes=[p["Ipv4Prefix"] for p in self._get_param("Ipv4Prefixes", [])],
        interface_type=self._get_param("InterfaceType"),
        ipv6_addresses=[i["Ipv6Address"] for i in self._get_param("Ipv6Addresses", [])],
        ipv6_address_count=self._get_int_param("Ipv6AddressCount", 0),
    )
    return ActionResult({"NetworkInterface": eni})


def assign_private_ip_addresses(self: Any) -> ActionResult:
    eni, ips, prefixes = rules.assign_addresses(
        self.ec2_backend,
        self._get_param("NetworkInterfaceId"),
        ips=self._get_param("PrivateIpAddresses", []),
        count=self._get_int_param("SecondaryPrivateIpAddressCount", 0),
        prefixes=self._get_param("Ipv4Prefixes", []),
        prefix_count=self._get_int_param("Ipv4PrefixCount", 0),
    )
    result: dict[str, Any] = {
        "NetworkInterfaceId": eni.id,
        "AssignedPrivateIpAddresses": [{"PrivateIpAddress": ip} for ip in ips],
    }
    if prefixes:
        result["AssignedIpv4Prefixes"] = [{"Ipv4Prefix": str(p)} for p in prefixes]
    return ActionResult(result)


def unassign_private_ip_addresses(self: Any) -> ActionResult:
    rules.unassign_addresses(
        self.ec2_backend,
        self._get_param("NetworkInterfaceId"),
        ips=self._get_param("PrivateIpAddresses", []),
        prefixes=self._get_param("Ipv4Prefixes", []),
    )
    return EmptyResult()


def modify_network_interface_attribute(self: Any) -> ActionResult:
    # VPC CNI sets DeleteOnTermination through the attachment; moto drops that parameter.
    attachment = self._get_param("Attachment") or {}
    if "DeleteOnTermination" in attachment:
        eni = self.ec2_backend.get_network_interface(self._get_param("NetworkInterfaceId"))
        eni.delete_on_termination = str(attachment["DeleteOnTermination"]).lower() == "true"
    return _orig_modify_eni(self)


def associate_trunk_interface(self: Any) -> ActionResult:
    backend = self.ec2_backend
    trunk_id = self._get_param("TrunkInterfaceId")
    branch_id = self._get_param("BranchInterfaceId")
    vlan_id = self._get_int_param("VlanId")
    if backend.get_network_interface(trunk_id).interface_type != "trunk":
        raise ec2_errors.NotATrunk(trunk_id, "trunk")
    if backend.get_network_interface(branch_id).interface_type != "branch":
        raise ec2_errors.NotATrunk(branch_id, "branch")
    if vlan_id is None or not 1 <= vlan_id <= 4094:
        raise ec2_errors.InvalidVlanId(vlan_id)
    table = rules.extras(backend).trunk_associations
    for assoc in table.values():
        if assoc.branch_interface_id == branch_id:
            raise ec2_errors.BranchAlreadyAssociated(branch_id)
        if assoc.trunk_interface_id == trunk_id and assoc.vlan_id == vlan_id:
            raise ec2_errors.VlanInUse(trunk_id, vlan_id)
    assoc = rules.TrunkAssociation(
        association_id=f"trunk-assoc-{secrets.token_hex(9)[:17]}",
        branch_interface_id=branch_id,
        trunk_interface_id=trunk_id,
        vlan_id=vlan_id,
    )
    table[assoc.association_id] = assoc
    return ActionResult(
        {"InterfaceAssociation": assoc, "ClientToken": self._get_param("ClientToken")}
    )


_TRUNK_FILTERS = {
    "trunk-interface-association.id": "association_id",
    "trunk-interface-association.branch-interface-id": "branch_interface_id",
    "trunk-interface-association.trunk-interface-id": "trunk_interface_id",
    "trunk-interface-association.vlan-id": "vlan_id",
}


def describe_trunk_interface_associations(self: Any) -> ActionResult:
    table = rules.extras(self.ec2_backend).trunk_associations
    ids = self._get_param("AssociationIds", [])
    for assoc_id in ids:
        if assoc_id not in table:
            raise ec2_errors.TrunkAssociationNotFound(assoc_id)
    found = [table[i] for i in ids] if ids else list(table.values())
    for name, values in self._filters_from_querystring().items():
        field = _TRUNK_FILTERS.get(name)
        if field is None:
            raise ec2_errors.InvalidAddress(f"The filter '{name}' is invalid")
        found = [a for a in found if str(getattr(a, field)) in values]
    return ActionResult({"InterfaceAssociations": found})


def disassociate_trunk_interface(self: Any) -> ActionResult:
    table = rules.extras(self.ec2_backend).trunk_associations
    assoc_id = self._get_param("AssociationId")
    if table.pop(assoc_id, None) is None:
        raise ec2_errors.TrunkAssociationNotFound(assoc_id)
    return ActionResult({"Return": True, "ClientToken": self._get_param("ClientToken")})


_applied = False


def apply() -> None:
    """Install the backend rules and these handlers into moto (once per process)."""
    global _applied
    rules.apply()
    if _applied:
        return
    for handler in (
        create_network_interface,
        assign_private_ip_addresses,
        unassign_private_ip_addresses,
        modify_network_interface_attribute,
    ):
        setattr(ElasticNetworkInterfaces, handler.__name__, handler)
    for handler in (
        associate_trunk_interface,
        describe_trunk_interface_associations,
        disassociate_trunk_interface,
    ):
        setattr(EC2Response, handler.__name__, handler)
    _applied = True
