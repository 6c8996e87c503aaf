"""Security groups with EC2's semantics, on top of moto's group and rule store.

Theory of operation: moto keeps the groups and their rules (``SecurityGroup``, one
``SecurityGroupRule`` with an ``sgr-`` id per CIDR or referenced group, the 60-rule limit, the
allow-all outbound rule of a new group) and serialises them; the router enforces what they say
(``firewall``). This module patches what moto gets wrong, each refusal with EC2's own code:

* the VPC's default group also allows all inbound traffic from itself (moto: no inbound rule);
* an ENI's groups are checked when it is created or its ``Groups`` are modified: every group
  must exist in the ENI's VPC (``InvalidSecurityGroupID.NotFound``; moto silently creates
  unknown ones) and there may be at most ``MAX_GROUPS_PER_ENI``
  (``SecurityGroupsPerInterfaceLimitExceeded``); Modify replaces the whole set;
* an ENI's groups are its own (moto adds the instance's groups to every attached ENI), and an
  instance's groups are those of its primary ENI;
* a rule's protocol (name or number), port range and ICMP type/code are checked, and an
  Authorize call with several permissions adds all of them or none;
* the default group cannot be deleted (``CannotDelete``), nor a group that an ENI uses or
  another group's rule references (``DependencyViolation``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from moto.ec2.exceptions import InvalidSecurityGroupNotFoundError
from moto.ec2.models.elastic_network_interfaces import NetworkInterface, NetworkInterfaceBackend
from moto.ec2.models.instances import Instance, InstanceBackend
from moto.ec2.models.security_groups import (
    SecurityGroup,
    SecurityGroupBackend,
    SecurityGroupRule,
)

from cloud.emulator import ec2_errors

MAX_GROUPS_PER_ENI = 5

# EC2's protocol names and the numbers it reports by name.
_PROTOCOLS = {
    "tcp": "tcp",
    "6": "tcp",
    "udp": "udp",
    "17": "udp",
    "icmp": "icmp",
    "1": "icmp",
    "icmpv6": "icmpv6",
    "58": "icmpv6",
    "-1": "-1",
    "all": "-1",
}


def normalize_protocol(value: object) -> str:
    """Return EC2's name for a rule's protocol: ``tcp``/``udp``/``icmp``/``icmpv6``, ``-1`` for
    all, or the number (0-255) of any other protocol. Raises UnknownProtocol."""
    text = str(value).strip().lower() if value is not None else ""
    if text in _PROTOCOLS:
        return _PROTOCOLS[text]
    if text.isdigit() and 0 <= int(text) <= 255:
        return _PROTOCOLS.get(str(int(text)), str(int(text)))
    raise ec2_errors.UnknownProtocol(str(value))


def normalize_ports(protocol: str, from_port: object, to_port: object) -> tuple[int, int]:
    """Return the (from, to) a rule of ``protocol`` stores: a TCP/UDP port range, an ICMP
    (type, code) with -1 for all, (-1, -1) for every other protocol (EC2 ignores ports there).

    Raises PortRangeMissing, PortRangeInvalid or IcmpTypeCodeInvalid.
    """
    if protocol in ("tcp", "udp"):
        if from_port is None or to_port is None:
            raise ec2_errors.PortRangeMissing(protocol)
        low, high = int(str(from_port)), int(str(to_port))
        if not 0 <= low <= high <= 65535:
            raise ec2_errors.PortRangeInvalid(protocol, low, high)
        return low, high
    if protocol in ("icmp", "icmpv6"):
        icmp_type = -1 if from_port is None else int(str(from_port))
        icmp_code = -1 if to_port is None else int(str(to_port))
        if (
            not -1 <= icmp_type <= 255
            or not -1 <= icmp_code <= 255
            or (icmp_type == -1 and icmp_code != -1)
        ):
            raise ec2_errors.IcmpTypeCodeInvalid(icmp_type, icmp_code)
        return icmp_type, icmp_code
    return -1, -1


def eni_groups(backend: Any, group_ids: Iterable[str], subnet: Any) -> list[SecurityGroup]:
    """Return the groups an ENI in ``subnet`` gets for ``group_ids`` (duplicates dropped; none
    given: the VPC's default group).

    Raises SecurityGroupsPerInterfaceLimitExceeded, SecurityGroupIdNotFound and
    SecurityGroupOtherNetwork.
    """
    wanted = list(dict.fromkeys(str(g) for g in group_ids))
    if len(wanted) > MAX_GROUPS_PER_ENI:
        raise ec2_errors.SecurityGroupsPerInterfaceLimitExceeded(MAX_GROUPS_PER_ENI)
    if not wanted:
        default = backend.get_default_security_group(subnet.vpc_id)
        return [default] if default is not None else []
    found = []
    for group_id in wanted:
        group = backend.get_security_group_from_id(group_id)
        if group is None:
            raise ec2_errors.SecurityGroupIdNotFound(group_id, subnet.vpc_id)
        if group.vpc_id != subnet.vpc_id:
            raise ec2_errors.SecurityGroupOtherNetwork(group_id, subnet.id)
        found.append(group)
    return found


def set_eni_groups(backend: Any, eni_id: str, group_ids: list[str]) -> None:
    """ModifyNetworkInterfaceAttribute ``Groups``: replace the ENI's whole set (at least one).
    Raises what ``eni_groups`` raises, SecurityGroupsRequired and the ENI's NotFound."""
    eni = backend.get_network_interface(eni_id)
    if not group_ids:
        raise ec2_errors.SecurityGroupsRequired()
    eni._group_set = eni_groups(backend, group_ids, eni.subnet)


def members(backend: Any, group_id: str) -> Iterator[Any]:
    """The ENIs (moto objects) that hold ``group_id``."""
    for eni in backend.enis.values():
        if any(g.id == group_id for g in eni._group_set):
            yield eni


def check_deletable(backend: Any, group: SecurityGroup) -> None:
    """Raise CannotDeleteDefaultGroup or GroupHasDependents when EC2 would refuse to delete
    ``group``."""
    if group.is_default:
        raise ec2_errors.CannotDeleteDefaultGroup(group.id)
    if next(members(backend, group.id), None) is not None:
        raise ec2_errors.GroupHasDependents(group.id)
    for other in all_groups(backend):
        if other is group:
            continue
        for rule in itertools.chain(other.ingress_rules, other.egress_rules):
            if (rule.source_group or {}).get("GroupId") == group.id:
                raise ec2_errors.GroupHasDependents(group.id)


def all_groups(backend: Any) -> list[SecurityGroup]:
    """Every security group of the backend, in every VPC."""
    return [g for by_id in backend.groups.values() for g in by_id.values()]


def find_group(backend: Any, name: str | None, group_id: str | None) -> SecurityGroup:
    """The group DeleteSecurityGroup names. Raises moto's InvalidGroup.NotFound."""
    group = (
        backend.get_security_group_from_id(group_id)
        if group_id
        else backend.get_security_group_from_name(name)
        if name
        else None
    )
    if group is None:
        raise InvalidSecurityGroupNotFoundError(group_id or name)
    return group  # type: ignore[no-any-return]


def authorize(backend: Any, permissions: list[dict[str, Any]], *, egress: bool) -> list[Any]:
    """Authorize every permission (moto's keyword arguments per permission, ports and protocol
    checked first) or none: a refusal takes back the rules added before it. Returns the rules
    added."""
    for kwargs in permissions:
        _normalize(kwargs)
    method = (
        backend.authorize_security_group_egress
        if egress
        else backend.authorize_security_group_ingress
    )
    added: list[Any] = []
    try:
        for kwargs in permissions:
            rules, _ = method(**kwargs)
            added += rules
    except BaseException:
        gone = {id(r) for r in added}
        for group in all_groups(backend):
            group.ingress_rules = [r for r in group.ingress_rules if id(r) not in gone]
            group.egress_rules = [r for r in group.egress_rules if id(r) not in gone]
        raise
    return added


def revoke(backend: Any, permissions: list[dict[str, Any]], *, egress: bool) -> None:
    """Revoke every permission (a protocol number matches the rule stored by name)."""
    method = (
        backend.revoke_security_group_egress if egress else backend.revoke_security_group_ingress
    )
    for kwargs in permissions:
        if not kwargs.get("security_rule_ids"):
            _normalize(kwargs)
        method(**kwargs)


def _normalize(kwargs: dict[str, Any]) -> None:
    protocol = normalize_protocol(kwargs.get("ip_protocol"))
    low, high = normalize_ports(protocol, kwargs.get("from_port"), kwargs.get("to_port"))
    kwargs["ip_protocol"] = protocol
    if protocol == "-1":
        kwargs["from_port"] = kwargs["to_port"] = None
    else:
        kwargs["from_port"], kwargs["to_port"] = low, high


# --- patches on moto's classes ---

_orig_create_group = SecurityGroupBackend.create_security_group


def _create_security_group(
    self: Any, name: str, description: str, *args: Any, **kwargs: Any
) -> Any:
    group = _orig_create_group(self, name, description, *args, **kwargs)
    if group.is_default:
        # EC2's default group: all protocols inbound from members of the group itself.
        account = self.account_id
        group.ingress_rules.append(
            SecurityGroupRule(
                self,
                "-1",
                group.id,
                None,
                None,
                None,
                source_group={"GroupId": group.id, "OwnerId": account, "UserId": account},
                is_egress=False,
            )
        )
    return group


def _modify_eni_attribute(
    self: Any,
    eni_id: str,
    group_ids: list[str],
    source_dest_check: bool | None = None,
    description: str | None = None,
) -> None:
    eni = self.get_network_interface(eni_id)
    if group_ids:
        set_eni_groups(self, eni_id, group_ids)
    if source_dest_check in (True, False):
        eni.source_dest_check = source_dest_check
    if description:
        eni.description = description


def _modify_instance_groups(self: Any, instance_id: str, group_ids: list[str]) -> Any:
    # EC2: an instance's groups are its primary ENI's.
    instance = self.get_instance(instance_id)
    set_eni_groups(self, instance.nics[0].id, list(group_ids))
    return instance


def _eni_group_set(self: NetworkInterface) -> list[SecurityGroup]:
    return list(self._group_set)


def _instance_groups(self: Instance) -> list[SecurityGroup]:
    primary = (self.__dict__.get("nics") or {}).get(0)
    if primary is not None:
        return list(primary._group_set)
    return list(self.__dict__.get("_podwire_launch_groups", []))


def _set_instance_groups(self: Instance, groups: list[SecurityGroup]) -> None:
    # Only RunInstances sets this, before the primary ENI exists (it is made with these).
    self.__dict__["_podwire_launch_groups"] = list(groups)


def apply() -> None:
    """Install the patches into moto's classes (idempotent: guarded by ``actions.apply``)."""
    SecurityGroupBackend.create_security_group = _create_security_group  # type: ignore[method-assign]
    NetworkInterfaceBackend.modify_network_interface_attribute = _modify_eni_attribute  # type: ignore[method-assign]
    InstanceBackend.modify_instance_security_groups = _modify_instance_groups  # type: ignore[assignment]
    NetworkInterface.group_set = property(_eni_group_set)  # type: ignore[assignment]
    Instance.security_groups = property(_instance_groups, _set_instance_groups)  # type: ignore[assignment]
