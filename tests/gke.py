"""GKE-style nodes on the emulated VPC, for the e2e tests and ``make demo-gke``.

A GKE-style node is an emulated instance whose alias IP ranges (its pod CIDRs, routed to it by
the VPC router as GCE does natively) are served by the emulated GCE metadata server; its agent
runs with the gce provider and nothing else configured. ``add_outside_hosts`` gives the
emulator's internet namespace two more addresses behind the router: an RFC 1918 one (an
on-premises network over a VPN: pods reach it with their own address) and a public one
(SNATed unless listed in ``nonMasqueradeCIDRs``).
"""

from __future__ import annotations

from typing import Any

from cloud.emulator import Vpc
from cloud.emulator.api import Node as VpcNode
from cloud.emulator.fabric import INTERNET_IP
from tests.harness import Node

INTERNET = str(INTERNET_IP.ip)  # 203.0.113.10: SNATed to the node's address
ON_PREM = "192.168.50.10"  # RFC 1918 outside the VPC: not SNATed
PARTNER = "198.51.100.10"  # public, listed in nonMasqueradeCIDRs by ``gke_agent``
PARTNER_CIDR = "198.51.100.0/24"


def add_outside_hosts(vpc: Vpc) -> None:
    """Put ON_PREM and PARTNER on the internet namespace, routed to it by the VPC router."""
    vpc.internet.ip_batch([f"addr add {ON_PREM}/32 dev eth0", f"addr add {PARTNER}/32 dev eth0"])
    vpc.router.ip_batch(
        [
            f"route add {ON_PREM}/32 via {INTERNET} dev inet",
            f"route add {PARTNER}/32 via {INTERNET} dev inet",
        ]
    )


def gke_agent(vnode: VpcNode, tag: str, *, start: bool = True, **gce: Any) -> Node:
    """The agent with the gce provider on ``vnode`` (PARTNER_CIDR not masqueraded)."""
    settings: dict[str, Any] = {
        "metadata_url": vnode.gce_metadata_url,
        "nonMasqueradeCIDRs": [PARTNER_CIDR],
        "retry_base": 0.2,
        "retry_cap": 1.0,
        **gce,
    }
    node = Node(
        netns=vnode.netns,
        primary_ip=vnode.primary_ip,
        gce=settings,
        cooldown=0.0,
        tag=tag,
        extra_config="[snat]\nverify_interval = 3600\n",
    )
    if start:
        try:
            node.start()
        except BaseException:
            node.close()
            raise
    return node
