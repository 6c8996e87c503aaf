"""The pod annotations that ask for security groups, parsed: pure functions, no I/O.

Two annotations count (first match wins, see ``agent.sg.policy.decide``):

* ``vpc.amazonaws.com/pod-eni``, written by EKS's VPC resource controller once it has made and
  associated the pod's branch ENI: a JSON list of branch details, of which only element 0 is
  used (as Amazon VPC CNI does). The controller's Go struct tags the VLAN ``vlanId`` while the
  CNI's reads ``vlanID`` (Go's JSON decoding ignores case); both spellings are accepted here.
* ``podwire.io/security-groups``: ``sg-…,sg-…``, 1 to 5 group ids: the agent makes the branch.

A bad value raises AnnotationError naming the annotation and the reason; nothing is guessed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Final

import attrs

POD_ENI: Final = "vpc.amazonaws.com/pod-eni"
SECURITY_GROUPS: Final = "podwire.io/security-groups"
ANNOTATIONS: Final = (POD_ENI, SECURITY_GROUPS)

MAX_GROUPS_PER_ANNOTATION: Final = 5
VLAN_IDS: Final = range(1, 4095)

_GROUP_ID = re.compile(r"^sg-[0-9a-f]{8,17}$")
_ENI_ID = re.compile(r"^eni-[0-9a-f]{8,17}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class AnnotationError(ValueError):
    """A security-group annotation of the pod cannot be used as it is."""

    def __init__(self, annotation: str, reason: str) -> None:
        super().__init__(f"annotation {annotation}: {reason}")
        self.annotation = annotation
        self.reason = reason


@attrs.frozen(kw_only=True)
class PodEni:
    """Element 0 of ``vpc.amazonaws.com/pod-eni``: a branch ENI someone else made and
    associated with this node's trunk."""

    eni_id: str
    mac: str  # lower case
    ip: IPv4Address
    vlan: int
    subnet_cidr: IPv4Network
    association_id: str = ""

    @property
    def gateway(self) -> IPv4Address:
        """The VPC router in the branch's subnet: the subnet's base address + 1."""
        return self.subnet_cidr.network_address + 1


def parse_pod_eni(text: str) -> PodEni:
    """Parse ``vpc.amazonaws.com/pod-eni``; raises AnnotationError."""

    def bad(reason: str) -> AnnotationError:
        return AnnotationError(POD_ENI, reason)

    try:
        doc = json.loads(text)
    except ValueError as e:
        raise bad(f"not JSON: {e}") from None
    if not isinstance(doc, list) or not doc:
        raise bad("expected a non-empty JSON list of branch ENIs")
    first = doc[0]
    if not isinstance(first, dict):
        raise bad("element 0 is not an object")
    eni_id = _string(first, "eniId", bad)
    if not _ENI_ID.match(eni_id):
        raise bad(f"eniId {eni_id!r} is not an ENI id")
    mac = _string(first, "ifAddress", bad).lower()
    if not _MAC.match(mac):
        raise bad(f"ifAddress {mac!r} is not a MAC address")
    try:
        ip = IPv4Address(_string(first, "privateIp", bad))
    except ValueError as e:
        raise bad(f"privateIp: {e}") from None
    if ip.is_unspecified:
        raise bad("privateIp is 0.0.0.0")
    vlan = first.get("vlanId", first.get("vlanID"))
    if isinstance(vlan, bool) or not isinstance(vlan, int):
        raise bad("vlanId (or vlanID) must be an integer")
    if vlan not in VLAN_IDS:
        raise bad(f"vlanId {vlan} is outside 1..4094")
    try:
        subnet = IPv4Network(_string(first, "subnetCidr", bad), strict=False)
    except ValueError as e:
        raise bad(f"subnetCidr: {e}") from None
    if ip not in subnet:
        raise bad(f"privateIp {ip} is not in subnetCidr {subnet}")
    association = first.get("associationID", first.get("associationId", ""))
    if not isinstance(association, str):
        raise bad("associationID must be a string")
    return PodEni(
        eni_id=eni_id, mac=mac, ip=ip, vlan=vlan, subnet_cidr=subnet, association_id=association
    )


def _string(doc: Mapping[str, Any], key: str, bad: Any) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise bad(f"element 0 has no {key}")
    return value


def parse_group_ids(
    text: str, *, annotation: str = SECURITY_GROUPS, limit: int = MAX_GROUPS_PER_ANNOTATION
) -> tuple[str, ...]:
    """Parse ``sg-a,sg-b`` into 1..``limit`` group ids, duplicates dropped, order kept.

    Blanks around ids and empty items (a trailing comma) are ignored. Raises AnnotationError.
    """
    ids: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not _GROUP_ID.match(item):
            raise AnnotationError(annotation, f"{item!r} is not a security group id (sg-…)")
        if item not in ids:
            ids.append(item)
    if not ids:
        raise AnnotationError(annotation, "no security group ids")
    if len(ids) > limit:
        raise AnnotationError(annotation, f"{len(ids)} security groups; at most {limit}")
    return tuple(ids)


def is_group_id(text: str) -> bool:
    """Whether ``text`` looks like a security group id."""
    return bool(_GROUP_ID.match(text))
