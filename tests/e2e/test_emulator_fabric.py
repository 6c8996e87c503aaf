"""The VPC fabric: namespaces and links that follow the EC2 state, real packets between them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest

from cloud.emulator import Node, Vpc
from tests.e2e.conftest import ec2_client

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("ping") is None, reason="needs ping (iputils-ping)"),
]


def links(netns: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "addr"], capture_output=True, text=True, check=True
    )
    return {link["ifname"]: link for link in json.loads(out.stdout)}


def ping(run: Any, address: str) -> bool:
    return run("ping", "-c", "1", "-W", "2", address, check=False).returncode == 0  # type: ignore[no-any-return]


def router_routes(vpc: Vpc) -> str:
    return vpc.router.ip_text("route")


async def new_attached_eni(vpc: Vpc, node: Node, index: int) -> tuple[str, str]:
    async with ec2_client(vpc) as ec2:
        eni = (await ec2.create_network_interface(SubnetId=node.subnet.id))["NetworkInterface"]
        await ec2.attach_network_interface(
            NetworkInterfaceId=eni["NetworkInterfaceId"],
            InstanceId=node.instance_id,
            DeviceIndex=index,
        )
    return eni["NetworkInterfaceId"], eni["MacAddress"]


def test_node_eth0_is_its_primary_eni_and_reaches_the_vpc(vpc: Vpc) -> None:
    a_subnet = vpc.add_subnet("10.0.1.0/24")
    b_subnet = vpc.add_subnet("10.0.2.0/24")
    a, b, c = (
        vpc.add_node("m5.large", a_subnet),
        vpc.add_node("m5.large", a_subnet),
        vpc.add_node("t3.medium", b_subnet),
    )
    eth0 = links(a.netns)["eth0"]
    assert eth0["address"] == a.mac
    assert [(i["local"], i["prefixlen"]) for i in eth0["addr_info"] if i["family"] == "inet"] == [
        (a.primary_ip, 24)
    ]
    assert "default via 10.0.1.1 dev eth0" in a.run("ip", "route").stdout
    assert ping(a.run, "10.0.1.1")
    assert ping(a.run, b.primary_ip)  # same subnet: proxy ARP on the router
    assert ping(a.run, c.primary_ip)  # other subnet: routed


@pytest.mark.anyio
async def test_attached_eni_appears_as_a_link_with_its_mac_and_goes_on_detach(vpc: Vpc) -> None:
    node = vpc.add_node("m5.large")
    eni_id, mac = await new_attached_eni(vpc, node, 1)
    eth1 = links(node.netns)["eth1"]
    assert eth1["address"] == mac
    assert "UP" not in eth1["flags"]  # the agent brings it up and addresses it
    assert not [i for i in eth1["addr_info"] if i["family"] == "inet"]

    async with ec2_client(vpc) as ec2:
        reply = await ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])
        await ec2.detach_network_interface(
            AttachmentId=reply["NetworkInterfaces"][0]["Attachment"]["AttachmentId"]
        )
    assert "eth1" not in links(node.netns)


@pytest.mark.anyio
async def test_attaching_delay_holds_the_link_back(vpc: Vpc) -> None:
    node = vpc.add_node("m5.large")
    vpc.faults.attach_delay(2.0)
    started = time.monotonic()
    _, mac = await new_attached_eni(vpc, node, 1)
    assert "eth1" not in links(node.netns)
    while "eth1" not in (now := links(node.netns)):
        assert time.monotonic() - started < 60, "the delayed attachment never made its link"
        await asyncio.sleep(0.05)
    assert now["eth1"]["address"] == mac
    assert time.monotonic() - started >= 2.0  # not before the delay


@pytest.mark.anyio
async def test_assigned_ip_and_prefix_are_routed_to_their_eni(vpc: Vpc) -> None:
    node = vpc.add_node("m5.large")
    async with ec2_client(vpc) as ec2:
        reply = await ec2.assign_private_ip_addresses(
            NetworkInterfaceId=node.eni_id, SecondaryPrivateIpAddressCount=1
        )
        ip = reply["AssignedPrivateIpAddresses"][0]["PrivateIpAddress"]
        reply = await ec2.assign_private_ip_addresses(
            NetworkInterfaceId=node.eni_id, Ipv4PrefixCount=1
        )
        prefix = reply["AssignedIpv4Prefixes"][0]["Ipv4Prefix"]
        assert f"{ip} via" in router_routes(vpc) and f"{prefix} via" in router_routes(vpc)

        # Stand-in for a pod: the address on the node's loopback (this kernel has no dummy).
        node.run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
        assert ping(vpc.router.run, ip)

        await ec2.unassign_private_ip_addresses(
            NetworkInterfaceId=node.eni_id, PrivateIpAddresses=[ip]
        )
        await ec2.unassign_private_ip_addresses(
            NetworkInterfaceId=node.eni_id, Ipv4Prefixes=[prefix]
        )
    assert f"{ip} via" not in router_routes(vpc) and prefix not in router_routes(vpc)
    assert not ping(vpc.router.run, ip)


def test_static_node_pod_cidr_is_reachable_from_another_node(vpc: Vpc) -> None:
    static = vpc.add_node("m5.large", pod_cidr="10.244.1.0/24")
    other = vpc.add_node("m5.large")
    static.run("ip", "addr", "add", "10.244.1.10/32", "dev", "lo")
    assert ping(other.run, "10.244.1.10")


def test_internet_sees_the_real_source_address(vpc: Vpc) -> None:
    node = vpc.add_node("m5.large")

    def listen() -> socket.socket:
        server = socket.create_server((vpc.internet_ip, 0))
        server.settimeout(10)
        return server

    server = vpc.internet.call(listen)
    port = server.getsockname()[1]
    seen: list[str] = []

    def accept() -> None:
        conn, peer = server.accept()
        seen.append(peer[0])
        conn.sendall(peer[0].encode())
        conn.close()

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        with node.call(
            lambda: socket.create_connection((vpc.internet_ip, port), timeout=5)
        ) as conn:
            echoed = conn.recv(64).decode()
    finally:
        thread.join(timeout=10)
        server.close()
    assert seen == [echoed] == [node.primary_ip]


def test_imds_and_ec2_from_inside_the_node(vpc: Vpc) -> None:
    node = vpc.add_node("t3.medium")

    def imds() -> str:
        put = urllib.request.Request(
            f"{node.imds_url}/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        )
        tok = urllib.request.urlopen(put, timeout=5).read().decode()
        get = urllib.request.Request(
            f"{node.imds_url}/latest/meta-data/instance-id",
            headers={"X-aws-ec2-metadata-token": tok},
        )
        return urllib.request.urlopen(get, timeout=5).read().decode()  # type: ignore[no-any-return]

    assert node.call(imds) == node.instance_id

    async def describe() -> str:
        from aiobotocore.session import get_session

        async with get_session().create_client(
            "ec2",
            region_name=vpc.region,
            endpoint_url=node.ec2_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ) as ec2:
            reply = await ec2.describe_instances(InstanceIds=[node.instance_id])
        return reply["Reservations"][0]["Instances"][0]["InstanceType"]  # type: ignore[no-any-return]

    assert node.call(lambda: asyncio.run(describe())) == "t3.medium"


def test_processes_run_inside_the_node_and_end_with_it(vpc: Vpc) -> None:
    node = vpc.add_node("m5.large")
    proc = node.start_process(["sleep", "30"])
    ns_inode = os.stat(node.netns_path).st_ino
    deadline = time.monotonic() + 5
    while os.stat(f"/proc/{proc.pid}/ns/net").st_ino != ns_inode and time.monotonic() < deadline:
        time.sleep(0.01)  # ip netns exec has not exec'd sleep yet
    assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == ns_inode
    vpc.remove_node(node)
    assert proc.poll() is not None
    assert not os.path.exists(node.netns_path)


@pytest.mark.anyio
async def test_terminated_instance_loses_its_links(vpc: Vpc) -> None:
    node = vpc.add_node("m5.large")
    await new_attached_eni(vpc, node, 1)
    async with ec2_client(vpc) as ec2:
        await ec2.terminate_instances(InstanceIds=[node.instance_id])
    assert set(links(node.netns)) == {"lo"}
    assert node.primary_ip not in router_routes(vpc)


def test_cleanup_removes_what_a_crashed_run_left() -> None:
    script = (
        "from cloud.emulator import Vpc\n"
        "v = Vpc.start(); n = v.add_node()\n"
        "print(v.router.name, v.internet.name, n.netns, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        names = proc.stdout.readline().split()
        assert len(names) == 3 and all(os.path.exists(f"/run/netns/{n}") for n in names)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(
        [sys.executable, "-m", "cloud.emulator", "cleanup", "--pid", str(proc.pid)],
        capture_output=True,
        text=True,
        check=True,
    )
    # Another run's cleanup on this machine may remove the dead pid's namespaces first (then
    # this one reports fewer): what must hold is that none of them is left.
    assert re.search(r"removed [0-3] namespace\(s\)", done.stdout), done.stdout
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)


@pytest.mark.anyio
async def test_ip_on_a_secondary_eni_arrives_on_that_eni(vpc: Vpc) -> None:
    node = vpc.add_node("m5.large")
    eni_id, _ = await new_attached_eni(vpc, node, 1)
    async with ec2_client(vpc) as ec2:
        reply = await ec2.assign_private_ip_addresses(
            NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=1
        )
    ip = reply["AssignedPrivateIpAddresses"][0]["PrivateIpAddress"]
    node.run("ip", "link", "set", "eth1", "up")
    node.run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
    before = int(node.run("cat", "/sys/class/net/eth1/statistics/rx_packets").stdout)
    assert ping(vpc.router.run, ip)
    assert int(node.run("cat", "/sys/class/net/eth1/statistics/rx_packets").stdout) > before
