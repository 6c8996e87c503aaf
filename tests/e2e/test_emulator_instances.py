"""Plain instances (``vpc.add_instance``): one ENI with its groups, its own namespace, TCP and
UDP listeners a test can reach; from Python and over the control endpoint."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from cloud.emulator import Vpc
from tests.e2e.conftest import ec2_client

pytestmark = pytest.mark.root


def control(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def tcp_ask(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(b"hello\n")
        return conn.makefile("rb").readline().decode().strip()


def udp_ask(host: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(b"?", (host, port))
        return s.recv(512).decode().strip()


@pytest.mark.anyio
async def test_an_instance_with_groups_serves_tcp_and_udp(vpc: Vpc) -> None:
    subnet = vpc.add_subnet("10.0.1.0/24")
    async with ec2_client(vpc) as ec2:
        db = (await ec2.create_security_group(GroupName="db", Description="db", VpcId=vpc.vpc_id))[
            "GroupId"
        ]
        default = (
            await ec2.describe_security_groups(
                Filters=[
                    {"Name": "group-name", "Values": ["default"]},
                    {"Name": "vpc-id", "Values": [vpc.vpc_id]},
                ]
            )
        )["SecurityGroups"][0]["GroupId"]
        # Let anything in the VPC reach the database group, so this test is about the plumbing.
        await ec2.authorize_security_group_ingress(
            GroupId=db,
            IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}],
        )
        instance = vpc.add_instance(subnet, security_groups=[db, default])
        reply = await ec2.describe_instances(InstanceIds=[instance.instance_id])
    described = reply["Reservations"][0]["Instances"][0]
    assert [g["GroupId"] for g in described["SecurityGroups"]] == [db, default]
    assert described["NetworkInterfaces"][0]["NetworkInterfaceId"] == instance.eni_id
    assert instance.security_groups == (db, default)
    eth0 = instance.run("ip", "-o", "-4", "addr", "show", "eth0").stdout
    assert f"{instance.primary_ip}/24" in eth0

    node = vpc.add_node("m5.large", subnet)
    tcp = instance.serve(5432)
    udp = instance.serve(5353, "udp")
    assert node.call(lambda: tcp_ask(instance.primary_ip, 5432)).startswith(node.primary_ip + ":")
    assert node.call(lambda: udp_ask(instance.primary_ip, 5353)).startswith(node.primary_ip + ":")
    assert (tcp.accepted, tcp.answered, udp.answered) == (1, 1, 1)

    path = instance.netns_path
    vpc.remove_instance(instance)
    assert not os.path.exists(path)
    assert vpc.instances == []


def test_instances_over_the_control_endpoint(vpc: Vpc) -> None:
    subnet = vpc.add_subnet("10.0.1.0/24")
    node = vpc.add_node("m5.large", subnet)
    made = control(vpc.control_url, "POST", "/instances", {"subnet_id": subnet.id})
    assert made["primary_ip"].startswith("10.0.1.") and made["netns"].startswith("pw-vm")
    control(vpc.control_url, "POST", f"/instances/{made['instance_id']}/serve", {"port": 7000})
    assert node.call(lambda: tcp_ask(made["primary_ip"], 7000)).startswith(node.primary_ip)
    listed = control(vpc.control_url, "GET", "")["instances"]
    assert [i["instance_id"] for i in listed] == [made["instance_id"]]
    control(vpc.control_url, "DELETE", f"/instances/{made['instance_id']}")
    assert control(vpc.control_url, "GET", "")["instances"] == []
    assert not os.path.exists(made["netns_path"])
    with pytest.raises(urllib.error.HTTPError) as missing:
        control(vpc.control_url, "DELETE", f"/instances/{made['instance_id']}")
    assert missing.value.code == 404
