"""Security groups on real packets: the VPC router allows exactly what the sender's outbound and
the receiver's inbound rules allow, statefully, and drops the rest silently.

Every group change goes through aiobotocore against the running emulator; traffic is real TCP,
UDP and ICMP between instance namespaces across the router. A denied connection is shown twice:
it does not complete within a short connect timeout (a timeout, never a reset) AND the ENI's drop
counter rose; an allowed one gets a generous deadline.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

import pytest

from cloud.emulator import Instance, Vpc
from cloud.emulator.firewall import Eni, Firewall, Group, Policy, Port, Rule, TrunkCable
from cloud.emulator.firewall.render import FRAMES_TABLE, TABLE
from netlink.nftables import Nft
from tests.e2e.conftest import ec2_client

pytestmark = [pytest.mark.root, pytest.mark.anyio]

ALLOWED_DEADLINE = 10.0
DENIED_WAIT = 1.0


def tcp_line(host: str, port: int, *, source: str | None = None) -> str:
    """Connect, send a line, return the echo (how the server saw us). Raises on failure."""
    with socket.create_connection(
        (host, port), timeout=ALLOWED_DEADLINE, source_address=(source, 0) if source else None
    ) as conn:
        conn.sendall(b"hi\n")
        return conn.makefile("rb").readline().decode().strip()


def udp_ask(host: str, port: int, timeout: float) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"?", (host, port))
        try:
            return s.recv(512).decode().strip()
        except TimeoutError:
            return None


def connect_times_out(host: str, port: int, source: str | None = None) -> bool:
    """True when the connection neither completes nor is refused within DENIED_WAIT."""
    try:
        socket.create_connection(
            (host, port), timeout=DENIED_WAIT, source_address=(source, 0) if source else None
        ).close()
    except TimeoutError:
        return True
    return False


def ping(src: Instance, host: str, wait: float) -> bool:
    done = src.run("ping", "-c", "1", "-W", str(wait), host, check=False)
    return done.returncode == 0


def rises(vpc: Vpc, eni_id: str, kind: str) -> Callable[[Callable[[], Any]], Any]:
    """Run ``action`` and check the ENI's ``kind`` drop counter went up meanwhile."""

    def check(action: Callable[[], Any]) -> Any:
        before = getattr(vpc.drops(eni_id), kind)
        result = action()
        assert getattr(vpc.drops(eni_id), kind) > before, f"{eni_id} {kind} drops did not rise"
        return result

    return check


def denied_tcp(
    vpc: Vpc, src: Instance, host: str, port: int, eni_id: str, kind: str = "inbound"
) -> None:
    assert rises(vpc, eni_id, kind)(lambda: src.call(lambda: connect_times_out(host, port)))


def allowed_tcp(src: Instance, host: str, port: int) -> None:
    assert src.call(lambda: tcp_line(host, port)).startswith(src.primary_ip + ":")


async def new_group(
    ec2: Any,
    vpc: Vpc,
    name: str,
    inbound: list[dict[str, Any]] = (),  # type: ignore[assignment]
    outbound: list[dict[str, Any]] | None = None,
) -> str:
    """A group with ``inbound`` permissions and, if given, ``outbound`` ones instead of the
    default allow-all."""
    gid = (await ec2.create_security_group(GroupName=name, Description=name, VpcId=vpc.vpc_id))[
        "GroupId"
    ]
    if inbound:
        await ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=list(inbound))
    if outbound is not None:
        await ec2.revoke_security_group_egress(
            GroupId=gid, IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
        )
        if outbound:
            await ec2.authorize_security_group_egress(GroupId=gid, IpPermissions=outbound)
    return gid  # type: ignore[no-any-return]


def perm(
    protocol: str, low: int | None = None, high: int | None = None, **peer: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {"IpProtocol": protocol}
    if low is not None:
        out["FromPort"] = low
        out["ToPort"] = low if high is None else high
    if "cidr" in peer:
        out["IpRanges"] = [{"CidrIp": peer["cidr"]}]
    if "group" in peer:
        out["UserIdGroupPairs"] = [{"GroupId": peer["group"]}]
    return out


@pytest.fixture(autouse=True)
def host_untouched() -> Any:
    """Nothing of the router's appears in the machine's own namespace."""
    yield
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "podwire_vpc" not in tables


async def test_allowed_and_denied_by_cidr_port_and_protocol(vpc: Vpc) -> None:
    here, there = vpc.add_subnet("10.0.1.0/24"), vpc.add_subnet("10.0.2.0/24")
    async with ec2_client(vpc) as ec2:
        db = await new_group(
            ec2,
            vpc,
            "db",
            [
                perm("tcp", 5432, cidr="10.0.1.0/24"),
                perm("udp", 5353, cidr="10.0.2.0/24"),
                perm("17", 7000, 7001, cidr="10.0.1.0/24"),  # a protocol by number
                perm("icmp", 8, -1, cidr="10.0.1.0/24"),  # echo request, any code
            ],
        )
    server = vpc.add_instance(here, security_groups=[db])
    near, far = vpc.add_instance(here), vpc.add_instance(there)
    for port in (5432, 5433):
        server.serve(port)
    for port in (5353, 7001):
        server.serve(port, "udp")
    ip = server.primary_ip

    allowed_tcp(near, ip, 5432)
    denied_tcp(vpc, near, ip, 5433, server.eni_id)  # port not allowed
    denied_tcp(vpc, far, ip, 5432, server.eni_id)  # CIDR not allowed
    assert near.call(lambda: udp_ask(ip, 7001, ALLOWED_DEADLINE)) is not None
    assert far.call(lambda: udp_ask(ip, 5353, ALLOWED_DEADLINE)) is not None
    assert rises(vpc, server.eni_id, "inbound")(
        lambda: near.call(lambda: udp_ask(ip, 5353, DENIED_WAIT)) is None
    )
    assert ping(near, ip, ALLOWED_DEADLINE)
    assert rises(vpc, server.eni_id, "inbound")(lambda: not ping(far, ip, DENIED_WAIT))


async def test_icmp_type_and_code(vpc: Vpc) -> None:
    async with ec2_client(vpc) as ec2:
        only_timestamps = await new_group(ec2, vpc, "ts", [perm("icmp", 13, 0, cidr="10.0.0.0/16")])
        echo_code_0 = await new_group(ec2, vpc, "echo", [perm("icmp", 8, 0, cidr="10.0.0.0/16")])
    client = vpc.add_instance()
    a = vpc.add_instance(security_groups=[only_timestamps])
    b = vpc.add_instance(security_groups=[echo_code_0])
    assert rises(vpc, a.eni_id, "inbound")(lambda: not ping(client, a.primary_ip, DENIED_WAIT))
    assert ping(client, b.primary_ip, ALLOWED_DEADLINE)


async def test_referenced_group_follows_membership(vpc: Vpc) -> None:
    async with ec2_client(vpc) as ec2:
        app = await new_group(ec2, vpc, "app")
        web = await new_group(ec2, vpc, "web", [perm("tcp", 80, group=app)])
        server = vpc.add_instance(security_groups=[web])
        member = vpc.add_instance(security_groups=[app])
        outsider = vpc.add_instance()
        server.serve(80)
        allowed_tcp(member, server.primary_ip, 80)
        denied_tcp(vpc, outsider, server.primary_ip, 80, server.eni_id)

        # ModifyNetworkInterfaceAttribute Groups changes what an ENI may reach at once.
        await ec2.modify_network_interface_attribute(
            NetworkInterfaceId=outsider.eni_id, Groups=[app]
        )
        allowed_tcp(outsider, server.primary_ip, 80)
        await ec2.modify_network_interface_attribute(NetworkInterfaceId=member.eni_id, Groups=[web])
        denied_tcp(vpc, member, server.primary_ip, 80, server.eni_id)

        # An address the member ENI gains joins the group's addresses at once.
        reply = await ec2.assign_private_ip_addresses(
            NetworkInterfaceId=outsider.eni_id, SecondaryPrivateIpAddressCount=1
        )
    secondary = reply["AssignedPrivateIpAddresses"][0]["PrivateIpAddress"]
    outsider.run("ip", "addr", "add", f"{secondary}/32", "dev", "eth0")
    seen = outsider.call(lambda: tcp_line(server.primary_ip, 80, source=secondary))
    assert seen.startswith(secondary + ":")


async def test_every_address_of_an_eni_is_judged_by_its_groups(vpc: Vpc) -> None:
    async with ec2_client(vpc) as ec2:
        web = await new_group(ec2, vpc, "web", [perm("tcp", 8080, cidr="10.0.0.0/16")])
        node = vpc.add_node("m5.large", security_groups=[web])
        reply = await ec2.assign_private_ip_addresses(
            NetworkInterfaceId=node.eni_id, SecondaryPrivateIpAddressCount=1
        )
        secondary = reply["AssignedPrivateIpAddresses"][0]["PrivateIpAddress"]
        reply = await ec2.assign_private_ip_addresses(
            NetworkInterfaceId=node.eni_id, Ipv4PrefixCount=1
        )
        in_prefix = str(ipaddress.ip_network(reply["AssignedIpv4Prefixes"][0]["Ipv4Prefix"])[5])
    for address in (secondary, in_prefix):  # stand-ins for pods: addresses on the node's lo
        node.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
    node.serve(8080)
    node.serve(9090)
    client = vpc.add_instance()
    for address in (node.primary_ip, secondary, in_prefix):
        allowed_tcp(client, address, 8080)
        denied_tcp(vpc, client, address, 9090, node.eni_id)


async def test_a_reply_no_inbound_rule_allows_still_arrives(vpc: Vpc) -> None:
    async with ec2_client(vpc) as ec2:
        closed = await new_group(ec2, vpc, "closed")  # no inbound rule at all
        open_ = await new_group(ec2, vpc, "open", [perm("-1", cidr="10.0.0.0/16")])
    client = vpc.add_instance(security_groups=[closed])
    server = vpc.add_instance(security_groups=[open_])
    server.serve(6000)
    server.serve(6001, "udp")
    before = vpc.drops(client.eni_id).inbound
    allowed_tcp(client, server.primary_ip, 6000)
    assert client.call(lambda: udp_ask(server.primary_ip, 6001, ALLOWED_DEADLINE)) is not None
    assert ping(client, server.primary_ip, ALLOWED_DEADLINE)
    assert vpc.drops(client.eni_id).inbound == before
    # ... while a connection the other way is refused by that same missing rule.
    client.serve(6000)
    denied_tcp(vpc, server, client.primary_ip, 6000, client.eni_id)


async def test_a_revoked_rule_keeps_open_connections_and_refuses_new_ones(vpc: Vpc) -> None:
    rule = perm("tcp", 7000, cidr="10.0.0.0/16")
    async with ec2_client(vpc) as ec2:
        svc = await new_group(ec2, vpc, "svc", [rule])
        server = vpc.add_instance(security_groups=[svc])
        client = vpc.add_instance()
        server.serve(7000)
        conn = client.call(
            lambda: socket.create_connection((server.primary_ip, 7000), timeout=ALLOWED_DEADLINE)
        )
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"one\n")
            assert lines.readline()
            await ec2.revoke_security_group_ingress(GroupId=svc, IpPermissions=[rule])
            conn.sendall(b"two\n")  # the tracked flow goes on
            assert lines.readline().decode().startswith(client.primary_ip)
            denied_tcp(vpc, client, server.primary_ip, 7000, server.eni_id)
            await ec2.authorize_security_group_ingress(GroupId=svc, IpPermissions=[rule])
            allowed_tcp(client, server.primary_ip, 7000)
            conn.sendall(b"three\n")
            assert lines.readline()


async def test_outbound_rules_are_the_senders(vpc: Vpc) -> None:
    async with ec2_client(vpc) as ec2:
        open_ = await new_group(ec2, vpc, "open", [perm("-1", cidr="10.0.0.0/16")])
        server = vpc.add_instance(security_groups=[open_])
        narrow = await new_group(
            ec2,
            vpc,
            "narrow",
            outbound=[perm("tcp", 5432, cidr=f"{server.primary_ip}/32")],
        )
        mute = await new_group(ec2, vpc, "mute", outbound=[])
    client = vpc.add_instance(security_groups=[narrow])
    silent = vpc.add_instance(security_groups=[mute])
    server.serve(5432)
    server.serve(80)
    allowed_tcp(client, server.primary_ip, 5432)
    before = vpc.drops(server.eni_id).inbound
    denied_tcp(vpc, client, server.primary_ip, 80, client.eni_id, "outbound")
    denied_tcp(vpc, silent, server.primary_ip, 5432, silent.eni_id, "outbound")
    assert vpc.drops(server.eni_id).inbound == before  # never reached the receiver's rules


async def test_the_internet_side_is_judged_on_the_eni_side_only(vpc: Vpc) -> None:
    instance = vpc.add_instance()  # default group: all out, in only from itself
    instance.serve(8443)

    def listen() -> socket.socket:
        server = socket.create_server((vpc.internet_ip, 0))
        server.settimeout(ALLOWED_DEADLINE)
        return server

    listener = vpc.internet.call(listen)
    port = listener.getsockname()[1]
    with listener:
        outgoing = instance.call(
            lambda: socket.create_connection((vpc.internet_ip, port), timeout=ALLOWED_DEADLINE)
        )
        outgoing.close()
        listener.accept()[0].close()

    def from_internet() -> bool:
        return bool(vpc.internet.call(lambda: connect_times_out(instance.primary_ip, 8443)))

    assert rises(vpc, instance.eni_id, "inbound")(from_internet)
    async with ec2_client(vpc) as ec2:
        default = instance.security_groups[0]
        await ec2.authorize_security_group_ingress(
            GroupId=default, IpPermissions=[perm("tcp", 8443, cidr="203.0.113.0/24")]
        )
    seen = vpc.internet.call(lambda: tcp_line(instance.primary_ip, 8443))
    assert seen.startswith(vpc.internet_ip + ":")


async def test_default_group_members_talk_and_others_do_not(vpc: Vpc) -> None:
    async with ec2_client(vpc) as ec2:
        other = await new_group(ec2, vpc, "other")
    a, b = vpc.add_instance(), vpc.add_instance()
    stranger = vpc.add_instance(security_groups=[other])
    b.serve(9000)
    stranger.serve(9000)
    allowed_tcp(a, b.primary_ip, 9000)
    denied_tcp(vpc, stranger, b.primary_ip, 9000, b.eni_id)
    denied_tcp(vpc, a, stranger.primary_ip, 9000, stranger.eni_id)


def control(url: str, path: str) -> Any:
    with urllib.request.urlopen(f"{url}{path}", timeout=10) as reply:
        return json.loads(reply.read())


async def test_drop_counters_over_the_control_endpoint(vpc: Vpc) -> None:
    async with ec2_client(vpc) as ec2:
        closed = await new_group(ec2, vpc, "closed")
    server = vpc.add_instance(security_groups=[closed])
    client = vpc.add_instance()
    server.serve(1234)
    denied_tcp(vpc, client, server.primary_ip, 1234, server.eni_id)
    one = control(vpc.control_url, f"/drops/{server.eni_id}")
    assert one["inbound"] >= 1 and one["outbound"] == 0 and one["frames"] == 0
    every = control(vpc.control_url, "/drops")
    assert set(every) >= {server.eni_id, client.eni_id}
    assert every[server.eni_id]["inbound"] >= one["inbound"]


async def test_enforcement_can_be_switched_off() -> None:
    with Vpc.start(security_groups=False) as vpc:
        async with ec2_client(vpc) as ec2:
            closed = await new_group(ec2, vpc, "closed")
        server = vpc.add_instance(security_groups=[closed])
        client = vpc.add_instance()
        server.serve(4321)
        allowed_tcp(client, server.primary_ip, 4321)  # a group with no inbound rule
        with pytest.raises(RuntimeError):
            vpc.drops(server.eni_id)
        assert "podwire_vpc" not in vpc.router.run("nft", "list", "tables").stdout


def _random_policy(rng: random.Random) -> Policy:
    groups = [f"sg-{g}" for g in "abcd"]

    def rule() -> Rule:
        protocol = rng.choice(["-1", "tcp", "udp", "icmp", "47"])
        low = rng.randint(0, 100)
        return Rule(
            protocol=protocol,
            low=low if protocol != "-1" else -1,
            high=low + rng.randint(0, 5) if protocol in ("tcp", "udp") else -1,
            cidr=rng.choice([None, IPv4Network("10.0.0.0/16"), IPv4Network("0.0.0.0/0")]),
            group=rng.choice([None, *groups]),
        )

    enis = {}
    for i in range(8):
        addresses = {IPv4Network(f"10.0.1.{i * 16 + rng.randint(1, 14)}/32") for _ in range(2)}
        if rng.random() < 0.3:
            addresses.add(IPv4Network(f"10.0.2.{i * 16}/28"))
        enis[f"eni-{i}"] = Eni(
            id=f"eni-{i}",
            addresses=tuple(addresses),
            groups=tuple(rng.sample(groups, rng.randint(0, 3))),
        )
    on_wire = rng.sample(range(8), rng.randint(0, 8))
    return Policy(
        enis=enis,
        groups={
            g: Group(
                id=g,
                inbound=tuple(rule() for _ in range(rng.randint(0, 4))),
                outbound=tuple(rule() for _ in range(rng.randint(0, 2))),
            )
            for g in groups
            if rng.random() < 0.9
        },
        ports=tuple(Port(eni_id=f"eni-{i}", ifname=f"r{i}") for i in on_wire),
        trunks=tuple(
            TrunkCable(eni_id=f"eni-{i}", ifname=f"c{i}", mac=f"02:00:00:00:00:0{i}")
            for i in on_wire
            if i < 3 and rng.random() < 0.5
        ),
    )


def _listing(nft: Nft) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Every object without handles and counts; rules in order, chain by chain."""
    objects: list[str] = []
    rules: dict[str, list[str]] = {}
    for family, table in (("ip", TABLE), ("netdev", FRAMES_TABLE)):
        doc = nft.list_table_json(family, table)
        assert doc is not None
        for item in doc["nftables"]:
            ((kind, body),) = item.items()
            if kind == "metainfo":
                continue
            body = {k: v for k, v in body.items() if k not in ("handle", "packets", "bytes")}
            text = json.dumps({kind: body}, sort_keys=True)
            if kind == "rule":
                rules.setdefault(f"{family} {body['chain']}", []).append(text)
            else:
                objects.append(text)
    return sorted(objects), sorted(rules.items())


def test_deltas_land_where_a_full_apply_would(make_netns: Callable[[str], Any]) -> None:
    """A run of random policies applied as deltas leaves the kernel with exactly what a full
    apply of the last one makes (the renderer's deltas are checked on the real nftables)."""
    by_delta, by_full = make_netns("fwd"), make_netns("fwf")
    for ns in (by_delta, by_full):
        for i in range(3):
            ns.run("ip", "link", "add", f"c{i}", "type", "veth", "peer", "name", f"p{i}")
    rng = random.Random(9)
    delta = Firewall.open(by_delta.name, by_delta.path)
    try:
        for _ in range(12):
            policy = _random_policy(rng)
            delta.apply(policy)
            full = Firewall.open(by_full.name, by_full.path)
            try:
                full.apply(policy)
                with (
                    Nft.open(netns_path=by_delta.path) as a,
                    Nft.open(netns_path=by_full.path) as b,
                ):
                    assert _listing(a) == _listing(b)
            finally:
                full.close()
        assert delta.full_applies == 1 and delta.delta_applies >= 10
    finally:
        delta.close()
