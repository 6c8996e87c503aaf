"""Request handlers moto lacks or gets wrong, installed on moto's EC2 response class.

They read the request parameters (moto parses them with the service model) and call the rules in
``rules``; moto serialises what they return with the same model, so the XML is EC2's.
"""

from __future__ import annotations

from typing import Any

from moto.core.responses import ActionResult, EmptyResult
from moto.ec2.responses import EC2Response
from moto.ec2.responses.elastic_network_interfaces import ElasticNetworkInterfaces
from moto.ec2.utils import add_tag_specification

from cloud.emulator import groups, rules, trunks

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
    self.error_on_dryrun()
    assoc = trunks.associate(
        self.ec2_backend,
        branch_id=self._get_param("BranchInterfaceId"),
        trunk_id=self._get_param("TrunkInterfaceId"),
        vlan_id=self._get_int_param("VlanId"),
        gre_key=self._get_int_param("GreKey"),
        client_token=self._get_param("ClientToken"),
    )
    return ActionResult(
        {"InterfaceAssociation": assoc, "ClientToken": self._get_param("ClientToken")}
    )


def describe_trunk_interface_associations(self: Any) -> ActionResult:
    self.error_on_dryrun()
    found, next_token = trunks.describe(
        self.ec2_backend,
        association_ids=self._get_param("AssociationIds", []),
        filters=self._filters_from_querystring(),
        max_results=self._get_int_param("MaxResults"),
        next_token=self._get_param("NextToken"),
    )
    result: dict[str, Any] = {"InterfaceAssociations": found}
    if next_token:
        result["NextToken"] = next_token
    return ActionResult(result)


def disassociate_trunk_interface(self: Any) -> ActionResult:
    self.error_on_dryrun()
    trunks.disassociate(self.ec2_backend, self._get_param("AssociationId"))
    return ActionResult({"Return": True, "ClientToken": self._get_param("ClientToken")})


def _permissions(self: Any) -> list[dict[str, Any]]:
    return list(self._process_rules_from_querystring())


def authorize_security_group_ingress(self: Any) -> ActionResult:
    self.error_on_dryrun()
    added = groups.authorize(self.ec2_backend, _permissions(self), egress=False)
    return ActionResult({"Return": True, "SecurityGroupRules": added})


def authorize_security_group_egress(self: Any) -> ActionResult:
    self.error_on_dryrun()
    added = groups.authorize(self.ec2_backend, _permissions(self), egress=True)
    return ActionResult({"Return": True, "SecurityGroupRules": added})


def revoke_security_group_ingress(self: Any) -> ActionResult:
    self.error_on_dryrun()
    permissions = _permissions(self)
    for kwargs in permissions:
        kwargs.pop("sgrule_tags", None)
    groups.revoke(self.ec2_backend, permissions, egress=False)
    return ActionResult({"Return": True})


def revoke_security_group_egress(self: Any) -> ActionResult:
    self.error_on_dryrun()
    permissions = _permissions(self)
    for kwargs in permissions:
        kwargs.pop("sgrule_tags", None)
    groups.revoke(self.ec2_backend, permissions, egress=True)
    return ActionResult({"Return": True})


def delete_security_group(self: Any) -> ActionResult:
    self.error_on_dryrun()
    backend = self.ec2_backend
    group = groups.find_group(backend, self._get_param("GroupName"), self._get_param("GroupId"))
    groups.check_deletable(backend, group)
    backend.delete_security_group(group_id=group.id)
    return EmptyResult()


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
        authorize_security_group_ingress,
        authorize_security_group_egress,
        revoke_security_group_ingress,
        revoke_security_group_egress,
        delete_security_group,
    ):
        setattr(EC2Response, handler.__name__, handler)
    _applied = True
