"""In-memory stand-ins for the kernel-facing layer, for the fast unit tests of the core."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from agent.gc import PolicyRule
from agent.netns_holders import NetnsFact
from cloud.provider import AddressBlock, NodeFacts
from netlink.errors import NetlinkError, NetnsNotFound
from netlink.veth import PodNet, WiredPod
from netlink.watcher import RuleEvent


class FakeDatapath:
    """Pods as records; namespaces are a set of paths the test says exist."""

    def __init__(self) -> None:
        self.netns: set[str] = set()
        self.node_netns: set[str] = set()  # paths that name the node's own namespace
        self.pods: dict[str, PodNet] = {}  # host veth -> pod
        self.routes: set[str] = set()  # host veths whose host route exists
        self.fail_wire: Exception | None = None
        self.wire_delay = 0.0
        self.deleted: list[str] = []
        self.calls: list[str] = []
        self.rules: list[RuleEvent] = []  # host policy rules, for GC

    def _mac(self, name: str, side: int) -> str:
        return f"02:00:00:00:{side:02x}:{abs(hash(name)) % 256:02x}"

    def is_node_netns(self, path: str) -> bool:
        return path in self.node_netns

    async def wire(self, pod: PodNet) -> WiredPod:
        self.calls.append(f"wire {pod.host_veth}")
        if self.wire_delay:
            await anyio.sleep(self.wire_delay)
        if pod.netns not in self.netns:
            raise NetnsNotFound(pod.netns)
        if self.fail_wire is not None:
            raise self.fail_wire
        if pod.host_veth in self.pods:
            raise NetlinkError(f"{pod.host_veth} exists")
        self.pods[pod.host_veth] = pod
        self.routes.add(pod.host_veth)
        return WiredPod(
            pod_mac=self._mac(pod.host_veth, 1),
            host_mac=self._mac(pod.host_veth, 2),
            pod_ifindex=2,
            host_ifindex=10,
        )

    async def check(self, pod: PodNet) -> list[str]:
        if pod.netns not in self.netns:
            raise NetnsNotFound(pod.netns)
        missing = []
        if pod.host_veth not in self.pods:
            missing.append(f"host veth {pod.host_veth}")
        if pod.host_veth not in self.routes:
            missing.append(f"host route {pod.ip}/32")
        return missing

    async def unwire_host(self, pod: PodNet) -> None:
        self.calls.append(f"unwire {pod.host_veth}")
        self.routes.discard(pod.host_veth)

    async def park_links(
        self, names: list[str], group: int
    ) -> tuple[dict[str, int], dict[str, Exception]]:
        self.calls.append(f"park {len(names)}")
        index = {name: i for i, name in enumerate(self.pods, start=10)}
        return {n: index[n] for n in names if n in index}, {}

    async def delete_parked(self, names: list[str], group: int) -> None:
        self.calls.append(f"delete batch {len(names)}")
        await anyio.sleep(0.02)  # one kernel wait for the whole batch
        for name in names:
            self.pods.pop(name, None)
            self.routes.discard(name)  # the routes go with the link
            self.deleted.append(name)

    async def host_veths(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.pods, start=10)}

    async def link_exists(self, name: str) -> bool:
        return name in self.pods

    # -- what GC needs beyond the CNI service (agent.gc.GcKernel) --

    async def policy_rules(self) -> list[RuleEvent]:
        return list(self.rules)

    async def delete_rules(self, rules: Sequence[PolicyRule]) -> None:
        self.calls.append(f"delete rules {len(rules)}")
        gone = {(r.priority, r.ip) for r in rules}
        self.rules = [
            r for r in self.rules if (r.priority, r.src if r.src is not None else r.dst) not in gone
        ]


class FakeNetnsProbe:
    """agent.gc's Probe over a FakeDatapath: a path exists while it is in ``dp.netns``, and is
    held while it is also in ``held``."""

    def __init__(self, dp: FakeDatapath) -> None:
        self.dp = dp
        self.held: set[str] = set()
        self.calls = 0

    async def __call__(self, paths: Sequence[str]) -> dict[str, NetnsFact]:
        self.calls += 1
        return {
            p: NetnsFact(exists=p in self.dp.netns, held=p in self.dp.netns and p in self.held)
            for p in paths
        }


class FakeProvider:
    name = "fake"

    def __init__(self, blocks: Sequence[AddressBlock], can_grow: bool = False) -> None:
        self.blocks = list(blocks)
        self.can_grow = can_grow

    async def inventory(self) -> Sequence[AddressBlock]:
        return self.blocks

    def facts(self) -> NodeFacts:
        return NodeFacts(primary_ip=None, vpc_cidrs=(), pod_cidrs=())
