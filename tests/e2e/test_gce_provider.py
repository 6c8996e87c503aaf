"""The gce provider against the emulated GCE metadata server, over real HTTP on the machine's
loopback (no root needed): the exact paths and header, wait_for_change, the server down at
start, ranges that change and shrink."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import anyio
import pytest

from cloud.emulator import Vpc
from cloud.emulator.api import Node
from cloud.emulator.server import serve
from cloud.errors import BadMetadata, CloudUnavailable, NotGceMetadata
from cloud.gce import GceMetadata, GceProvider, GceSettings

pytestmark = pytest.mark.anyio

ALIASES = "/computeMetadata/v1/instance/network-interfaces/0/ip-aliases/"


def nets(*texts: str) -> tuple[IPv4Network, ...]:
    return tuple(IPv4Network(t) for t in texts)


def http_get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@pytest.fixture
def node(cloud: Vpc) -> Node:
    return cloud.add_node("m5.large", cloud.add_subnet("10.0.1.0/24"), pod_cidr="10.4.1.0/24")


@pytest.fixture
async def metadata(cloud: Vpc, node: Node) -> AsyncIterator[GceMetadata]:
    async with GceMetadata(cloud.gce_metadata_local_url(node), timeout=10.0) as md:
        yield md


async def test_inventory_reads_the_exact_paths_with_the_header(
    cloud: Vpc, node: Node, metadata: GceMetadata
) -> None:
    provider = GceProvider(metadata)
    blocks = await provider.inventory()
    assert [(b.owner, len(b.ips)) for b in blocks] == [("10.4.1.0/24", 254)]
    assert IPv4Address("10.4.1.0") not in blocks[0].ips
    assert IPv4Address("10.4.1.255") not in blocks[0].ips
    facts = provider.facts()
    assert str(facts.primary_ip) == node.primary_ip and facts.vpc_cidrs == nets("10.0.1.0/24")
    assert facts.pod_cidrs == nets("10.4.1.0/24")
    assert provider.nic.gateway == IPv4Address("10.0.1.1") and provider.nic.mtu == 1460
    assert provider.nic.mac == node.mac
    assert provider.instance.zone == "us-east-1a" and provider.instance.id.isdigit()
    seen = list(cloud.gce_metadata.requests)
    assert all(r.flavor == "Google" and r.method == "GET" for r in seen)
    paths = {r.path for r in seen}
    nic = "/computeMetadata/v1/instance/network-interfaces/0/"
    assert paths == {
        "/computeMetadata/v1/instance/id",
        "/computeMetadata/v1/instance/zone",
        "/computeMetadata/v1/instance/name",
        *(nic + leaf for leaf in ("ip", "subnetmask", "gateway", "mac", "mtu")),
        ALIASES,
        ALIASES + "0",
    }
    # the ranges' ETag is read (recursive view) before the ranges themselves
    alias_reads = [(r.path, r.query) for r in seen if r.path.startswith(ALIASES)]
    assert alias_reads[0] == (ALIASES, "recursive=true")


def test_the_server_requires_and_echoes_the_header(cloud: Vpc, node: Node) -> None:
    base = cloud.gce_metadata_local_url(node)
    status, headers, body = http_get(f"{base}/instance/id", {})
    assert status == 403 and "Metadata-Flavor" in body
    assert headers["Metadata-Flavor"] == "Google"
    spoofed = {"Metadata-Flavor": "Google", "X-Forwarded-For": "203.0.113.9"}
    assert http_get(f"{base}/instance/id", spoofed)[0] == 403
    status, headers, body = http_get(
        f"{base}/instance/network-interfaces/0/ip-aliases/0", {"Metadata-Flavor": "Google"}
    )
    assert (status, body, headers["Metadata-Flavor"]) == (200, "10.4.1.0/24", "Google")
    assert headers["ETag"]


async def test_a_reply_without_the_header_is_not_gce_metadata() -> None:
    def impostor(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"10.9.9.0/24"]

    server = serve(impostor, "127.0.0.1", 0)
    try:
        async with GceMetadata(f"{server.url}/computeMetadata/v1") as md:
            with pytest.raises(NotGceMetadata):
                await md.text("instance/id")
    finally:
        server.stop()


async def test_wait_for_change_with_etag_and_timeout(
    cloud: Vpc, node: Node, metadata: GceMetadata
) -> None:
    path = "instance/network-interfaces/0/ip-aliases/"
    etag = await metadata.aliases_etag()
    # no change within timeout_sec: the same answer and ETag come back
    same = await metadata.wait_for_change(path, last_etag=etag, timeout_sec=1, recursive=True)
    assert same.etag == etag and same.text == '["10.4.1.0/24"]'
    # a stale last_etag returns at once with the current value
    now = await metadata.wait_for_change(path, last_etag="stale", timeout_sec=3600, recursive=True)
    assert now.etag == etag
    # a change while waiting ends the wait with the new value
    got: list[Any] = []

    async def wait() -> None:
        got.append(
            await metadata.wait_for_change(path, last_etag=etag, timeout_sec=3600, recursive=True)
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.to_thread.run_sync(cloud.set_alias_ranges, node, ["10.4.1.0/25"])
    assert got[0].etag != etag and got[0].text == '["10.4.1.0/25"]'


async def first_change(provider: GceProvider, change: Callable[[], None]) -> tuple[Any, ...]:
    feed = provider.watch_ranges()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, change)
            return await feed.__anext__()
    finally:
        await feed.aclose()  # type: ignore[attr-defined]


async def test_watch_follows_a_shrink_and_an_added_range(
    cloud: Vpc, node: Node, metadata: GceMetadata
) -> None:
    provider = GceProvider(metadata, GceSettings(watch_timeout=30))
    await provider.inventory()
    shrunk = await first_change(provider, lambda: cloud.set_alias_ranges(node, ["10.4.1.0/26"]))
    assert shrunk == nets("10.4.1.0/26") and provider.ranges == shrunk
    assert [len(b.ips) for b in provider.blocks()] == [62]
    grown = await first_change(
        provider, lambda: cloud.set_alias_ranges(node, ["10.4.1.0/26", "10.4.7.0/28"])
    )
    assert grown == nets("10.4.1.0/26", "10.4.7.0/28")
    assert any("wait_for_change=true" in r.query for r in cloud.gce_metadata.requests)


async def test_overlapping_ranges_are_refused_at_start_and_skipped_while_following(
    cloud: Vpc, node: Node, metadata: GceMetadata
) -> None:
    provider = GceProvider(metadata, GceSettings(watch_timeout=30))
    await provider.inventory()
    feed = provider.watch_ranges()
    got: list[tuple[IPv4Network, ...]] = []

    async def follow() -> None:
        got.append(await feed.__anext__())

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await anyio.to_thread.run_sync(
            cloud.set_alias_ranges, node, ["10.4.1.0/24", "10.4.1.128/25"]
        )
        with anyio.fail_after(60):
            while provider.errors == 0:  # the overlapping set is logged and skipped
                await anyio.sleep(0.05)
        assert "overlaps" in provider.last_error and not got
        await anyio.to_thread.run_sync(cloud.set_alias_ranges, node, ["10.4.2.0/24"])
    await feed.aclose()  # type: ignore[attr-defined]
    assert got == [nets("10.4.2.0/24")] and provider.last_error == ""
    cloud.set_alias_ranges(node, ["10.4.1.0/24", "10.4.1.128/25"])
    with pytest.raises(BadMetadata, match="overlaps"):
        await GceProvider(metadata).inventory()


async def test_server_down_at_start_then_up(cloud: Vpc, node: Node) -> None:
    # nothing listens: connection refused
    async with GceMetadata("http://127.0.0.1:1/computeMetadata/v1", timeout=5.0) as md:
        with pytest.raises(CloudUnavailable):
            await GceProvider(md).inventory()
    # the server answers 503 (down): unavailable too, then it comes back
    cloud.gce_metadata.set_down(True)
    async with GceMetadata(cloud.gce_metadata_local_url(node), timeout=5.0) as md:
        with pytest.raises(CloudUnavailable):
            await GceProvider(md).inventory()
        cloud.gce_metadata.set_down(False)
        assert [b.owner for b in await GceProvider(md).inventory()] == ["10.4.1.0/24"]


def test_control_endpoint_changes_alias_ranges(cloud: Vpc, node: Node) -> None:
    import orjson

    request = urllib.request.Request(
        f"{cloud.control_url}/nodes/{node.instance_id}/alias-ranges",
        data=orjson.dumps({"cidrs": ["10.4.3.0/24", "10.4.4.0/28"]}),
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert orjson.loads(reply.read())["alias_ranges"] == ["10.4.3.0/24", "10.4.4.0/28"]
    base = cloud.gce_metadata_local_url(node)
    listing = http_get(
        f"{base}/instance/network-interfaces/0/ip-aliases/", {"Metadata-Flavor": "Google"}
    )
    assert listing[2] == "0\n1\n"
    bad = urllib.request.Request(
        f"{cloud.control_url}/nodes/{node.instance_id}/alias-ranges", data=b"{}", method="PUT"
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=10)
    assert e.value.code == 400
