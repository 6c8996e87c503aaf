"""Security groups with EC2's semantics, each rule and error through aiobotocore over HTTP.

No root needed: the ``cloud`` fixture runs the EC2 API without the namespace fabric. What the
groups do to packets is in ``test_emulator_enforcement``.
"""

from __future__ import annotations

import re
import urllib.request
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cloud.emulator import Vpc

pytestmark = pytest.mark.anyio


def raises(code: str) -> Any:
    return pytest.raises(ClientError, match=rf"\({re.escape(code)}\)")


async def new_group(ec2: Any, vpc_id: str, name: str) -> str:
    reply = await ec2.create_security_group(GroupName=name, Description=name, VpcId=vpc_id)
    return reply["GroupId"]  # type: ignore[no-any-return]


async def eni_groups(ec2: Any, eni_id: str) -> list[str]:
    reply = await ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])
    return [g["GroupId"] for g in reply["NetworkInterfaces"][0]["Groups"]]


async def rules_of(ec2: Any, group_id: str) -> list[dict[str, Any]]:
    reply = await ec2.describe_security_group_rules(
        Filters=[{"Name": "group-id", "Values": [group_id]}]
    )
    return reply["SecurityGroupRules"]  # type: ignore[no-any-return]


async def default_group(ec2: Any, vpc_id: str) -> str:
    reply = await ec2.describe_security_groups(
        Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "group-name", "Values": ["default"]},
        ]
    )
    return reply["SecurityGroups"][0]["GroupId"]  # type: ignore[no-any-return]


async def test_default_group_allows_all_in_from_itself_and_all_out(cloud: Vpc, ec2: Any) -> None:
    default = await default_group(ec2, cloud.vpc_id)
    rules = await rules_of(ec2, default)
    inbound = [r for r in rules if not r["IsEgress"]]
    outbound = [r for r in rules if r["IsEgress"]]
    assert [(r["IpProtocol"], r["ReferencedGroupInfo"]["GroupId"]) for r in inbound] == [
        ("-1", default)
    ]
    assert [(r["IpProtocol"], r["CidrIpv4"]) for r in outbound] == [("-1", "0.0.0.0/0")]
    assert all(r["SecurityGroupRuleId"].startswith("sgr-") for r in rules)
    described = (await ec2.describe_security_groups(GroupIds=[default]))["SecurityGroups"][0]
    assert described["IpPermissions"][0]["UserIdGroupPairs"][0]["GroupId"] == default


async def test_new_group_has_no_inbound_rule_and_allows_all_out(cloud: Vpc, ec2: Any) -> None:
    group = await new_group(ec2, cloud.vpc_id, "db")
    rules = await rules_of(ec2, group)
    assert [(r["IsEgress"], r["IpProtocol"], r.get("CidrIpv4")) for r in rules] == [
        (True, "-1", "0.0.0.0/0")
    ]


async def test_an_eni_without_groups_gets_the_default_group(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    created = (await ec2.create_network_interface(SubnetId=subnet.id))["NetworkInterface"]
    assert [g["GroupId"] for g in created["Groups"]] == [await default_group(ec2, cloud.vpc_id)]


async def test_unknown_group_on_create_is_refused_and_not_created(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    before = len((await ec2.describe_security_groups())["SecurityGroups"])
    with raises("InvalidSecurityGroupID.NotFound"):
        await ec2.create_network_interface(SubnetId=subnet.id, Groups=["sg-0123456789abcdef0"])
    assert len((await ec2.describe_security_groups())["SecurityGroups"]) == before
    assert (await ec2.describe_network_interfaces())["NetworkInterfaces"] == []
    # Nothing was taken from the subnet either.
    subnets = await ec2.describe_subnets(SubnetIds=[subnet.id])
    assert subnets["Subnets"][0]["AvailableIpAddressCount"] == 251


async def test_at_most_five_groups_per_eni(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    groups = [await new_group(ec2, cloud.vpc_id, f"g{i}") for i in range(6)]
    five = (await ec2.create_network_interface(SubnetId=subnet.id, Groups=groups[:5]))[
        "NetworkInterface"
    ]
    assert [g["GroupId"] for g in five["Groups"]] == groups[:5]
    with raises("SecurityGroupsPerInterfaceLimitExceeded"):
        await ec2.create_network_interface(SubnetId=subnet.id, Groups=groups)
    with raises("SecurityGroupsPerInterfaceLimitExceeded"):
        await ec2.modify_network_interface_attribute(
            NetworkInterfaceId=five["NetworkInterfaceId"], Groups=groups
        )
    assert await eni_groups(ec2, five["NetworkInterfaceId"]) == groups[:5]
    # The same group twice counts once.
    twice = (await ec2.create_network_interface(SubnetId=subnet.id, Groups=[groups[0]] * 6))[
        "NetworkInterface"
    ]
    assert [g["GroupId"] for g in twice["Groups"]] == [groups[0]]


async def test_modify_groups_replaces_the_whole_set(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    a, b, c = [await new_group(ec2, cloud.vpc_id, n) for n in "abc"]
    created = (await ec2.create_network_interface(SubnetId=subnet.id, Groups=[a, b]))[
        "NetworkInterface"
    ]
    eni_id = created["NetworkInterfaceId"]
    await ec2.modify_network_interface_attribute(NetworkInterfaceId=eni_id, Groups=[c])
    assert await eni_groups(ec2, eni_id) == [c]
    with raises("InvalidSecurityGroupID.NotFound"):
        await ec2.modify_network_interface_attribute(
            NetworkInterfaceId=eni_id, Groups=[a, "sg-0123456789abcdef0"]
        )
    assert await eni_groups(ec2, eni_id) == [c]  # a refused change changes nothing
    found = await ec2.describe_network_interfaces(Filters=[{"Name": "group-id", "Values": [c]}])
    assert [e["NetworkInterfaceId"] for e in found["NetworkInterfaces"]] == [eni_id]


async def test_a_group_of_another_vpc_is_refused(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    other_vpc = (await ec2.create_vpc(CidrBlock="10.9.0.0/16"))["Vpc"]["VpcId"]
    elsewhere = await new_group(ec2, other_vpc, "elsewhere")
    with raises("InvalidParameter"):
        await ec2.create_network_interface(SubnetId=subnet.id, Groups=[elsewhere])


async def test_an_attached_eni_keeps_its_own_groups(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    node_group, eni_group, other = [await new_group(ec2, cloud.vpc_id, n) for n in "nxo"]
    node = cloud.add_node("m5.large", subnet, security_groups=[node_group])
    created = (await ec2.create_network_interface(SubnetId=subnet.id, Groups=[eni_group]))[
        "NetworkInterface"
    ]
    await ec2.attach_network_interface(
        NetworkInterfaceId=created["NetworkInterfaceId"], InstanceId=node.instance_id, DeviceIndex=1
    )
    assert await eni_groups(ec2, created["NetworkInterfaceId"]) == [eni_group]
    assert await eni_groups(ec2, node.eni_id) == [node_group]
    # An instance's groups are its primary ENI's, both ways.
    await ec2.modify_instance_attribute(InstanceId=node.instance_id, Groups=[other])
    assert await eni_groups(ec2, node.eni_id) == [other]
    reply = await ec2.describe_instances(InstanceIds=[node.instance_id])
    assert [g["GroupId"] for g in reply["Reservations"][0]["Instances"][0]["SecurityGroups"]] == [
        other
    ]
    assert node.security_groups == (other,)


async def test_run_instances_checks_the_groups(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    groups = [await new_group(ec2, cloud.vpc_id, f"g{i}") for i in range(6)]
    with raises("SecurityGroupsPerInterfaceLimitExceeded"):
        await ec2.run_instances(
            ImageId="ami-12c6146b",
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet.id,
            SecurityGroupIds=groups,
        )
    with raises("InvalidGroup.NotFound"):
        await ec2.run_instances(
            ImageId="ami-12c6146b",
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet.id,
            SecurityGroupIds=["sg-0123456789abcdef0"],
        )


def tcp(low: int, high: int, cidr: str = "10.0.0.0/16") -> dict[str, Any]:
    return {"IpProtocol": "tcp", "FromPort": low, "ToPort": high, "IpRanges": [{"CidrIp": cidr}]}


async def test_protocols_by_name_and_number(cloud: Vpc, ec2: Any) -> None:
    group = await new_group(ec2, cloud.vpc_id, "protocols")
    perms = [
        {"IpProtocol": "6", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
        {"IpProtocol": "UDP", "FromPort": 53, "ToPort": 53, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "1", "FromPort": 8, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "47", "IpRanges": [{"CidrIp": "10.0.0.0/16"}]},  # GRE: no ports
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]},
    ]
    reply = await ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=perms)
    assert [r["IpProtocol"] for r in reply["SecurityGroupRules"]] == [
        "tcp",
        "udp",
        "icmp",
        "47",
        "-1",
    ]
    inbound = [r for r in await rules_of(ec2, group) if not r["IsEgress"]]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in inbound] == [
        ("tcp", 22, 22),
        ("udp", 53, 53),
        ("icmp", 8, -1),
        ("47", -1, -1),
        ("-1", -1, -1),
    ]
    # Revoking by number matches the rule stored by name.
    await ec2.revoke_security_group_ingress(
        GroupId=group,
        IpPermissions=[tcp(22, 22, "10.0.0.0/8")],
    )
    assert len([r for r in await rules_of(ec2, group) if not r["IsEgress"]]) == 4


@pytest.mark.parametrize(
    "permission",
    [
        {"IpProtocol": "sctp-ish", "FromPort": 1, "ToPort": 2},
        {"IpProtocol": "256"},
        {"IpProtocol": "tcp"},  # TCP needs a port range
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 22},
        {"IpProtocol": "udp", "FromPort": 0, "ToPort": 65536},
        {"IpProtocol": "tcp", "FromPort": -1, "ToPort": -1},
        {"IpProtocol": "icmp", "FromPort": -1, "ToPort": 3},  # a code needs a type
        {"IpProtocol": "icmp", "FromPort": 256, "ToPort": -1},
    ],
)
async def test_bad_protocols_and_ports_are_refused(
    cloud: Vpc, ec2: Any, permission: dict[str, Any]
) -> None:
    group = await new_group(ec2, cloud.vpc_id, "bad")
    with raises("InvalidParameterValue"):
        await ec2.authorize_security_group_ingress(
            GroupId=group, IpPermissions=[{**permission, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
        )
    assert [r for r in await rules_of(ec2, group) if not r["IsEgress"]] == []


async def test_authorize_adds_all_permissions_or_none(cloud: Vpc, ec2: Any) -> None:
    group = await new_group(ec2, cloud.vpc_id, "atomic")
    await ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[tcp(443, 443)])
    with raises("InvalidPermission.Duplicate"):
        await ec2.authorize_security_group_ingress(
            GroupId=group, IpPermissions=[tcp(80, 80), tcp(443, 443)]
        )
    with raises("InvalidGroup.NotFound"):
        await ec2.authorize_security_group_ingress(
            GroupId=group,
            IpPermissions=[
                tcp(8080, 8080),
                {
                    "IpProtocol": "tcp",
                    "FromPort": 1,
                    "ToPort": 2,
                    "UserIdGroupPairs": [{"GroupId": "sg-0123456789abcdef0"}],
                },
            ],
        )
    inbound = [r for r in await rules_of(ec2, group) if not r["IsEgress"]]
    assert [(r["FromPort"], r["ToPort"]) for r in inbound] == [(443, 443)]


async def test_revoke_of_an_absent_rule_and_the_rule_limit(cloud: Vpc, ec2: Any) -> None:
    group = await new_group(ec2, cloud.vpc_id, "limits")
    with raises("InvalidPermission.NotFound"):
        await ec2.revoke_security_group_ingress(GroupId=group, IpPermissions=[tcp(1, 1)])
    await ec2.authorize_security_group_ingress(
        GroupId=group, IpPermissions=[tcp(1000 + i, 1000 + i) for i in range(60)]
    )
    with raises("RulesPerSecurityGroupLimitExceeded"):
        await ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[tcp(1, 1)])
    # Egress counts separately (one allow-all rule so far).
    await ec2.authorize_security_group_egress(GroupId=group, IpPermissions=[tcp(1, 1)])
    rule_id = next(r for r in await rules_of(ec2, group) if r["FromPort"] == 1000)
    await ec2.revoke_security_group_ingress(
        GroupId=group, SecurityGroupRuleIds=[rule_id["SecurityGroupRuleId"]]
    )
    assert len([r for r in await rules_of(ec2, group) if not r["IsEgress"]]) == 59


async def test_delete_refuses_the_default_and_groups_in_use(cloud: Vpc, ec2: Any) -> None:
    subnet = cloud.add_subnet("10.0.1.0/24")
    default = await default_group(ec2, cloud.vpc_id)
    used, referenced, referrer, free = [await new_group(ec2, cloud.vpc_id, n) for n in "urfx"]
    await ec2.create_network_interface(SubnetId=subnet.id, Groups=[used])
    await ec2.authorize_security_group_ingress(
        GroupId=referrer,
        IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": referenced}]}],
    )
    with raises("CannotDelete"):
        await ec2.delete_security_group(GroupId=default)
    with raises("DependencyViolation"):
        await ec2.delete_security_group(GroupId=used)
    with raises("DependencyViolation"):
        await ec2.delete_security_group(GroupId=referenced)
    await ec2.delete_security_group(GroupId=free)
    await ec2.delete_security_group(GroupId=referrer)  # referencing others is no dependency
    await ec2.delete_security_group(GroupId=referenced)  # and now nothing refers to it
    with raises("InvalidGroup.NotFound"):
        await ec2.delete_security_group(GroupId=free)


def imds_lines(base: str, path: str) -> list[str]:
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
        return reply.read().decode().splitlines()  # type: ignore[no-any-return]


async def test_imds_follows_a_groups_change(cloud: Vpc, ec2: Any) -> None:
    node = cloud.add_node("m5.large", cloud.add_subnet("10.0.1.0/24"))
    new = await new_group(ec2, cloud.vpc_id, "new")
    path = f"network/interfaces/macs/{node.mac}/security-group-ids"
    assert imds_lines(node.imds_local_url, path) == [await default_group(ec2, cloud.vpc_id)]
    await ec2.modify_network_interface_attribute(NetworkInterfaceId=node.eni_id, Groups=[new])
    assert imds_lines(node.imds_local_url, path) == [new]


async def test_faults_reach_the_security_group_actions(cloud: Vpc, ec2: Any) -> None:
    group = await new_group(ec2, cloud.vpc_id, "faulty")
    cloud.faults.throttle("AuthorizeSecurityGroupIngress", 1)
    with raises("RequestLimitExceeded"):
        await ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[tcp(1, 1)])
    cloud.faults.error("RevokeSecurityGroupIngress", 1, status=503)
    await ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[tcp(1, 1)])
    with raises("Unavailable"):
        await ec2.revoke_security_group_ingress(GroupId=group, IpPermissions=[tcp(1, 1)])
    cloud.faults.error("ModifyNetworkInterfaceAttribute", 1, status=500)
    with raises("InternalError"):
        await ec2.modify_network_interface_attribute(NetworkInterfaceId="eni-x", Groups=[group])
    # The faulted calls changed nothing: the rule is still there.
    assert len([r for r in await rules_of(ec2, group) if not r["IsEgress"]]) == 1
