"""Names of the kernel objects podwire makes."""

from __future__ import annotations

import hashlib

HOST_VETH_PREFIX = "pwv"
# Strict-mode pods (security groups, netlink.vlan) get their own prefix, as Amazon VPC CNI's
# "vlan" veths: SNAT's connmark rules match "pwv*" only, so these pods are never marked.
STRICT_VETH_PREFIX = "pws"
HOST_VETH_PREFIXES = (HOST_VETH_PREFIX, STRICT_VETH_PREFIX)


def host_veth_name(network: str, container_id: str, ifname: str, *, strict: bool = False) -> str:
    """Return the host-side veth name of one attachment: the prefix and 12 hex digits of a hash.

    15 bytes, the longest name the kernel accepts (IFNAMSIZ - 1), and the same for the same
    attachment key on every call, so DEL and GC can find the link without state.
    """
    key = f"{network}/{container_id}/{ifname}".encode()
    prefix = STRICT_VETH_PREFIX if strict else HOST_VETH_PREFIX
    return prefix + hashlib.sha256(key).hexdigest()[:12]


def host_veth_names(network: str, container_id: str, ifname: str) -> tuple[str, ...]:
    """Every name the attachment's host veth may have (ordinary, strict)."""
    return tuple(host_veth_name(network, container_id, ifname, strict=s) for s in (False, True))
