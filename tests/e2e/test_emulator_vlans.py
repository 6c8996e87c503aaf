"""Branches on the wire: a trunk ENI's cable carries 802.1Q frames; the router takes a frame
tagged with an associated branch's VLAN id and sent from that branch's MAC as the branch's
traffic, judged by the branch's groups, and answers it tagged; untagged frames are the trunk's
own, judged by the trunk's; anything else on the cable is dropped and counted.

The node side is what the agent makes: ``vlan.eth.<vid>`` on the trunk's link with the branch's
MAC (``cloud.emulator.dot1q.links``: a real VLAN device where the kernel has them, else the same
frames through eBPF), with the branch's address routed out of it by source.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from cloud.emulator import Node, Vpc
from cloud.emulator.dot1q.links import VlanLinks
from tests.e2e.conftest import ec2_client
from tests.frames import udp_probe, vlan_of_next_frame

pytestmark = [pytest.mark.root, pytest.mark.anyio]

ALLOWED_DEADLINE = 10.0
DENIED_WAIT = 1.0


@attrs.frozen
class Eni:
    id: str
    ip: str
    mac: str


@attrs.define
class Bed:
    vpc: Vpc
    ec2: Any
    node: Node
    trunk: Eni
    branches: dict[int, Eni]
    links: VlanLinks
    groups: dict[str, str]


def connects(host: str, port: int, source: str, timeout: float) -> str | None:
    """The echo of one line from ``source`` to ``host:port``; None when the connection does
    not complete in ``timeout`` (a timeout: never a reset)."""
    try:
        with socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0)
        ) as c:
            c.settimeout(ALLOWED_DEADLINE)
            c.sendall(b"hi\n")
            return c.makefile("rb").readline().decode().strip()
    except TimeoutError:
        return None


def route_from(node: Node, address: str, link: str, table: int, gateway: str) -> None:
    """What the agent's datapath does for a branch (or the trunk): the address on the node,
    its traffic out of ``link`` by a rule on the source."""
    node.run("ip", "addr", "add", f"{address}/32", "dev", link)
    node.run(
        "ip", "route", "add", "default", "via", gateway, "dev", link, "onlink", "table", str(table)
    )
    node.run("ip", "rule", "add", "from", address, "lookup", str(table), "priority", "100")


async def new_group(ec2: Any, vpc: Vpc, name: str) -> str:
    reply = await ec2.create_security_group(GroupName=name, Description=name, VpcId=vpc.vpc_id)
    return reply["GroupId"]  # type: ignore[no-any-return]


async def new_eni(ec2: Any, subnet_id: str, group: str, **kwargs: Any) -> Eni:
    e = (await ec2.create_network_interface(SubnetId=subnet_id, Groups=[group], **kwargs))[
        "NetworkInterface"
    ]
    return Eni(e["NetworkInterfaceId"], e["PrivateIpAddress"], e["MacAddress"])


def allow(group: str, port: int, peer_group: str) -> dict[str, Any]:
    return {
        "GroupId": group,
        "IpPermissions": [
            {
                "IpProtocol": "tcp",
                "FromPort": port,
                "ToPort": port,
                "UserIdGroupPairs": [{"GroupId": peer_group}],
            }
        ],
    }


@pytest.fixture
async def bed(vpc: Vpc) -> AsyncIterator[Bed]:
    """A node with a trunk ENI (eth1) and two branches on VLANs 10 and 11, each with its own
    group, their ``vlan.eth.<vid>`` links made and routed on the node."""
    subnet = vpc.add_subnet("10.0.1.0/24")
    async with ec2_client(vpc) as ec2:
        groups = {n: await new_group(ec2, vpc, n) for n in ("trunk", "a", "b", "db")}
        node = vpc.add_node("m5.large", subnet)
        # No IPv6 chatter on the new links: every frame on the trunk's cable is the test's.
        node.namespace.sysctls(  # type: ignore[union-attr]
            {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
        )
        trunk = await new_eni(ec2, subnet.id, groups["trunk"], InterfaceType="trunk")
        await ec2.attach_network_interface(
            NetworkInterfaceId=trunk.id, InstanceId=node.instance_id, DeviceIndex=1
        )
        branches = {
            10: await new_eni(ec2, subnet.id, groups["a"]),
            11: await new_eni(ec2, subnet.id, groups["b"]),
        }
        for vlan, branch in branches.items():
            await ec2.associate_trunk_interface(
                BranchInterfaceId=branch.id, TrunkInterfaceId=trunk.id, VlanId=vlan
            )
        node.run("ip", "link", "set", "eth1", "up")
        links = VlanLinks(node.namespace, "eth1")  # type: ignore[arg-type]
        for vlan, branch in branches.items():
            route_from(
                node, branch.ip, links.add(vlan, branch.mac), 100 + vlan, str(subnet.gateway)
            )
        route_from(node, trunk.ip, "eth1", 101, str(subnet.gateway))
        yield Bed(vpc, ec2, node, trunk, branches, links, groups)


async def test_two_branches_with_different_groups(bed: Bed) -> None:
    vpc, ec2, g = bed.vpc, bed.ec2, bed.groups
    await ec2.authorize_security_group_ingress(**allow(g["db"], 5432, g["a"]))
    db = vpc.add_instance(bed.node.subnet, security_groups=[g["db"]])
    db.serve(5432)
    a, b = bed.branches[10], bed.branches[11]

    seen = bed.node.call(lambda: connects(db.primary_ip, 5432, a.ip, ALLOWED_DEADLINE))
    assert seen is not None and seen.startswith(a.ip + ":")  # the branch's own address
    before = vpc.drops(db.eni_id).inbound
    assert bed.node.call(lambda: connects(db.primary_ip, 5432, b.ip, DENIED_WAIT)) is None
    assert vpc.drops(db.eni_id).inbound > before

    # The branch's groups also guard its own address: group a has no inbound rule.
    bed.node.serve(7777)
    before = vpc.drops(a.id).inbound
    assert db.call(lambda: connects(a.ip, 7777, db.primary_ip, DENIED_WAIT)) is None
    assert vpc.drops(a.id).inbound > before
    # ... until it has one.
    await ec2.authorize_security_group_ingress(**allow(g["a"], 7777, g["db"]))
    assert db.call(lambda: connects(a.ip, 7777, db.primary_ip, ALLOWED_DEADLINE)) is not None


async def test_untagged_traffic_is_the_trunks_own(bed: Bed) -> None:
    vpc, ec2, g = bed.vpc, bed.ec2, bed.groups
    await ec2.authorize_security_group_ingress(**allow(g["db"], 5432, g["a"]))
    await ec2.authorize_security_group_ingress(**allow(g["db"], 5433, g["trunk"]))
    db = vpc.add_instance(bed.node.subnet, security_groups=[g["db"]])
    db.serve(5432)
    db.serve(5433)
    trunk, a = bed.trunk, bed.branches[10]
    assert bed.node.call(lambda: connects(db.primary_ip, 5433, trunk.ip, ALLOWED_DEADLINE))
    assert bed.node.call(lambda: connects(db.primary_ip, 5432, a.ip, ALLOWED_DEADLINE))
    for source, port in ((trunk.ip, 5432), (a.ip, 5433)):
        before = vpc.drops(db.eni_id).inbound
        assert bed.node.call(lambda: connects(db.primary_ip, port, source, DENIED_WAIT)) is None  # noqa: B023
        assert vpc.drops(db.eni_id).inbound > before


async def open_db(bed: Bed) -> Any:
    await bed.ec2.authorize_security_group_ingress(
        GroupId=bed.groups["db"],
        IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}],
    )
    db = bed.vpc.add_instance(bed.node.subnet, security_groups=[bed.groups["db"]])
    db.serve(5432)
    return db


def rx_packets(vpc: Vpc, ifname: str) -> int:
    link = json.loads(vpc.router.ip_text("-s", "-j", "link", "show", "dev", ifname))[0]
    return int(link["stats64"]["rx"]["packets"])


def router_link_of(vpc: Vpc, eni_id: str) -> str:
    return vpc.state.fabric.ports()[eni_id]  # type: ignore[union-attr]


async def test_a_frame_with_an_unassociated_vlan_id_is_dropped(bed: Bed) -> None:
    vpc = bed.vpc
    db = await open_db(bed)
    # A VLAN no branch is associated with, from a spare address of the subnet.
    stray = "10.0.1.200"
    link = bed.links.add(99, "02:00:00:00:00:99")
    route_from(bed.node, stray, link, 199, str(bed.node.subnet.gateway))
    before = vpc.drops(bed.trunk.id).frames
    assert bed.node.call(lambda: connects(db.primary_ip, 5432, stray, DENIED_WAIT)) is None
    assert vpc.drops(bed.trunk.id).frames > before


async def test_a_branchs_vlan_id_from_another_mac_is_dropped(bed: Bed) -> None:
    vpc = bed.vpc
    db = await open_db(bed)
    b = bed.branches[11]
    assert bed.node.call(lambda: connects(db.primary_ip, 5432, b.ip, ALLOWED_DEADLINE))
    bed.node.run("ip", "link", "set", "vlan.eth.11", "address", "02:00:00:00:00:11")
    bed.node.run("ip", "neigh", "flush", "dev", "vlan.eth.11")
    branch_link = router_link_of(vpc, b.id)
    frames, arrived = vpc.drops(bed.trunk.id).frames, rx_packets(vpc, branch_link)
    assert bed.node.call(lambda: connects(db.primary_ip, 5432, b.ip, DENIED_WAIT)) is None
    assert vpc.drops(bed.trunk.id).frames > frames
    assert rx_packets(vpc, branch_link) == arrived  # nothing reached the router as b's


async def test_disassociated_branch_and_detached_trunk_leave_the_wire(bed: Bed) -> None:
    vpc, ec2 = bed.vpc, bed.ec2
    db = await open_db(bed)
    a = bed.branches[10]
    assert bed.node.call(lambda: connects(db.primary_ip, 5432, a.ip, ALLOWED_DEADLINE))
    found = await ec2.describe_trunk_interface_associations(
        Filters=[{"Name": "trunk-interface-association.branch-interface-id", "Values": [a.id]}]
    )
    await ec2.disassociate_trunk_interface(
        AssociationId=found["InterfaceAssociations"][0]["AssociationId"]
    )
    before = vpc.drops(bed.trunk.id).frames
    assert bed.node.call(lambda: connects(db.primary_ip, 5432, a.ip, DENIED_WAIT)) is None
    assert vpc.drops(bed.trunk.id).frames > before
    assert ".10" not in vpc.router.ip_text("-o", "link")

    reply = await ec2.describe_network_interfaces(NetworkInterfaceIds=[bed.trunk.id])
    await ec2.detach_network_interface(
        AttachmentId=reply["NetworkInterfaces"][0]["Attachment"]["AttachmentId"]
    )
    links = vpc.router.ip_text("-o", "link")
    assert ".11" not in links and "eth1" not in bed.node.run("ip", "-o", "link").stdout
    assert bed.branches[11].id not in vpc.all_drops()


async def test_frames_on_the_trunk_cable_are_802_1q_tagged(bed: Bed) -> None:
    a = bed.branches[10]
    db = bed.vpc.add_instance(bed.node.subnet)
    assert bed.node.call(lambda: vlan_of_next_frame("eth1", udp_probe(a.ip, db.primary_ip))) == 10
    assert (
        bed.node.call(lambda: vlan_of_next_frame("eth1", udp_probe(bed.trunk.ip, db.primary_ip)))
        is None
    )


def test_nothing_of_the_fabric_in_the_machines_namespace(vpc: Vpc) -> None:
    node = vpc.add_node("m5.large")
    VlanLinks(node.namespace, "eth0").add(5, "02:00:00:00:05:05")  # type: ignore[arg-type]
    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "vlan.eth." not in host_links
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "podwire_vpc" not in tables
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    assert "clsact" not in qdiscs


def control(url: str, path: str) -> Any:
    with urllib.request.urlopen(f"{url}{path}", timeout=10) as reply:
        return json.loads(reply.read())
