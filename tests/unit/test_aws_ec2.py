"""cloud.aws.ec2's policy with a fake client, on trio's virtual clock: retries with backoff,
the rate limit, deadlines, errors mapped once by the table, and the request shapes."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import trio
import trio.testing
from botocore.exceptions import ClientError, EndpointConnectionError

from cloud.aws.ec2 import (
    Ec2,
    ErrorKind,
    RetryPolicy,
    TokenBucket,
    error_kind,
    method_name,
)
from cloud.errors import (
    CloudRequestFailed,
    CloudUnavailable,
    LimitExceeded,
    NotFound,
    SubnetExhausted,
    Throttled,
)

pytestmark = pytest.mark.trio

Reply = dict[str, Any]


def client_error(code: str, status: int = 400, message: str = "nope") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "Op",
    )


class FakeClient:
    """Answers each method from a script: a list of replies or exceptions, consumed in order."""

    def __init__(self) -> None:
        self.script: dict[str, list[Any]] = {}
        self.calls: list[tuple[str, float, dict[str, Any]]] = []
        self.hang: set[str] = set()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        async def method(**params: Any) -> Reply:
            self.calls.append((name, trio.current_time(), params))
            if name in self.hang:
                await trio.sleep_forever()
            steps = self.script.get(name, [])
            step = steps.pop(0) if len(steps) > 1 else (steps[0] if steps else {})
            if isinstance(step, BaseException):
                raise step
            return dict(step)

        return method

    def times(self, name: str) -> list[float]:
        return [t for n, t, _ in self.calls if n == name]


def no_jitter(ceiling: float) -> float:
    return ceiling


def make(
    client: FakeClient, outcomes: list[tuple[str, str, float]] | None = None, **policy: Any
) -> Ec2:
    defaults: dict[str, Any] = dict(base=1.0, cap=4.0, max_attempts=4, jitter=no_jitter)
    return Ec2(
        client,
        policy=RetryPolicy(**{**defaults, **policy}),
        bucket=TokenBucket(rate=1000.0, burst=1000),
        on_call=(lambda a, o, s: outcomes.append((a, o, s))) if outcomes is not None else None,
    )


async def test_throttling_is_retried_with_exponential_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = FakeClient()
    c.script["create_tags"] = [client_error("RequestLimitExceeded", 503)] * 2 + [{}]
    outcomes: list[tuple[str, str, float]] = []
    ec2 = make(c, outcomes)
    t0 = trio.current_time()
    await ec2.create_tags(["eni-1"], {"a": "b"})
    assert c.times("create_tags") == [t0, t0 + 1, t0 + 3]  # sleeps 1, then 2
    assert [o for _, o, _ in outcomes] == ["RequestLimitExceeded", "RequestLimitExceeded", "ok"]
    assert {a for a, _, _ in outcomes} == {"CreateTags"}


async def test_backoff_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    c = FakeClient()
    c.script["create_tags"] = [client_error("Throttling", 400)] * 5 + [{}]
    ec2 = make(c, max_attempts=6)
    t0 = trio.current_time()
    await ec2.create_tags(["eni-1"], {})
    # sleeps 1, 2, 4, 4 (cap), 4
    assert c.times("create_tags") == [t0, t0 + 1, t0 + 3, t0 + 7, t0 + 11, t0 + 15]


async def test_throttled_past_the_attempts_surfaces_as_throttled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = FakeClient()
    c.script["create_tags"] = [client_error("RequestLimitExceeded", 503)]
    ec2 = make(c, max_attempts=3)
    with pytest.raises(Throttled) as info:
        await ec2.create_tags(["eni-1"], {})
    assert (info.value.action, info.value.attempts) == ("CreateTags", 3)
    assert len(c.calls) == 3


async def test_server_and_connection_errors_are_retried_then_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = FakeClient()
    c.script["delete_network_interface"] = [
        client_error("InternalError", 500),
        EndpointConnectionError(endpoint_url="http://x"),
        {},
    ]
    ec2 = make(c)
    await ec2.delete_network_interface("eni-1")
    assert len(c.calls) == 3
    c.script["delete_network_interface"] = [client_error("Unavailable", 503)]
    with pytest.raises(CloudUnavailable) as info:
        await ec2.delete_network_interface("eni-1")
    assert info.value.action == "DeleteNetworkInterface"
    assert "Unavailable" in info.value.reason


@pytest.mark.parametrize(
    ("code", "kind", "check"),
    [
        ("InvalidNetworkInterfaceID.NotFound", NotFound, lambda e: e.code),
        ("PrivateIpAddressLimitExceeded", LimitExceeded, lambda e: e.what),
        ("AttachmentLimitExceeded", LimitExceeded, lambda e: e.what),
        ("InsufficientFreeAddressesInSubnet", SubnetExhausted, lambda e: e.code),
        ("InsufficientCidrBlocks", SubnetExhausted, lambda e: e.code),
        ("InvalidParameterValue", CloudRequestFailed, lambda e: e.code),
    ],
)
async def test_refusals_are_mapped_once_and_not_retried(
    autojump_clock: trio.testing.MockClock,
    code: str,
    kind: type[Exception],
    check: Callable[[Any], str],
) -> None:
    c = FakeClient()
    c.script["assign_private_ip_addresses"] = [client_error(code, 400, "why")]
    ec2 = make(c)
    t0 = trio.current_time()
    with pytest.raises(kind) as info:
        await ec2.assign_private_ips("eni-1", 3)
    assert check(info.value) == code
    assert c.times("assign_private_ip_addresses") == [t0]
    if isinstance(info.value, CloudRequestFailed):
        assert info.value.message == "why"


async def test_error_table() -> None:
    assert error_kind("RequestLimitExceeded", 503) is ErrorKind.THROTTLED
    assert error_kind("InvalidAttachmentID.NotFound", 400) is ErrorKind.NOT_FOUND
    assert error_kind("Whatever.NotFound", 400) is ErrorKind.NOT_FOUND
    assert error_kind("SomethingNew", 502) is ErrorKind.UNAVAILABLE
    assert error_kind("UnauthorizedOperation", 403) is ErrorKind.FAILED
    assert method_name("AssignPrivateIpAddresses") == "assign_private_ip_addresses"


async def test_each_attempt_has_a_timeout_and_the_call_a_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = FakeClient()
    c.hang.add("describe_subnets")
    outcomes: list[tuple[str, str, float]] = []
    ec2 = make(c, outcomes, attempt_timeout=2.0, deadline=100.0, max_attempts=3)
    t0 = trio.current_time()
    with pytest.raises(CloudUnavailable):
        await ec2.describe_subnet("subnet-1")
    # 2 s per attempt, backoff 1 and 2 between: starts at 0, 3, 7; gives up at 9.
    assert c.times("describe_subnets") == [t0, t0 + 3, t0 + 7]
    assert trio.current_time() == t0 + 9
    assert [(o, s) for _, o, s in outcomes] == [("Timeout", 2.0)] * 3
    ec2 = make(c, attempt_timeout=2.0, deadline=5.0, max_attempts=10)
    t1 = trio.current_time()
    with pytest.raises(CloudUnavailable) as info:
        await ec2.describe_subnet("subnet-1")
    assert trio.current_time() == t1 + 5
    assert "5s" in info.value.reason


async def test_token_bucket_spaces_calls_after_the_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = FakeClient()
    ec2 = Ec2(c, policy=RetryPolicy(jitter=no_jitter), bucket=TokenBucket(rate=2.0, burst=2))
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(ec2.create_tags, ["eni-1"], {})
    assert c.times("create_tags") == [t0, t0, t0 + 0.5, t0 + 1.0, t0 + 1.5]
    await trio.sleep(10)  # refills to the burst, no more
    t1 = trio.current_time()
    for _ in range(3):
        await ec2.create_tags(["eni-1"], {})
    assert c.times("create_tags")[-3:] == [t1, t1, t1 + 0.5]


async def test_instance_types_are_cached(autojump_clock: trio.testing.MockClock) -> None:
    c = FakeClient()
    c.script["describe_instance_types"] = [
        {
            "InstanceTypes": [
                {
                    "InstanceType": "m5.large",
                    "VCpuInfo": {"DefaultVCpus": 2},
                    "NetworkInfo": {"MaximumNetworkInterfaces": 3, "Ipv4AddressesPerInterface": 10},
                }
            ]
        }
    ]
    ec2 = make(c)
    a = await ec2.describe_instance_type("m5.large")
    b = await ec2.describe_instance_type("m5.large")
    assert a == b and (a.max_enis, a.ipv4_per_eni, a.vcpus) == (3, 10, 2)
    assert len(c.calls) == 1


def eni_wire(eni_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "NetworkInterfaceId": eni_id,
        "MacAddress": "02:00:00:AA:BB:CC",
        "SubnetId": "subnet-1",
        "Status": "in-use",
        "PrivateIpAddress": "10.0.1.5",
        "PrivateIpAddresses": [
            {"Primary": True, "PrivateIpAddress": "10.0.1.5"},
            {"Primary": False, "PrivateIpAddress": "10.0.1.6"},
        ],
        "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.1.16/28"}],
        "TagSet": [{"Key": "k", "Value": "v"}],
        "Attachment": {
            "AttachmentId": "att-1",
            "InstanceId": "i-1",
            "DeviceIndex": 1,
            "Status": "attached",
        },
        **extra,
    }


async def test_describe_follows_pages_and_parses(autojump_clock: trio.testing.MockClock) -> None:
    c = FakeClient()
    c.script["describe_network_interfaces"] = [
        {"NetworkInterfaces": [eni_wire("eni-1")], "NextToken": "p2"},
        {"NetworkInterfaces": [eni_wire("eni-2")]},
    ]
    ec2 = make(c)
    found = await ec2.describe_network_interfaces(filters={"attachment.instance-id": ["i-1"]})
    assert [e.eni_id for e in found] == ["eni-1", "eni-2"]
    params = [p for _, _, p in c.calls]
    assert params[0] == {"Filters": [{"Name": "attachment.instance-id", "Values": ["i-1"]}]}
    assert params[1]["NextToken"] == "p2"
    e = found[0]
    assert e.mac == "02:00:00:aa:bb:cc" and e.primary_ip == IPv4Address("10.0.1.5")
    assert e.secondary_ips == (IPv4Address("10.0.1.6"),)
    assert e.prefixes == (IPv4Network("10.0.1.16/28"),)
    assert e.tags == {"k": "v"}
    assert e.attachment is not None and e.attachment.device_index == 1


async def test_create_carries_its_addresses_in_the_same_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = FakeClient()
    c.script["create_network_interface"] = [{"NetworkInterface": eni_wire("eni-9")}]
    ec2 = make(c)
    await ec2.create_network_interface(
        subnet_id="subnet-1",
        security_groups=["sg-1"],
        description="podwire-i-1",
        tags={"node.k8s.amazonaws.com/instance_id": "i-1"},
        prefix_count=2,
    )
    ((name, _, params),) = c.calls
    assert name == "create_network_interface"
    assert params["Ipv4PrefixCount"] == 2 and "SecondaryPrivateIpAddressCount" not in params
    assert params["Groups"] == ["sg-1"] and params["Description"] == "podwire-i-1"
    assert params["TagSpecifications"] == [
        {
            "ResourceType": "network-interface",
            "Tags": [{"Key": "node.k8s.amazonaws.com/instance_id", "Value": "i-1"}],
        }
    ]
    with pytest.raises(ValueError):
        await ec2.create_network_interface(
            subnet_id="s", security_groups=[], description="", tags={}, ip_count=1, prefix_count=1
        )
