"""Trunk and branch ENIs: EC2's trunk-interface associations through aiobotocore over HTTP.

The API tests need no root (the ``cloud`` fixture has no fabric); what a trunk carries on the
wire is in ``test_emulator_vlans``.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cloud.emulator import Node, Vpc
from cloud.emulator.branch_limits import branch_interfaces, supports_trunking

pytestmark = pytest.mark.anyio


def raises(code: str) -> Any:
    return pytest.raises(ClientError, match=rf"\({re.escape(code)}\)")


async def new_eni(ec2: Any, subnet_id: str, **kwargs: Any) -> str:
    reply = await ec2.create_network_interface(SubnetId=subnet_id, **kwargs)
    return reply["NetworkInterface"]["NetworkInterfaceId"]  # type: ignore[no-any-return]


async def describe(ec2: Any, eni_id: str) -> dict[str, Any]:
    reply = await ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])
    return reply["NetworkInterfaces"][0]  # type: ignore[no-any-return]


async def attached_trunk(ec2: Any, node: Node, index: int = 1) -> str:
    trunk = await new_eni(ec2, node.subnet.id, InterfaceType="trunk")
    await ec2.attach_network_interface(
        NetworkInterfaceId=trunk, InstanceId=node.instance_id, DeviceIndex=index
    )
    return trunk


async def associate(ec2: Any, branch: str, trunk: str, vlan: int, **kwargs: Any) -> str:
    reply = await ec2.associate_trunk_interface(
        BranchInterfaceId=branch, TrunkInterfaceId=trunk, VlanId=vlan, **kwargs
    )
    return reply["InterfaceAssociation"]["AssociationId"]  # type: ignore[no-any-return]


async def associations(ec2: Any, **kwargs: Any) -> list[dict[str, Any]]:
    reply = await ec2.describe_trunk_interface_associations(**kwargs)
    return reply["InterfaceAssociations"]  # type: ignore[no-any-return]


def test_the_instance_type_table() -> None:
    rows = {
        "m5.large": 9,
        "m5.xlarge": 18,
        "m5.2xlarge": 38,
        "m5.4xlarge": 54,
        "m5.16xlarge": 107,
        "c5.large": 9,
        "c5.2xlarge": 38,
        "m6g.medium": 4,
    }
    assert {t: branch_interfaces(t) for t in rows} == rows
    for unsupported in ("t3.medium", "t3.2xlarge", "t3a.large", "i4i.large", "x9.unknown"):
        assert not supports_trunking(unsupported)


async def test_trunk_type_is_reported_and_branch_is_not_a_create_type(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    trunk = await new_eni(ec2, subnet.id, InterfaceType="trunk")
    plain = await new_eni(ec2, subnet.id)
    assert (await describe(ec2, trunk))["InterfaceType"] == "trunk"
    assert (await describe(ec2, plain))["InterfaceType"] == "interface"
    found = await ec2.describe_network_interfaces(
        Filters=[{"Name": "interface-type", "Values": ["trunk"]}]
    )
    assert [e["NetworkInterfaceId"] for e in found["NetworkInterfaces"]] == [trunk]
    with raises("InvalidParameterValue"):  # a branch is an ordinary ENI, associated later
        await new_eni(ec2, subnet.id, InterfaceType="branch")


async def test_associate_and_how_a_branch_reports_itself(cloud: Vpc, ec2: Any) -> None:
    node = cloud.add_node("m5.large", cloud.add_subnet("10.0.1.0/24"))
    trunk = await attached_trunk(ec2, node)
    branch = await new_eni(ec2, node.subnet.id, Description="aws-k8s-branch-eni")
    reply = await ec2.associate_trunk_interface(
        BranchInterfaceId=branch, TrunkInterfaceId=trunk, VlanId=1, ClientToken="tok-1"
    )
    assoc = reply["InterfaceAssociation"]
    assert assoc["AssociationId"].startswith("trunk-assoc-")
    assert (
        assoc["BranchInterfaceId"],
        assoc["TrunkInterfaceId"],
        assoc["VlanId"],
        assoc["InterfaceProtocol"],
    ) == (branch, trunk, 1, "VLAN")
    assert reply["ClientToken"] == "tok-1"
    shown = await describe(ec2, branch)
    assert (shown["InterfaceType"], shown["Status"]) == ("branch", "associated")
    assert "Attachment" not in shown
    for name, value in (("status", "associated"), ("interface-type", "branch")):
        found = await ec2.describe_network_interfaces(Filters=[{"Name": name, "Values": [value]}])
        assert [e["NetworkInterfaceId"] for e in found["NetworkInterfaces"]] == [branch]
    # An associated branch cannot be attached to an instance.
    with raises("InvalidNetworkInterface.InUse"):
        await ec2.attach_network_interface(
            NetworkInterfaceId=branch, InstanceId=node.instance_id, DeviceIndex=2
        )

    await ec2.disassociate_trunk_interface(AssociationId=assoc["AssociationId"])
    shown = await describe(ec2, branch)
    assert (shown["InterfaceType"], shown["Status"]) == ("interface", "available")
    with raises("InvalidAssociationID.NotFound"):
        await ec2.disassociate_trunk_interface(AssociationId=assoc["AssociationId"])


async def test_client_token_makes_associate_idempotent(cloud: Vpc, ec2: Any) -> None:
    node = cloud.add_node("m5.large", cloud.add_subnet("10.0.1.0/24"))
    trunk = await attached_trunk(ec2, node)
    branch, other = await new_eni(ec2, node.subnet.id), await new_eni(ec2, node.subnet.id)
    first = await associate(ec2, branch, trunk, 5, ClientToken="same")
    again = await associate(ec2, branch, trunk, 5, ClientToken="same")
    assert first == again
    assert [a["AssociationId"] for a in await associations(ec2)] == [first]
    with raises("IdempotentParameterMismatch"):
        await associate(ec2, other, trunk, 6, ClientToken="same")
    # Without a token a repeat is a new request, refused as the branch is taken.
    with raises("InvalidParameterValue"):
        await associate(ec2, branch, trunk, 5)


async def test_associate_refusals(cloud: Vpc, ec2: Any) -> None:
    here = cloud.add_subnet("10.0.1.0/24", "us-east-1a")
    beside = cloud.add_subnet("10.0.2.0/24", "us-east-1a")
    far = cloud.add_subnet("10.0.3.0/24", "us-east-1b")
    node = cloud.add_node("m5.large", here)
    burstable = cloud.add_node("t3.medium", here)
    trunk = await attached_trunk(ec2, node)
    small_trunk = await attached_trunk(ec2, burstable)
    loose_trunk = await new_eni(ec2, here.id, InterfaceType="trunk")
    plain = await new_eni(ec2, here.id)
    branch = await new_eni(ec2, here.id)
    await associate(ec2, branch, trunk, 10)

    async def refused(branch_id: str, trunk_id: str, vlan: int) -> None:
        with raises("InvalidParameterValue"):
            await associate(ec2, branch_id, trunk_id, vlan)

    fresh = await new_eni(ec2, here.id)
    await refused(fresh, trunk, 0)  # VLAN ids are 1-4094
    await refused(fresh, trunk, 4095)
    await refused(fresh, trunk, 10)  # taken on this trunk
    await refused(branch, trunk, 11)  # the branch is associated already
    await refused(fresh, plain, 11)  # not a trunk
    await refused(fresh, loose_trunk, 11)  # a trunk not attached
    await refused(fresh, small_trunk, 11)  # t3 does not support trunking
    await refused(trunk, trunk, 11)  # a trunk is not a branch
    await refused(await new_eni(ec2, beside.id), trunk, 11)  # another subnet
    await refused(await new_eni(ec2, far.id), trunk, 11)  # another AZ
    await refused(node.eni_id, trunk, 11)  # attached to an instance
    with raises("InvalidNetworkInterfaceID.NotFound"):
        await associate(ec2, "eni-0123456789abcdef0", trunk, 11)
    # The same VLAN id on another trunk is fine.
    other_node = cloud.add_node("m5.large", here)
    await associate(ec2, fresh, await attached_trunk(ec2, other_node), 10)


async def test_branch_limit_of_the_instance_type(cloud: Vpc, ec2: Any) -> None:
    node = cloud.add_node("m5.large", cloud.add_subnet("10.0.1.0/24"))  # 9 branches
    trunk = await attached_trunk(ec2, node)
    for vlan in range(1, 10):
        await associate(ec2, await new_eni(ec2, node.subnet.id), trunk, vlan)
    extra = await new_eni(ec2, node.subnet.id)
    with raises("InvalidParameterValue"):
        await associate(ec2, extra, trunk, 10)
    # A freed slot can be used again.
    first = (await associations(ec2))[0]["AssociationId"]
    await ec2.disassociate_trunk_interface(AssociationId=first)
    await associate(ec2, extra, trunk, 1)


async def test_describe_by_id_filter_and_pages(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    a, b = cloud.add_node("m5.xlarge", subnet), cloud.add_node("m5.large", subnet)
    trunk_a, trunk_b = await attached_trunk(ec2, a), await attached_trunk(ec2, b)
    on_a = [await associate(ec2, await new_eni(ec2, subnet.id), trunk_a, v) for v in range(1, 13)]
    on_b = await associate(ec2, await new_eni(ec2, subnet.id), trunk_b, 1)
    by_trunk = await associations(
        ec2,
        Filters=[{"Name": "trunk-interface-association.trunk-interface-id", "Values": [trunk_b]}],
    )
    assert [x["AssociationId"] for x in by_trunk] == [on_b]
    picked = await associations(ec2, AssociationIds=[on_a[3], on_b])
    assert [x["AssociationId"] for x in picked] == [on_a[3], on_b]
    with raises("InvalidAssociationID.NotFound"):
        await associations(ec2, AssociationIds=["trunk-assoc-0123456789abcdef0"])
    with raises("InvalidParameterValue"):
        await associations(ec2, Filters=[{"Name": "no-such-filter", "Values": ["x"]}])
    pages, token = [], None
    while True:
        kwargs: dict[str, Any] = {"MaxResults": 5, **({"NextToken": token} if token else {})}
        reply = await ec2.describe_trunk_interface_associations(**kwargs)
        pages.append([x["AssociationId"] for x in reply["InterfaceAssociations"]])
        token = reply.get("NextToken")
        if not token:
            break
    assert [len(p) for p in pages] == [5, 5, 3]
    assert [a for page in pages for a in page] == [*on_a, on_b]


async def test_associations_go_with_the_trunk(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    node = cloud.add_node("m5.large", subnet)

    # Detaching the trunk drops its associations.
    trunk = await attached_trunk(ec2, node)
    branch = await new_eni(ec2, subnet.id)
    await associate(ec2, branch, trunk, 7)
    attachment = (await describe(ec2, trunk))["Attachment"]["AttachmentId"]
    await ec2.detach_network_interface(AttachmentId=attachment)
    assert await associations(ec2) == []
    assert (await describe(ec2, branch))["Status"] == "available"

    # Deleting the trunk (after a new attach and associate) drops them too.
    await ec2.attach_network_interface(
        NetworkInterfaceId=trunk, InstanceId=node.instance_id, DeviceIndex=1
    )
    await associate(ec2, branch, trunk, 7)
    attachment = (await describe(ec2, trunk))["Attachment"]["AttachmentId"]
    await ec2.detach_network_interface(AttachmentId=attachment)
    await ec2.delete_network_interface(NetworkInterfaceId=trunk)
    assert await associations(ec2) == []

    # Deleting a branch drops its own association.
    trunk = await attached_trunk(ec2, node, 2)
    await associate(ec2, branch, trunk, 7)
    kept = await associate(ec2, await new_eni(ec2, subnet.id), trunk, 8)
    await ec2.delete_network_interface(NetworkInterfaceId=branch)
    assert [a["AssociationId"] for a in await associations(ec2)] == [kept]

    # Terminating the instance drops the rest.
    await ec2.terminate_instances(InstanceIds=[node.instance_id])
    assert await associations(ec2) == []


def imds(base: str, path: str) -> str:
    put = urllib.request.Request(
        f"{base}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    with urllib.request.urlopen(put, timeout=5) as reply:
        tok = reply.read().decode()
    get = urllib.request.Request(
        f"{base}/latest/meta-data/{path}", headers={"X-aws-ec2-metadata-token": tok}
    )
    with urllib.request.urlopen(get, timeout=5) as reply:
        return reply.read().decode()  # type: ignore[no-any-return]


async def test_imds_lists_the_trunk_and_never_a_branch(cloud: Vpc, ec2: Any) -> None:
    node = cloud.add_node("m5.large", cloud.add_subnet("10.0.1.0/24"))
    trunk = await attached_trunk(ec2, node)
    branch = await new_eni(ec2, node.subnet.id)
    await associate(ec2, branch, trunk, 3)
    trunk_mac = (await describe(ec2, trunk))["MacAddress"]
    branch_mac = (await describe(ec2, branch))["MacAddress"]
    macs = imds(node.imds_local_url, "network/interfaces/macs").splitlines()
    assert sorted(macs) == sorted([f"{node.mac}/", f"{trunk_mac}/"])
    assert imds(node.imds_local_url, f"network/interfaces/macs/{trunk_mac}/interface-id") == trunk
    with pytest.raises(urllib.error.HTTPError):
        imds(node.imds_local_url, f"network/interfaces/macs/{branch_mac}/interface-id")


async def test_faults_reach_the_trunk_actions(cloud: Vpc, ec2: Any) -> None:
    node = cloud.add_node("m5.large", cloud.add_subnet("10.0.1.0/24"))
    trunk = await attached_trunk(ec2, node)
    branch = await new_eni(ec2, node.subnet.id)
    cloud.faults.throttle("AssociateTrunkInterface", 1)
    with raises("RequestLimitExceeded"):
        await associate(ec2, branch, trunk, 4, ClientToken="retry-me")
    assert await associations(ec2) == []  # a throttled call did nothing
    assoc = await associate(ec2, branch, trunk, 4, ClientToken="retry-me")
    cloud.faults.error("DescribeTrunkInterfaceAssociations", 1, status=500)
    with raises("InternalError"):
        await associations(ec2)
    cloud.faults.error("DisassociateTrunkInterface", 1, status=503)
    with raises("Unavailable"):
        await ec2.disassociate_trunk_interface(AssociationId=assoc)
    assert [a["AssociationId"] for a in await associations(ec2)] == [assoc]
