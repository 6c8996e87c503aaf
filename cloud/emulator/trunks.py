"""Trunk and branch ENIs: EC2's trunk-interface associations, which moto lacks entirely.

Theory of operation: a trunk is an ENI created with ``InterfaceType=trunk`` and attached to an
instance whose type supports trunking (``branch_limits``); a branch is an ordinary, unattached
ENI that ``AssociateTrunkInterface`` ties to one VLAN id of one trunk. While associated the
branch reports interface type ``branch`` and status ``associated`` (it has no attachment) and
its frames travel over the trunk's cable tagged with that VLAN id (``wiring``). The table of
associations lives beside moto's backend (``backend_state``), indexed by branch and by trunk;
detaching or deleting the trunk, terminating its instance or deleting the branch drops the
associations it takes part in. Every refusal is ``InvalidParameterValue`` (EC2 documents no
codes for these; see ../shared/SG-FOR-PODS.md §3.1), unknown ids their NotFound codes.
"""

from __future__ import annotations

import base64
import fnmatch
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from cloud.emulator import branch_limits, ec2_errors
from cloud.emulator.backend_state import extras, is_attaching
from cloud.emulator.trunk_table import TrunkAssociation, TrunkRequest, TrunkTable

VLAN_IDS = range(1, 4095)
MAX_RESULTS = range(5, 256)


def table(backend: Any) -> TrunkTable:
    """The association table of a moto EC2 backend."""
    return extras(backend).trunks


def associate(
    backend: Any,
    *,
    branch_id: str,
    trunk_id: str,
    vlan_id: int | None,
    gre_key: int | None = None,
    client_token: str | None = None,
) -> TrunkAssociation:
    """AssociateTrunkInterface: return the new association (or the one ``client_token`` made
    before with the same parameters).

    Raises IdempotentParameterMismatch, the ENIs' NotFound, and InvalidParameterValue errors
    for: GRE, a VLAN id outside 1-4094 or taken on the trunk, a trunk that is not a trunk or
    not attached or on a type without trunking or at its branch limit, a branch that is
    associated already, attached, not a plain ENI, or in another subnet or AZ.
    """
    trunks = table(backend)
    request = TrunkRequest(branch_id, trunk_id, vlan_id)
    if client_token:
        seen = trunks.tokens.get(client_token)
        if seen is not None:
            if seen[0] != request:
                raise ec2_errors.IdempotentParameterMismatch(client_token)
            return seen[1]
    trunk = backend.get_network_interface(trunk_id)
    branch = backend.get_network_interface(branch_id)
    if gre_key is not None:
        raise ec2_errors.GreNotSupported()
    if vlan_id is None or vlan_id not in VLAN_IDS:
        raise ec2_errors.InvalidVlanId(vlan_id)
    if trunk.interface_type != "trunk":
        raise ec2_errors.NotATrunk(trunk_id, "trunk")
    instance = trunk.instance
    if instance is None or is_attaching(trunk):
        raise ec2_errors.TrunkNotAttached(trunk_id)
    limit = branch_limits.branch_interfaces(instance.instance_type)
    if limit == 0:
        raise ec2_errors.TrunkingNotSupported(trunk_id, instance.instance_type)
    if trunks.of_branch(branch_id) is not None:
        raise ec2_errors.BranchAlreadyAssociated(branch_id)
    if branch.interface_type != "interface" or branch_id == trunk_id:
        raise ec2_errors.BranchNotPlain(branch_id, branch.interface_type)
    if branch.instance is not None:
        raise ec2_errors.BranchAttached(branch_id)
    if branch.subnet.availability_zone != trunk.subnet.availability_zone:
        raise ec2_errors.BranchPlacementMismatch(branch_id, trunk_id, "availability zone")
    if branch.subnet.id != trunk.subnet.id:
        raise ec2_errors.BranchPlacementMismatch(branch_id, trunk_id, "subnet")
    on_trunk = trunks.of_trunk(trunk_id)
    if any(a.vlan_id == vlan_id for a in on_trunk):
        raise ec2_errors.VlanInUse(trunk_id, vlan_id)
    if len(on_trunk) >= limit:
        raise ec2_errors.BranchLimitExceeded(trunk_id, instance.instance_type, limit)
    assoc = TrunkAssociation(
        association_id=f"trunk-assoc-{secrets.token_hex(9)[:17]}",
        branch_interface_id=branch_id,
        trunk_interface_id=trunk_id,
        vlan_id=vlan_id,
    )
    trunks.add(assoc)
    if client_token:
        trunks.tokens[client_token] = (request, assoc)
    return assoc


def disassociate(backend: Any, association_id: str) -> None:
    """DisassociateTrunkInterface. Raises TrunkAssociationNotFound."""
    if table(backend).remove(association_id) is None:
        raise ec2_errors.TrunkAssociationNotFound(association_id)


_FILTERS = {
    "trunk-interface-association.id": "association_id",
    "trunk-interface-association.branch-interface-id": "branch_interface_id",
    "trunk-interface-association.trunk-interface-id": "trunk_interface_id",
    "trunk-interface-association.vlan-id": "vlan_id",
    "interface-protocol": "interface_protocol",
}


def describe(
    backend: Any,
    *,
    association_ids: Iterable[str] = (),
    filters: Mapping[str, list[str]] | None = None,
    max_results: int | None = None,
    next_token: str | None = None,
) -> tuple[list[TrunkAssociation], str | None]:
    """DescribeTrunkInterfaceAssociations: return one page of the associations asked for and
    the token of the next page (None on the last).

    Filters (any value matching, ``*``/``?`` allowed): ``trunk-interface-association.``
    ``trunk-interface-id``, ``branch-interface-id``, ``id``, ``vlan-id``, and
    ``interface-protocol``; ``gre-key`` matches nothing (no GRE here). Raises
    TrunkAssociationNotFound, InvalidFilter, InvalidMaxResults and InvalidNextToken.
    """
    trunks = table(backend)
    ids = list(association_ids)
    for assoc_id in ids:
        if assoc_id not in trunks.by_id:
            raise ec2_errors.TrunkAssociationNotFound(assoc_id)
    found = [trunks.by_id[i] for i in ids] if ids else list(trunks.by_id.values())
    for name, patterns in (filters or {}).items():
        if name == "gre-key":
            found = []
            continue
        field = _FILTERS.get(name)
        if field is None:
            raise ec2_errors.InvalidFilter(name)
        found = [
            a
            for a in found
            if any(fnmatch.fnmatchcase(str(getattr(a, field)), p) for p in patterns)
        ]
    start = _decode_token(next_token) if next_token else 0
    if max_results is None:
        return found[start:], None
    if max_results not in MAX_RESULTS:
        raise ec2_errors.InvalidMaxResults(max_results, MAX_RESULTS.start, MAX_RESULTS.stop - 1)
    end = start + max_results
    return found[start:end], _encode_token(end) if end < len(found) else None


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"podwire:{offset}".encode()).decode()


def _decode_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        tag, _, offset = text.partition(":")
        if tag != "podwire":
            raise ValueError(token)
        return int(offset)
    except ValueError:
        raise ec2_errors.InvalidNextToken(token) from None


# --- how a branch reports itself (patched onto moto's NetworkInterface) ---


def _interface_type(self: Any) -> str:
    if table(self.ec2_backend).of_branch(self.id) is not None:
        return "branch"
    return str(self.__dict__.get("_podwire_type", "interface"))


def _set_interface_type(self: Any, value: str) -> None:
    self.__dict__["_podwire_type"] = value


def _status(self: Any) -> str:
    if table(self.ec2_backend).of_branch(self.id) is not None:
        return "associated"
    return str(self.__dict__.get("_podwire_status", "available"))


def _set_status(self: Any, value: str) -> None:
    self.__dict__["_podwire_status"] = value


def apply() -> None:
    """Make moto's ENIs report ``branch``/``associated`` while associated."""
    from moto.ec2.models.elastic_network_interfaces import NetworkInterface

    NetworkInterface.interface_type = property(_interface_type, _set_interface_type)  # type: ignore[assignment]
    NetworkInterface.status = property(_status, _set_status)  # type: ignore[assignment]
