"""Names of the kernel objects podwire makes."""

from __future__ import annotations

import hashlib

HOST_VETH_PREFIX = "pwv"


def host_veth_name(network: str, container_id: str, ifname: str) -> str:
    """Return the host-side veth name of one attachment: the prefix and 12 hex digits of a hash.

    15 bytes, the longest name the kernel accepts (IFNAMSIZ - 1), and the same for the same
    attachment key on every call, so DEL and GC can find the link without state.
    """
    key = f"{network}/{container_id}/{ifname}".encode()
    return HOST_VETH_PREFIX + hashlib.sha256(key).hexdigest()[:12]
