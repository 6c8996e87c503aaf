"""The aws provider against the emulator: IMDS + EC2 over HTTP, ENIs cabled into a node's
namespace by the fabric, the link configured by netlink inside that namespace."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import anyio
import pytest

from cloud.aws.ec2 import Credentials, Ec2, RetryPolicy, open_ec2
from cloud.aws.imds import Imds
from cloud.aws.provider import (
    TAG_CREATED_AT,
    TAG_INSTANCE,
    TAG_NO_MANAGE,
    AwsProvider,
    AwsSettings,
    NetlinkEniLinks,
    rfc3339,
)
from cloud.emulator import Vpc
from cloud.emulator.api import Node
from cloud.errors import (
    CloudUnavailable,
    EniSetupFailed,
    LimitExceeded,
    NotFound,
    SubnetExhausted,
    Throttled,
)
from netlink.watcher import Watcher

pytestmark = [pytest.mark.anyio, pytest.mark.root]

ATTEMPTS = 4
FAST = RetryPolicy(base=0.005, cap=0.02, max_attempts=ATTEMPTS, attempt_timeout=10, deadline=30)
SETTINGS = AwsSettings(
    cluster_name="e2e",
    mtu=9001,
    link_timeout=10.0,
    workflow_deadline=30.0,
    undo_deadline=20.0,
    detach_poll=0.05,
    free_backoff=RetryPolicy(base=0.01, cap=0.1, max_attempts=5, deadline=30),
)


class Env:
    def __init__(self, vpc: Vpc, node: Node, provider: AwsProvider, ec2: Ec2) -> None:
        self.vpc = vpc
        self.node = node
        self.provider = provider
        self.ec2 = ec2

    def ip(self, *args: str) -> str:
        return self.node.run("ip", *args).stdout

    async def ours(self) -> list[Any]:
        return await self.ec2.describe_network_interfaces(
            filters={f"tag:{TAG_INSTANCE}": [self.node.instance_id]}
        )


async def make_env(vpc: Vpc, node: Node) -> AsyncIterator[Env]:
    watcher = Watcher(netns=node.netns_path)
    async with (
        anyio.create_task_group() as tg,
        Imds(node.imds_local_url, timeout=5.0) as imds,
        open_ec2(
            region=vpc.region,
            endpoint_url=vpc.ec2_url,
            credentials=Credentials(access_key_id="testing", secret_access_key="testing"),
            policy=FAST,
        ) as ec2,
    ):
        await tg.start(watcher.serve)
        provider = AwsProvider(
            imds=imds,
            ec2=ec2,
            link_waiter=watcher,
            links=NetlinkEniLinks(node.netns_path),
            settings=SETTINGS,
        )
        yield Env(vpc, node, provider, ec2)
        tg.cancel_scope.cancel()


@pytest.fixture
async def env(vpc: Vpc) -> AsyncIterator[Env]:
    node = vpc.add_node("m5.large", vpc.add_subnet("10.0.1.0/24"))
    async for e in make_env(vpc, node):
        yield e


async def test_inventory_from_imds_and_ec2_leaves_out_the_primary_ip(env: Env) -> None:
    node = env.node
    await env.ec2.assign_private_ips(node.eni_id, 3)
    blocks = await env.provider.inventory()
    assert len(blocks) == 1
    (block,) = blocks
    assert block.owner == node.eni_id and block.table is None
    assert len(block.ips) == 3 and IPv4Address(node.primary_ip) not in block.ips
    facts = env.provider.facts()
    assert facts.primary_ip == IPv4Address(node.primary_ip)
    assert facts.vpc_cidrs == (IPv4Network("10.0.0.0/16"),)
    (eni,) = env.provider.enis()
    assert (eni.device_index, eni.primary, eni.mac) == (0, True, node.mac.lower())
    assert env.provider.max_enis == 3 and env.provider.ipv4_per_eni == 10
    # The SNAT connmark rule is ensured once, inside the node.
    assert "1024:\tfrom all fwmark 0x80/0x80 lookup main" in env.ip("rule")


async def test_create_attach_configure_then_free(env: Env) -> None:
    await env.provider.inventory()
    env.vpc.faults.attach_delay(0.5)  # the link appears later: found by its netlink event
    started = time.monotonic()
    block = await env.provider.create_eni(ip_count=9)
    assert time.monotonic() - started >= 0.5
    info = env.provider.eni(block.owner)
    assert block.table == 2 == info.table and info.device_index == 1
    assert len(block.ips) == 9 and info.primary_ip not in block.ips

    link = env.ip("-o", "link", "show", "eth1")
    assert info.mac in link and "mtu 9001" in link and ",UP" in link
    assert f"inet {info.primary_ip}/24" in env.ip("-o", "addr", "show", "dev", "eth1")
    table = env.ip("route", "show", "table", "2")
    assert "default via 10.0.1.1 dev eth1" in table
    assert re.search(r"^10\.0\.1\.1 dev eth1 .*scope link", table, re.M)
    assert f"32765:\tfrom {info.primary_ip} lookup 2" in env.ip("rule")
    # The kernel's connected route for eth1 left main: the subnet goes through eth0.
    assert "dev eth1" not in env.ip("route", "show", "table", "main")
    (eni,) = await env.ec2.describe_network_interfaces(eni_ids=[block.owner])
    assert eni.tags[TAG_INSTANCE] == env.node.instance_id and TAG_CREATED_AT in eni.tags
    assert eni.tags["cluster.k8s.amazonaws.com/name"] == "e2e"
    assert eni.description == f"podwire-{env.node.instance_id}"
    assert eni.attachment is not None and eni.attachment.delete_on_termination

    await env.provider.free_eni(block.owner)
    assert "eth1" not in env.ip("-o", "link")
    with pytest.raises(NotFound):
        await env.ec2.describe_network_interface(block.owner)
    assert "lookup 2" not in env.ip("rule")
    assert env.ip("route", "show", "table", "2").strip() == ""
    assert [e.eni_id for e in env.provider.enis()] == [env.node.eni_id]
    await env.provider.free_eni(block.owner)  # already gone: fine


async def test_attach_failure_deletes_the_eni_and_leaks_nothing(env: Env) -> None:
    await env.provider.inventory()
    env.vpc.faults.error("AttachNetworkInterface", ATTEMPTS, status=500)
    with pytest.raises(CloudUnavailable):
        await env.provider.create_eni(ip_count=4)
    assert await env.ours() == []
    links = env.ip("-o", "link")
    assert "eth1" not in links
    assert "lookup 2" not in env.ip("rule")
    assert [e.eni_id for e in env.provider.enis()] == [env.node.eni_id]


async def test_link_timeout_undoes_everything(env: Env) -> None:
    await env.provider.inventory()
    env.vpc.faults.attach_delay(30)  # never cabled within the link timeout
    env.provider.settings = AwsSettings(
        link_timeout=0.5, detach_poll=0.05, free_backoff=SETTINGS.free_backoff
    )
    with pytest.raises(EniSetupFailed) as info:
        await env.provider.create_eni(ip_count=2)
    assert info.value.step == "wait for link"
    env.vpc.faults.attach_delay(0)
    assert await env.ours() == []


async def test_throttling_is_absorbed_then_surfaces_past_the_attempts(env: Env) -> None:
    await env.provider.inventory()
    for action in (
        "CreateNetworkInterface",
        "DescribeNetworkInterfaces",
        "AttachNetworkInterface",
        "ModifyNetworkInterfaceAttribute",
        "AssignPrivateIpAddresses",
    ):
        env.vpc.faults.throttle(action, ATTEMPTS - 1)
    block = await env.provider.create_eni(ip_count=2)
    assert len(block.ips) == 2
    more = await env.provider.assign_ips(block.owner, 3)
    assert len(more.ips) == 3
    env.vpc.faults.throttle("AssignPrivateIpAddresses", ATTEMPTS)
    with pytest.raises(Throttled) as info:
        await env.provider.assign_ips(block.owner, 1)
    assert info.value.attempts == ATTEMPTS
    await env.provider.free_eni(block.owner)


async def test_subnet_exhaustion_and_ip_limits(vpc: Vpc) -> None:
    node = vpc.add_node("m5.large", vpc.add_subnet("10.0.2.0/28"))  # 11 usable, node has 1
    async for env in make_env(vpc, node):
        await env.provider.inventory()
        await env.provider.assign_ips(node.eni_id, 8)
        with pytest.raises(SubnetExhausted) as info:
            await env.provider.create_eni(ip_count=5)
        assert info.value.code == "InsufficientFreeAddressesInSubnet"
        assert await env.ours() == []
        with pytest.raises(LimitExceeded) as limit:
            await env.provider.assign_ips(node.eni_id, 2)  # 1 + 8 + 2 > 10 slots
        assert limit.value.what == "PrivateIpAddressLimitExceeded"


async def test_prefix_mode_assigns_28s(env: Env) -> None:
    await env.provider.inventory()
    block = await env.provider.create_eni(prefix_count=2)
    info = env.provider.eni(block.owner)
    assert len(info.prefixes) == 2 and all(p.prefixlen == 28 for p in info.prefixes)
    assert len(block.ips) == 32 and set(block.ips) == {ip for p in info.prefixes for ip in p}
    more = await env.provider.assign_prefixes(block.owner, 1)
    assert len(more.ips) == 16 and len(env.provider.eni(block.owner).prefixes) == 3
    # The router routes the prefixes to this ENI; IMDS lists them too.
    routes = env.vpc.router.run("ip", "route").stdout
    assert all(str(p) in routes for p in env.provider.eni(block.owner).prefixes)
    await env.provider.release_prefixes(block.owner, [info.prefixes[0]])
    (eni,) = await env.ec2.describe_network_interfaces(eni_ids=[block.owner])
    assert len(eni.prefixes) == 2
    # A restart rebuilds the same picture from the cloud.
    blocks = {b.owner: b for b in await env.provider.inventory()}
    assert len(blocks[block.owner].ips) == 32 and blocks[block.owner].table == 2
    await env.provider.free_eni(block.owner)


async def test_leaked_enis_cleanup(env: Env) -> None:
    await env.provider.inventory()
    subnet = env.node.subnet.id
    iid = env.node.instance_id
    old = rfc3339(time.time() - 600)
    young = rfc3339(time.time() - 10)

    async def make(tags: dict[str, str]) -> str:
        eni = await env.ec2.create_network_interface(
            subnet_id=subnet, security_groups=[], description="x", tags=tags
        )
        return eni.eni_id

    leaked = await make({TAG_INSTANCE: iid, TAG_CREATED_AT: old})
    kept_no_manage = await make({TAG_INSTANCE: iid, TAG_CREATED_AT: old, TAG_NO_MANAGE: "true"})
    kept_untagged = await make({})
    kept_young = await make({TAG_INSTANCE: iid, TAG_CREATED_AT: young})
    other_node = await make({TAG_INSTANCE: "i-someoneelse", TAG_CREATED_AT: old})
    assert await env.provider.cleanup_leaked() == [leaked]
    left = {e.eni_id for e in await env.ec2.describe_network_interfaces()}
    assert leaked not in left
    assert {kept_no_manage, kept_untagged, kept_young, other_node} <= left


async def test_inventory_adopts_an_attached_eni(env: Env) -> None:
    await env.provider.inventory()
    # An ENI attached by someone else (or by an agent that restarted mid-way).
    eni = await env.ec2.create_network_interface(
        subnet_id=env.node.subnet.id, security_groups=[], description="x", tags={}, ip_count=2
    )
    await env.ec2.attach_network_interface(
        eni_id=eni.eni_id, instance_id=env.node.instance_id, device_index=2
    )
    hands_off = await env.ec2.create_network_interface(
        subnet_id=env.node.subnet.id,
        security_groups=[],
        description="x",
        tags={TAG_NO_MANAGE: "true"},
        ip_count=3,
    )
    await env.ec2.attach_network_interface(
        eni_id=hands_off.eni_id, instance_id=env.node.instance_id, device_index=1
    )
    blocks = {b.owner: b for b in await env.provider.inventory()}
    assert blocks[eni.eni_id].table == 3 and len(blocks[eni.eni_id].ips) == 2
    # The no-manage ENI takes a slot but is not ours: no block, no tags, no rule.
    assert hands_off.eni_id not in blocks
    assert [(e.device_index, e.no_manage) for e in env.provider.enis()] == [
        (0, False),
        (1, True),
        (2, False),
    ]
    (untouched,) = await env.ec2.describe_network_interfaces(eni_ids=[hands_off.eni_id])
    assert TAG_INSTANCE not in untouched.tags
    assert "lookup 2" not in env.ip("rule")
    (adopted,) = await env.ec2.describe_network_interfaces(eni_ids=[eni.eni_id])
    assert adopted.tags[TAG_INSTANCE] == env.node.instance_id
    assert f"from {eni.primary_ip} lookup 3" in env.ip("rule")
    await env.provider.free_eni(eni.eni_id)


async def test_imds_renews_a_rejected_token(vpc: Vpc) -> None:
    node = vpc.add_node("m5.large", vpc.add_subnet("10.0.3.0/24"))
    async with Imds(node.imds_local_url, token_ttl=60) as imds:
        assert (await imds.instance()).instance_id == node.instance_id
        imds._token = "stale"  # as after an IMDS restart: the next GET answers 401
        (iface,) = await imds.interfaces()
        assert imds._token != "stale"
        assert iface.interface_id == node.eni_id and iface.device_number == 0
        assert iface.local_ipv4s == (IPv4Address(node.primary_ip),)
        assert iface.subnet_cidr == IPv4Network("10.0.3.0/24")
