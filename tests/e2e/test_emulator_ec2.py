"""The EC2 rules the emulator enforces on top of moto, each through aiobotocore over HTTP.

These need no root: the ``cloud`` fixture runs the EC2 API without the namespace fabric.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cloud.emulator import Vpc

pytestmark = pytest.mark.anyio


def raises(code: str) -> Any:
    return pytest.raises(ClientError, match=rf"\({re.escape(code)}\)")


async def new_eni(ec2: Any, subnet_id: str, **kwargs: Any) -> dict[str, Any]:
    reply = await ec2.create_network_interface(SubnetId=subnet_id, **kwargs)
    return reply["NetworkInterface"]  # type: ignore[no-any-return]


async def eni(ec2: Any, eni_id: str) -> dict[str, Any]:
    reply = await ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])
    return reply["NetworkInterfaces"][0]  # type: ignore[no-any-return]


async def attach(ec2: Any, eni_id: str, instance_id: str, index: int) -> str:
    reply = await ec2.attach_network_interface(
        NetworkInterfaceId=eni_id, InstanceId=instance_id, DeviceIndex=index
    )
    return reply["AttachmentId"]  # type: ignore[no-any-return]


async def test_enis_per_instance_type_are_limited(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    node = cloud.add_node("t3.medium", subnet)  # 3 ENIs
    for index in (1, 2):
        await attach(
            ec2, (await new_eni(ec2, subnet.id))["NetworkInterfaceId"], node.instance_id, index
        )
    extra = await new_eni(ec2, subnet.id)
    with raises("AttachmentLimitExceeded"):
        await attach(ec2, extra["NetworkInterfaceId"], node.instance_id, 3)


async def test_ips_per_eni_are_limited_and_prefixes_share_the_slots(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    node = cloud.add_node("t3.medium", subnet)  # 6 IPv4 slots per ENI
    primary = node.eni_id
    await ec2.assign_private_ip_addresses(
        NetworkInterfaceId=primary, SecondaryPrivateIpAddressCount=4
    )
    await ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4PrefixCount=1)
    with raises("PrivateIpAddressLimitExceeded"):
        await ec2.assign_private_ip_addresses(
            NetworkInterfaceId=primary, SecondaryPrivateIpAddressCount=1
        )
    with raises("PrivateIpAddressLimitExceeded"):
        await ec2.assign_private_ip_addresses(NetworkInterfaceId=primary, Ipv4PrefixCount=1)
    # An unattached ENI holding more than the type allows cannot be attached either.
    big = await new_eni(ec2, subnet.id, SecondaryPrivateIpAddressCount=6)
    with raises("PrivateIpAddressLimitExceeded"):
        await attach(ec2, big["NetworkInterfaceId"], node.instance_id, 1)


async def test_device_index_in_use_is_refused(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    node = cloud.add_node("m5.large", subnet)
    await attach(ec2, (await new_eni(ec2, subnet.id))["NetworkInterfaceId"], node.instance_id, 1)
    other = await new_eni(ec2, subnet.id)
    with raises("InvalidParameterValue"):
        await attach(ec2, other["NetworkInterfaceId"], node.instance_id, 1)
    with raises("InvalidParameterValue"):
        await attach(ec2, other["NetworkInterfaceId"], node.instance_id, 0)


async def test_attached_eni_cannot_be_attached_again(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    a, b = cloud.add_node("m5.large", subnet), cloud.add_node("m5.large", subnet)
    created = await new_eni(ec2, subnet.id)
    await attach(ec2, created["NetworkInterfaceId"], a.instance_id, 1)
    with raises("InvalidNetworkInterface.InUse"):
        await attach(ec2, created["NetworkInterfaceId"], b.instance_id, 1)


async def test_eni_and_instance_must_share_the_availability_zone(cloud: Vpc, ec2: Any) -> None:
    here = cloud.add_subnet("10.0.1.0/24", "us-east-1a")
    there = cloud.add_subnet("10.0.2.0/24", "us-east-1b")
    node = cloud.add_node("m5.large", here)
    created = await new_eni(ec2, there.id)
    with raises("InvalidParameterCombination"):
        await attach(ec2, created["NetworkInterfaceId"], node.instance_id, 1)


async def test_allocator_never_collides_nor_hands_out_reserved_addresses(
    cloud: Vpc, ec2: Any
) -> None:
    subnet = cloud.add_subnet("10.0.1.0/28")  # 16 - 5 reserved = 11 usable
    cloud.add_node("m5.large", subnet)  # the primary ENI takes one
    first = await new_eni(ec2, subnet.id, SecondaryPrivateIpAddressCount=4)
    second = await new_eni(ec2, subnet.id)
    await ec2.assign_private_ip_addresses(
        NetworkInterfaceId=second["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=4
    )
    reply = await ec2.describe_network_interfaces()
    taken = [
        a["PrivateIpAddress"] for e in reply["NetworkInterfaces"] for a in e["PrivateIpAddresses"]
    ]
    net = ipaddress.ip_network("10.0.1.0/28")
    usable = {str(net.network_address + i) for i in range(4, 15)}
    assert len(taken) == len(set(taken)) == 11
    assert set(taken) == usable
    subnets = await ec2.describe_subnets(SubnetIds=[subnet.id])
    assert subnets["Subnets"][0]["AvailableIpAddressCount"] == 0
    with raises("InsufficientFreeAddressesInSubnet"):
        await ec2.assign_private_ip_addresses(
            NetworkInterfaceId=first["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=1
        )
    with raises("InsufficientFreeAddressesInSubnet"):
        await new_eni(ec2, subnet.id)


async def test_a_count_larger_than_the_subnet_fails_instead_of_hanging(
    cloud: Vpc, ec2: Any
) -> None:
    subnet = cloud.add_subnet("10.0.1.0/28")
    with raises("InsufficientFreeAddressesInSubnet"):
        await new_eni(ec2, subnet.id, SecondaryPrivateIpAddressCount=500)
    # All-or-nothing: the failed request took nothing.
    subnets = await ec2.describe_subnets(SubnetIds=[subnet.id])
    assert subnets["Subnets"][0]["AvailableIpAddressCount"] == 11


async def test_delete_while_attached_is_refused_and_delete_frees_addresses(
    cloud: Vpc, ec2: Any
) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    node = cloud.add_node("m5.large", subnet)
    created = await new_eni(ec2, subnet.id, SecondaryPrivateIpAddressCount=3)
    eni_id = created["NetworkInterfaceId"]
    attachment = await attach(ec2, eni_id, node.instance_id, 1)
    with raises("InvalidNetworkInterface.InUse"):
        await ec2.delete_network_interface(NetworkInterfaceId=eni_id)
    await ec2.detach_network_interface(AttachmentId=attachment)
    before = (await ec2.describe_subnets(SubnetIds=[subnet.id]))["Subnets"][0]
    await ec2.delete_network_interface(NetworkInterfaceId=eni_id)
    after = (await ec2.describe_subnets(SubnetIds=[subnet.id]))["Subnets"][0]
    assert after["AvailableIpAddressCount"] == before["AvailableIpAddressCount"] + 4


async def test_primary_eni_cannot_be_detached(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    node = cloud.add_node("m5.large", subnet)
    reply = await ec2.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": [node.instance_id]}]
    )
    attachment = reply["NetworkInterfaces"][0]["Attachment"]["AttachmentId"]
    with raises("OperationNotPermitted"):
        await ec2.detach_network_interface(AttachmentId=attachment)


async def test_unassign_refuses_addresses_the_eni_does_not_hold(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    mine = await new_eni(ec2, subnet.id, SecondaryPrivateIpAddressCount=1)
    other = await new_eni(ec2, subnet.id, SecondaryPrivateIpAddressCount=1)
    mine_id = mine["NetworkInterfaceId"]
    other_ip = other["PrivateIpAddresses"][1]["PrivateIpAddress"]
    with raises("InvalidParameterValue"):
        await ec2.unassign_private_ip_addresses(
            NetworkInterfaceId=mine_id, PrivateIpAddresses=[other_ip]
        )
    with raises("InvalidParameterValue"):  # the primary is not a secondary
        await ec2.unassign_private_ip_addresses(
            NetworkInterfaceId=mine_id, PrivateIpAddresses=[mine["PrivateIpAddress"]]
        )
    secondary = mine["PrivateIpAddresses"][1]["PrivateIpAddress"]
    await ec2.unassign_private_ip_addresses(
        NetworkInterfaceId=mine_id, PrivateIpAddresses=[secondary]
    )
    assert [a["PrivateIpAddress"] for a in (await eni(ec2, mine_id))["PrivateIpAddresses"]] == [
        mine["PrivateIpAddress"]
    ]
    assert [
        a["PrivateIpAddress"]
        for a in (await eni(ec2, other["NetworkInterfaceId"]))["PrivateIpAddresses"]
    ][1] == other_ip


async def test_assign_lists_only_the_new_addresses(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    created = await new_eni(ec2, subnet.id, SecondaryPrivateIpAddressCount=2)
    eni_id = created["NetworkInterfaceId"]
    old = {a["PrivateIpAddress"] for a in created["PrivateIpAddresses"]}
    reply = await ec2.assign_private_ip_addresses(
        NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=3
    )
    new = [a["PrivateIpAddress"] for a in reply["AssignedPrivateIpAddresses"]]
    assert len(new) == 3 and not old & set(new)
    explicit = str(ipaddress.ip_address(max(new)) + 10)
    reply = await ec2.assign_private_ip_addresses(
        NetworkInterfaceId=eni_id, PrivateIpAddresses=[explicit]
    )
    assert [a["PrivateIpAddress"] for a in reply["AssignedPrivateIpAddresses"]] == [explicit]
    other = await new_eni(ec2, subnet.id)
    with raises("InvalidIPAddress.InUse"):
        await ec2.assign_private_ip_addresses(
            NetworkInterfaceId=other["NetworkInterfaceId"], PrivateIpAddresses=[explicit]
        )


async def test_prefix_delegation_carves_free_28s_until_none_is_left(cloud: Vpc, ec2: Any) -> None:
    # A /26 holds four /28s: the first has .0-.3, the last the broadcast, so two are usable.
    subnet = cloud.add_subnet("10.0.1.0/26")
    created = await new_eni(ec2, subnet.id)  # takes 10.0.1.4, inside the first /28
    eni_id = created["NetworkInterfaceId"]
    reply = await ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=2)
    prefixes = [p["Ipv4Prefix"] for p in reply["AssignedIpv4Prefixes"]]
    assert prefixes == ["10.0.1.16/28", "10.0.1.32/28"]
    assert [p["Ipv4Prefix"] for p in (await eni(ec2, eni_id))["Ipv4Prefixes"]] == prefixes
    with raises("InsufficientCidrBlocks"):
        await ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=1)
    # Addresses are never handed out inside a delegated prefix.
    more = await ec2.assign_private_ip_addresses(
        NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=3
    )
    for a in more["AssignedPrivateIpAddresses"]:
        assert not any(
            ipaddress.ip_address(a["PrivateIpAddress"]) in ipaddress.ip_network(p) for p in prefixes
        )
    await ec2.unassign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4Prefixes=[prefixes[0]])
    assert [p["Ipv4Prefix"] for p in (await eni(ec2, eni_id))["Ipv4Prefixes"]] == [prefixes[1]]
    with raises("InvalidParameterValue"):
        await ec2.unassign_private_ip_addresses(
            NetworkInterfaceId=eni_id, Ipv4Prefixes=[prefixes[0]]
        )
    with_prefix = await new_eni(ec2, subnet.id, Ipv4PrefixCount=1)
    assert [p["Ipv4Prefix"] for p in with_prefix["Ipv4Prefixes"]] == [prefixes[0]]


async def test_attachment_and_secondary_ip_filters(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    node = cloud.add_node("m5.large", subnet)
    second = await new_eni(ec2, subnet.id, SecondaryPrivateIpAddressCount=1)
    free = await new_eni(ec2, subnet.id)
    await attach(ec2, second["NetworkInterfaceId"], node.instance_id, 1)

    async def ids(*filters: tuple[str, list[str]]) -> list[str]:
        reply = await ec2.describe_network_interfaces(
            Filters=[{"Name": n, "Values": v} for n, v in filters]
        )
        return sorted(e["NetworkInterfaceId"] for e in reply["NetworkInterfaces"])

    assert await ids(("attachment.device-index", ["1"])) == [second["NetworkInterfaceId"]]
    attached = await ids(
        ("attachment.status", ["attached"]), ("attachment.instance-id", [node.instance_id])
    )
    assert len(attached) == 2 and free["NetworkInterfaceId"] not in attached
    secondary_ip = second["PrivateIpAddresses"][1]["PrivateIpAddress"]
    assert await ids(("addresses.private-ip-address", [secondary_ip])) == [
        second["NetworkInterfaceId"]
    ]
    assert await ids(("status", ["available"])) == [free["NetworkInterfaceId"]]


async def test_terminating_an_instance_detaches_its_enis(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    node = cloud.add_node("m5.large", subnet)
    kept = await new_eni(ec2, subnet.id)
    dropped = await new_eni(ec2, subnet.id)
    await attach(ec2, kept["NetworkInterfaceId"], node.instance_id, 1)
    dropped_attachment = await attach(ec2, dropped["NetworkInterfaceId"], node.instance_id, 2)
    await ec2.modify_network_interface_attribute(
        NetworkInterfaceId=dropped["NetworkInterfaceId"],
        Attachment={"AttachmentId": dropped_attachment, "DeleteOnTermination": True},
    )
    await ec2.terminate_instances(InstanceIds=[node.instance_id])
    reply = await ec2.describe_network_interfaces()
    left = {e["NetworkInterfaceId"]: e for e in reply["NetworkInterfaces"]}
    # The launch-time primary ENI and the delete-on-termination one are gone; the other is free.
    assert list(left) == [kept["NetworkInterfaceId"]]
    assert left[kept["NetworkInterfaceId"]]["Status"] == "available"
    assert "Attachment" not in left[kept["NetworkInterfaceId"]]
    instances = await ec2.describe_instances(InstanceIds=[node.instance_id])
    assert instances["Reservations"][0]["Instances"][0]["State"]["Name"] == "terminated"
