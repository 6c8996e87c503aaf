"""SNAT backends against the real kernel, with real UDP traffic between test namespaces.

    pod1 10.0.1.5 -pwv1-+                                    +-- internet 203.0.113.10
                        node 10.0.0.10 --eth0-- router --+
    pod2 10.0.1.6 -pwv2-+    (VPC 10.0.0.0/16)               +-- vpcpeer 10.0.200.10

internet and vpcpeer run a UDP echo that answers with the source address it saw. internet only
routes back to the node's subnet, so traffic that is not SNATed gets no answer unless a test
adds a route to the pods. Every ask is a new flow, from a source port no other ask used: NAT is
decided on a flow's first packet, and an ask reusing the 5-tuple of an earlier one (a random
ephemeral port can) would follow that flow's conntrack entry (unNATed for up to 30 s after a
timeout, 120 s after an answer) instead of the rules under test.

The backend is applied inside the node namespace: libnftables from a worker thread that entered
it (the context binds to the namespace it was created in), the binaries through ``nsenter
--net=`` (``netns_path``). A module-level check asserts that the machine's own ruleset (nft,
iptables-nft, iptables-legacy) is the same after the tests.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import attrs
import pytest

from agent.snat.backends import IptablesSnat, NftSnat, SnatBackend, choose_backend
from agent.snat.rules import Mode, SnatSpec, diff_sets, parse_nft_listing
from netlink.iptables import IptablesRestore
from netlink.nftables import Nft, WrongNamespace
from netlink.ns import entered_path
from tests.netns import Netns, netns, veth_between

pytestmark = pytest.mark.root

T = TypeVar("T")
PY = sys.executable
PORT = 7777
INTERNET = "203.0.113.10"
VPCPEER = "10.0.200.10"
NODE_IP = "10.0.0.10"
POD1, POD2 = "10.0.1.5", "10.0.1.6"

ECHO = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {PORT}))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(64)
    try:
        s.sendto(addr[0].encode(), addr)
    except OSError:  # no route back to an address that was not SNATed
        pass
"""

ASK = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.settimeout(1.5)
s.sendto(b"?", (sys.argv[1], {PORT}))
try:
    print(s.recvfrom(64)[0].decode())
except TimeoutError:
    print("timeout")
"""


def _host_state() -> dict[str, str]:
    """The machine's own rulesets, without the timestamp comments."""
    out = {}
    for cmd in (["nft", "list", "ruleset"], ["iptables-nft-save"], ["iptables-legacy-save"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        out[cmd[0]] = "\n".join(
            line for line in proc.stdout.splitlines() if not line.startswith("#")
        )
    return out


@pytest.fixture(scope="module", autouse=True)
def host_untouched() -> Iterator[None]:
    before = _host_state()
    yield
    assert _host_state() == before, "the machine's own ruleset changed"


# Source ports of the asks: below the kernel's ephemeral range (32768-60999), so no other
# socket takes them, and each used once per module.
ASK_PORTS = range(20000, 32000)


@attrs.frozen
class Topo:
    node: Netns
    pods: dict[str, Netns]  # pod IP -> namespace
    internet: Netns
    router: Netns
    ports: Iterator[int] = attrs.field(factory=lambda: iter(ASK_PORTS))

    def ask(self, pod_ip: str, dst: str, sport: int | None = None) -> str:
        """Send one datagram from the pod to ``dst``'s echo, as a new flow (from a fresh
        source port unless ``sport`` is given); return the source address it saw."""
        port = next(self.ports) if sport is None else sport
        return self.pods[pod_ip].run(PY, "-c", ASK, dst, str(port)).stdout.strip()


def _mac(ns: Netns, ifname: str) -> str:
    return str(json.loads(ns.run("ip", "-j", "link", "show", ifname).stdout)[0]["address"])


def _wire_pod(node: Netns, pod: Netns, ip: str, host_if: str) -> None:
    veth_between(pod, "eth0", node, host_if)
    pod.run("ip", "addr", "add", f"{ip}/32", "dev", "eth0")
    pod.run("ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    pod.run("ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    pod.run("ip", "neigh", "add", "169.254.1.1", "dev", "eth0", "lladdr", _mac(node, host_if))
    node.run("ip", "route", "add", f"{ip}/32", "dev", host_if, "scope", "link")


@contextlib.contextmanager
def build_topo() -> Iterator[Topo]:
    """Make the namespaces, cable and address them, start the echo servers."""
    with (
        netns("snode") as node,
        netns("spod1") as pod1,
        netns("spod2") as pod2,
        netns("srouter") as router,
        netns("sinet") as internet,
        netns("speer") as peer,
    ):
        for ns in (node, router):
            ns.sysctl("net.ipv4.ip_forward", "1")
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")
        veth_between(node, "eth0", router, "r-node")
        veth_between(router, "r-inet", internet, "eth0")
        veth_between(router, "r-peer", peer, "eth0")
        node.run("ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        node.run("ip", "route", "add", "default", "via", "10.0.0.1")
        router.run("ip", "addr", "add", "10.0.0.1/24", "dev", "r-node")
        router.run("ip", "addr", "add", "203.0.113.1/24", "dev", "r-inet")
        router.run("ip", "addr", "add", "10.0.200.1/24", "dev", "r-peer")
        router.run("ip", "route", "add", "10.0.1.0/24", "via", NODE_IP)  # the VPC knows pod IPs
        internet.run("ip", "addr", "add", f"{INTERNET}/24", "dev", "eth0")
        internet.run("ip", "route", "add", "10.0.0.0/24", "via", "203.0.113.1")  # node only
        peer.run("ip", "addr", "add", f"{VPCPEER}/24", "dev", "eth0")
        peer.run("ip", "route", "add", "default", "via", "10.0.200.1")
        _wire_pod(node, pod1, POD1, "pwv1")
        _wire_pod(node, pod2, POD2, "pwv2")
        servers = [ns.popen([PY, "-c", ECHO], stdout=subprocess.PIPE) for ns in (internet, peer)]
        try:
            for proc in servers:
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == b"ready"
            yield Topo(node=node, pods={POD1: pod1, POD2: pod2}, internet=internet, router=router)
        finally:
            for proc in servers:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def topo() -> Iterator[Topo]:
    with build_topo() as t:
        yield t


class InNode:
    """A backend opened and called inside the node namespace.

    ``libnftables``: opened in a worker thread that entered the namespace, and every call made
    from such a thread (the backend checks it). The binaries: opened with ``netns_path``.
    """

    def __init__(self, kind: str, node: Netns) -> None:
        self.kind = kind
        self.node = node
        self._pool = ThreadPoolExecutor(max_workers=1)
        self.backend: SnatBackend = self.call(self._open)

    def _open(self) -> SnatBackend:
        if self.kind == "libnftables":
            nft = NftSnat(Nft.open(prefer_library=True))
            assert nft.kind == "libnftables"
            return nft
        if self.kind == "nft":
            return NftSnat(Nft.open(prefer_library=False, netns_path=self.node.path))
        return IptablesSnat(IptablesRestore(self.kind, netns_path=self.node.path))

    def call(self, fn: Callable[[], T]) -> T:
        def entered() -> T:
            with entered_path(self.node.path):
                return fn()

        return self._pool.submit(entered).result()

    def apply(self, spec: SnatSpec) -> None:
        self.call(lambda: self.backend.apply(spec))

    def matches(self, spec: SnatSpec) -> bool:
        return self.call(lambda: self.backend.current_spec_matches(spec))

    def close(self) -> None:
        try:
            self.call(self.backend.remove)
            self.call(self.backend.close)
        finally:
            self._pool.shutdown()


BACKENDS = ["libnftables", "nft", "iptables-nft", "iptables-legacy"]
SPEC = SnatSpec(pod_cidrs=(f"{POD1}/32",), vpc_cidrs=("10.0.0.0/16",), node_ip=NODE_IP)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, topo: Topo) -> Iterator[InNode]:
    b = InNode(request.param, topo.node)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def pod_route_in_internet(topo: Topo) -> Iterator[None]:
    topo.internet.run("ip", "route", "add", "10.0.1.0/24", "via", "203.0.113.1")
    try:
        yield
    finally:
        topo.internet.run("ip", "route", "del", "10.0.1.0/24", "via", "203.0.113.1")


def test_without_snat_internet_cannot_answer_pods(topo: Topo) -> None:
    assert topo.ask(POD1, INTERNET) == "timeout"
    assert topo.ask(POD1, VPCPEER) == POD1


def test_snat_to_internet_not_to_vpc(topo: Topo, backend: InNode) -> None:
    backend.apply(SPEC)
    assert backend.matches(SPEC)
    assert topo.ask(POD1, INTERNET) == NODE_IP
    assert topo.ask(POD1, VPCPEER) == POD1
    # pod2 is not in pod_cidrs: its traffic is not ours to SNAT
    assert topo.ask(POD2, INTERNET) == "timeout"


@pytest.mark.parametrize("mode", ["none", "hashrandom"])
def test_other_modes_still_snat(topo: Topo, backend: InNode, mode: Mode) -> None:
    spec = attrs.evolve(SPEC, mode=mode)
    backend.apply(spec)
    assert backend.matches(spec)
    assert not backend.matches(SPEC)
    assert topo.ask(POD1, INTERNET) == NODE_IP


@pytest.mark.usefixtures("pod_route_in_internet")
def test_excluded_cidr_and_external_snat_keep_pod_address(topo: Topo, backend: InNode) -> None:
    backend.apply(SPEC)
    assert topo.ask(POD1, INTERNET) == NODE_IP
    excluded = attrs.evolve(SPEC, excluded_cidrs=("203.0.113.0/24",))
    backend.apply(excluded)
    assert backend.matches(excluded)
    assert topo.ask(POD1, INTERNET) == POD1
    external = attrs.evolve(SPEC, external_snat=True)
    backend.apply(external)
    assert backend.matches(external)
    assert topo.ask(POD1, INTERNET) == POD1


def _break(kind: str, node: Netns) -> None:
    if kind in ("libnftables", "nft"):
        node.run("nft", "flush", "table", "ip", "podwire")
    else:
        node.run(f"{kind}", "-t", "nat", "-F", "PODWIRE-SNAT")


def test_flushed_state_is_detected_and_reapply_restores_it(topo: Topo, backend: InNode) -> None:
    backend.apply(SPEC)
    _break(backend.kind, topo.node)
    assert not backend.matches(SPEC)
    assert topo.ask(POD1, INTERNET) == "timeout"
    backend.apply(SPEC)
    assert backend.matches(SPEC)
    assert topo.ask(POD1, INTERNET) == NODE_IP
    backend.apply(SPEC)  # idempotent
    assert backend.matches(SPEC)


def test_update_changes_which_pod_is_snatted(topo: Topo, backend: InNode) -> None:
    both = attrs.evolve(SPEC, pod_cidrs=(f"{POD1}/32", f"{POD2}/32"))
    only2 = attrs.evolve(SPEC, pod_cidrs=(f"{POD2}/32",))
    delta = backend.kind in ("libnftables", "nft")
    backend.apply(SPEC)
    assert backend.call(lambda: backend.backend.update(SPEC, both)) == (
        "delta" if delta else "full"
    )
    assert backend.matches(both)
    assert topo.ask(POD2, INTERNET) == NODE_IP
    assert topo.ask(POD1, INTERNET) == NODE_IP
    assert backend.call(lambda: backend.backend.update(both, only2)) in ("delta", "full")
    assert backend.matches(only2)
    assert topo.ask(POD2, INTERNET) == NODE_IP
    assert topo.ask(POD1, INTERNET) == "timeout"
    assert backend.call(lambda: backend.backend.update(only2, only2)) == "unchanged"


def test_a_reused_flow_escapes_a_new_snat_rule_so_asks_never_reuse_one(topo: Topo) -> None:
    # The race behind test_update_changes_which_pod_is_snatted's rare 'timeout': an ask whose
    # random source port matched an earlier flow of the same pod that the NAT rules had looked
    # at and left alone (a null binding: its conntrack entry is never NATed afterwards).
    b = InNode("libnftables", topo.node)
    try:
        b.apply(SPEC)  # pod1 only
        sport = next(topo.ports)
        assert topo.ask(POD2, INTERNET, sport=sport) == "timeout"
        b.apply(attrs.evolve(SPEC, pod_cidrs=(f"{POD1}/32", f"{POD2}/32")))
        assert topo.ask(POD2, INTERNET, sport=sport) == "timeout"  # the old flow, not the rule
        assert topo.ask(POD2, INTERNET) == NODE_IP  # a new flow is SNATed
    finally:
        b.close()


def test_remove_leaves_nothing(topo: Topo, backend: InNode) -> None:
    backend.apply(SPEC)
    backend.call(backend.backend.remove)
    backend.call(backend.backend.remove)  # already gone: fine
    assert not backend.matches(SPEC)
    assert "podwire" not in topo.node.run("nft", "list", "ruleset").stdout
    for save in ("iptables-nft-save", "iptables-legacy-save"):
        assert "PODWIRE" not in topo.node.run(save).stdout
    assert topo.ask(POD1, INTERNET) == "timeout"


def test_nft_delta_that_does_not_fit_the_kernel_fails_whole(topo: Topo) -> None:
    with NftSnat(Nft.open(netns_path=topo.node.path)) as nft:
        nft.apply(SPEC)
        wrong_old = attrs.evolve(SPEC, pod_cidrs=("10.0.9.9/32",))
        new = attrs.evolve(SPEC, pod_cidrs=(f"{POD2}/32",))
        with pytest.raises(Exception) as info:
            nft.apply_delta(diff_sets(wrong_old, new))
        assert "does not exist" in str(info.value) or "No such file" in str(info.value)
        assert nft.current_spec_matches(SPEC)  # nothing changed
        assert nft.update(wrong_old, new) == "full"  # update falls back to a full apply
        assert nft.current_spec_matches(new)
        nft.remove()


def test_library_and_binary_see_the_same_table(topo: Topo) -> None:
    spec = attrs.evolve(SPEC, excluded_cidrs=("198.51.100.0/24", "192.0.2.0/24"))
    with (
        NftSnat(Nft.open(prefer_library=True, netns_path=topo.node.path)) as lib,
        NftSnat(Nft.open(prefer_library=False, netns_path=topo.node.path)) as binary,
    ):
        assert (lib.kind, binary.kind) == ("libnftables", "nft")
        lib.apply(spec)
        by_lib, by_bin = lib.listing(), binary.listing()
        assert by_lib is not None and by_bin is not None
        assert parse_nft_listing(by_lib) == parse_nft_listing(by_bin)
        assert lib.nft.run("list table ip podwire") == binary.nft.run("list table ip podwire")
        binary.apply(spec)
        assert lib.current_spec_matches(spec) and binary.current_spec_matches(spec)
        lib.remove()
        assert lib.listing() is None and binary.listing() is None


def test_thread_bound_context_refuses_calls_from_another_namespace(topo: Topo) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:

        def open_inside() -> NftSnat:
            with entered_path(topo.node.path):
                return NftSnat(Nft.open())

        nft = pool.submit(open_inside).result()
    try:
        with pytest.raises(WrongNamespace):
            nft.apply(SPEC)  # this thread is in the machine's namespace
    finally:
        nft.close()


def test_choose_backend(topo: Topo) -> None:
    auto = choose_backend("auto", netns_path=topo.node.path)
    assert auto.kind == "libnftables"
    auto.close()
    ipt = choose_backend("iptables", netns_path=topo.node.path)
    assert ipt.kind == "iptables"


def test_connmark_steers_pod_egress_to_the_main_table(topo: Topo, backend: InNode) -> None:
    """Like a pod on a secondary ENI: ``from pod lookup 100`` (1536) where table 100 cannot reach
    the internet; only the connmark bit plus ``fwmark 0x80/0x80 lookup main`` (1024) gets the
    pod's internet traffic out, while VPC traffic keeps using the ENI table."""
    node = topo.node
    node.run("ip", "route", "add", "10.0.0.0/16", "via", "10.0.0.1", "table", "100")
    node.run("ip", "route", "add", "blackhole", "default", "table", "100")
    node.run("ip", "rule", "add", "from", f"{POD1}/32", "lookup", "100", "pref", "1536")
    node.run("ip", "rule", "add", "fwmark", "0x80/0x80", "lookup", "main", "pref", "1024")
    try:
        assert topo.ask(POD1, INTERNET) == "timeout"  # blackholed: no mark yet
        backend.apply(SPEC)
        assert topo.ask(POD1, INTERNET) == NODE_IP
        assert topo.ask(POD1, VPCPEER) == POD1
    finally:
        node.run("ip", "rule", "del", "pref", "1024")
        node.run("ip", "rule", "del", "pref", "1536")
        node.run("ip", "route", "flush", "table", "100")
