"""Fault injection: throttling absorbed by retries and then surfaced, server errors, latency,
slow attaches, and the same over the HTTP control endpoint and in process mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cloud.emulator import Vpc
from tests.e2e.conftest import ec2_client

pytestmark = pytest.mark.anyio


def control(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


async def test_throttling_is_absorbed_by_retries_then_surfaced(cloud: Vpc) -> None:
    async with ec2_client(cloud, attempts=3) as ec2:
        cloud.faults.throttle("DescribeInstances", 2)
        reply = await ec2.describe_instances()
        assert reply["ResponseMetadata"]["RetryAttempts"] == 2

        cloud.faults.throttle("DescribeInstances", 3)
        with pytest.raises(ClientError) as caught:
            await ec2.describe_instances()
        assert caught.value.response["Error"]["Code"] == "RequestLimitExceeded"
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        # Other actions are not affected, and the plan is used up.
        await ec2.describe_subnets()
        await ec2.describe_instances()


async def test_server_errors(cloud: Vpc) -> None:
    async with ec2_client(cloud) as ec2:
        cloud.faults.error("DescribeSubnets", 1, status=500)
        with pytest.raises(ClientError) as caught:
            await ec2.describe_subnets()
        assert caught.value.response["Error"]["Code"] == "InternalError"
        cloud.faults.error("DescribeSubnets", 1, status=503)
        with pytest.raises(ClientError) as caught:
            await ec2.describe_subnets()
        assert caught.value.response["Error"]["Code"] == "Unavailable"
        await ec2.describe_subnets()


async def test_latency(cloud: Vpc) -> None:
    async with ec2_client(cloud) as ec2:
        cloud.faults.latency("DescribeVpcs", 0.4)
        started = time.monotonic()
        await ec2.describe_vpcs()
        assert time.monotonic() - started >= 0.4
        cloud.faults.latency("DescribeVpcs", 0)


async def test_attach_stays_attaching_for_the_injected_delay(cloud: Vpc) -> None:
    node = cloud.add_node("m5.large")
    cloud.faults.attach_delay(2.0)
    async with ec2_client(cloud) as ec2:
        created = (await ec2.create_network_interface(SubnetId=node.subnet.id))["NetworkInterface"]
        eni_id = created["NetworkInterfaceId"]
        started = time.monotonic()
        await ec2.attach_network_interface(
            NetworkInterfaceId=eni_id, InstanceId=node.instance_id, DeviceIndex=1
        )

        async def status() -> str:
            reply = await ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])
            return reply["NetworkInterfaces"][0]["Attachment"]["Status"]  # type: ignore[no-any-return]

        assert await status() == "attaching"
        while (now := await status()) == "attaching":
            assert time.monotonic() - started < 60, "still attaching long after the delay"
            time.sleep(0.05)
        assert now == "attached" and time.monotonic() - started >= 2.0


async def test_faults_over_the_control_endpoint(cloud: Vpc) -> None:
    control(cloud.control_url, "POST", "/faults/throttle", {"action": "DescribeVpcs", "count": 1})
    async with ec2_client(cloud) as ec2:
        with pytest.raises(ClientError, match="RequestLimitExceeded"):
            await ec2.describe_vpcs()
        control(cloud.control_url, "POST", "/faults/error", {"action": "DescribeVpcs", "count": 5})
        control(cloud.control_url, "DELETE", "/faults")
        await ec2.describe_vpcs()


def test_process_mode_reports_its_urls_and_takes_commands() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloud.emulator",
            "serve",
            "--port",
            "0",
            "--no-fabric",
            "--subnet",
            "10.0.1.0/24@us-east-1a",
            "--node",
            "t3.medium@10.0.1.0/24",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["ec2_url"].startswith("http://127.0.0.1:")
        assert [n["instance_type"] for n in ready["nodes"]] == ["t3.medium"]
        described = control(ready["control_url"], "GET", "")
        assert described["vpc_id"] == ready["vpc_id"]
        node = control(
            ready["control_url"],
            "POST",
            "/nodes",
            {"instance_type": "m5.large", "subnet_id": ready["subnets"][0]["id"]},
        )
        assert node["primary_ip"].startswith("10.0.1.")
        control(ready["control_url"], "DELETE", f"/nodes/{node['instance_id']}")
        assert len(control(ready["control_url"], "GET", "")["nodes"]) == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
