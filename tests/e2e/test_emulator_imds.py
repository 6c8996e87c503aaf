"""IMDSv2 of the simulated nodes, read from the same state as the EC2 API (no root needed:
each node's IMDS is also served on the machine's loopback)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from cloud.emulator import Node, Vpc
from tests.e2e.conftest import ec2_client


def token(base: str, ttl: int = 60) -> str:
    request = urllib.request.Request(
        f"{base}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)},
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        return reply.read().decode()  # type: ignore[no-any-return]


def get(base: str, path: str, tok: str | None) -> str:
    headers = {"X-aws-ec2-metadata-token": tok} if tok else {}
    request = urllib.request.Request(f"{base}/latest/meta-data/{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as reply:
        return reply.read().decode()  # type: ignore[no-any-return]


def status_of(base: str, path: str, tok: str | None) -> int:
    try:
        get(base, path, tok)
    except urllib.error.HTTPError as e:
        return e.code
    return 200


@pytest.fixture
def node(cloud: Vpc) -> Node:
    return cloud.add_node("m5.large", cloud.add_subnet("10.0.1.0/24", "us-east-1b"))


def test_token_is_required(node: Node) -> None:
    base = node.imds_local_url
    assert status_of(base, "instance-id", None) == 401
    assert status_of(base, "instance-id", "not-a-token") == 401
    request = urllib.request.Request(f"{base}/latest/api/token", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as missing_ttl:
        urllib.request.urlopen(request, timeout=5)
    assert missing_ttl.value.code == 400
    assert get(base, "instance-id", token(base)) == node.instance_id


def test_tokens_are_bound_to_their_node(cloud: Vpc, node: Node) -> None:
    other = cloud.add_node("m5.large", node.subnet)
    assert status_of(other.imds_local_url, "instance-id", token(node.imds_local_url)) == 401


def test_tokens_expire(node: Node) -> None:
    tok = token(node.imds_local_url, ttl=1)
    assert get(node.imds_local_url, "instance-id", tok) == node.instance_id
    time.sleep(1.1)
    assert status_of(node.imds_local_url, "instance-id", tok) == 401


def test_instance_facts(node: Node) -> None:
    base, tok = node.imds_local_url, token(node.imds_local_url)
    assert get(base, "instance-type", tok) == "m5.large"
    assert get(base, "placement/availability-zone", tok) == "us-east-1b"
    assert get(base, "mac", tok) == node.mac
    assert get(base, "local-ipv4", tok) == node.primary_ip
    assert "instance-id" in get(base, "", tok).splitlines()
    assert status_of(base, "no-such-thing", tok) == 404


@pytest.mark.anyio
async def test_interfaces_follow_the_ec2_state(cloud: Vpc, node: Node) -> None:
    base, tok = node.imds_local_url, token(node.imds_local_url)
    async with ec2_client(cloud) as ec2:
        await ec2.assign_private_ip_addresses(
            NetworkInterfaceId=node.eni_id, SecondaryPrivateIpAddressCount=2
        )
        created = await ec2.create_network_interface(SubnetId=node.subnet.id, Ipv4PrefixCount=1)
        second = created["NetworkInterface"]
        await ec2.attach_network_interface(
            NetworkInterfaceId=second["NetworkInterfaceId"],
            InstanceId=node.instance_id,
            DeviceIndex=1,
        )
        described = await ec2.describe_network_interfaces(NetworkInterfaceIds=[node.eni_id])
    primary: dict[str, Any] = described["NetworkInterfaces"][0]

    assert sorted(get(base, "network/interfaces/macs/", tok).splitlines()) == sorted(
        [f"{node.mac}/", f"{second['MacAddress']}/"]
    )
    mac = f"network/interfaces/macs/{node.mac}"
    assert get(base, f"{mac}/device-number", tok) == "0"
    assert get(base, f"{mac}/interface-id", tok) == node.eni_id
    assert get(base, f"{mac}/local-ipv4s", tok).splitlines() == [
        a["PrivateIpAddress"] for a in primary["PrivateIpAddresses"]
    ]
    assert get(base, f"{mac}/local-ipv4s", tok).splitlines()[0] == node.primary_ip
    assert get(base, f"{mac}/subnet-id", tok) == node.subnet.id
    assert get(base, f"{mac}/subnet-ipv4-cidr-block", tok) == "10.0.1.0/24"
    assert get(base, f"{mac}/security-group-ids", tok).splitlines() == [
        g["GroupId"] for g in primary["Groups"]
    ]
    assert get(base, f"{mac}/vpc-id", tok) == cloud.vpc_id
    assert get(base, f"{mac}/vpc-ipv4-cidr-blocks", tok) == "10.0.0.0/16"
    assert status_of(base, f"{mac}/ipv4-prefix", tok) == 404

    other = f"network/interfaces/macs/{second['MacAddress']}"
    assert get(base, f"{other}/device-number", tok) == "1"
    assert get(base, f"{other}/ipv4-prefix", tok) == second["Ipv4Prefixes"][0]["Ipv4Prefix"]
