"""An in-memory cloud for the refiller's tests: ENIs with secondary IPs and /28 prefixes, the
instance's limits, a subnet that can run out, and per-operation injected errors and delays
(cilium's fake EC2, in the small). Every call is logged with the (virtual) time it started."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import anyio
import attrs

from agent.pool.pool_math import InstanceLimits
from cloud.errors import LimitExceeded, NotFound, SubnetExhausted
from cloud.provider import AddressBlock, NodeFacts, group_key


@attrs.frozen(kw_only=True)
class FakeEni:
    eni_id: str
    device_index: int
    primary: bool = False
    no_manage: bool = False
    ips: tuple[IPv4Address, ...] = ()
    prefixes: tuple[IPv4Network, ...] = ()
    pod_groups: tuple[str, ...] = ()  # made for a set of security groups (eni mode)

    @property
    def group(self) -> str:
        return group_key(self.pod_groups)

    @property
    def security_groups(self) -> tuple[str, ...]:
        return self.pod_groups or ("sg-node",)

    @property
    def table(self) -> int | None:
        return None if self.device_index == 0 else self.device_index + 1

    @property
    def pool_ips(self) -> tuple[IPv4Address, ...]:
        return self.ips + tuple(ip for p in self.prefixes for ip in p)

    def block(self) -> AddressBlock:
        return AddressBlock(
            owner=self.eni_id, ips=self.pool_ips, table=self.table, group=self.group
        )


@attrs.frozen
class Call:
    op: str
    at: float
    args: tuple[Any, ...]


class FakeCloudProvider:
    """Stateful fake of ``AwsProvider``'s pool side (``agent.pool.refiller.PoolCloud``)."""

    name = "fake-aws"
    can_grow = True

    def __init__(
        self,
        limits: InstanceLimits,
        *,
        ips_left: int = 10_000,
        prefixes_left: int = 1_000,
    ) -> None:
        self.limits = limits
        self.ips_left = ips_left
        self.prefixes_left = prefixes_left
        self.cloud: dict[str, FakeEni] = {}  # the truth
        self.view: dict[str, FakeEni] = {}  # what the provider believes (may be stale)
        self.calls: list[Call] = []
        self.errors: dict[str, list[Exception]] = defaultdict(list)
        self.delays: dict[str, float] = {}
        self._next_ip = int(IPv4Address("10.0.0.10"))
        self._next_prefix = int(IPv4Address("10.1.0.0"))
        self._seq = 0
        self.add_eni(device_index=0, primary=True)

    def __repr__(self) -> str:
        return f"<FakeCloudProvider enis={len(self.cloud)} calls={len(self.calls)}>"

    # -- test controls ----------------------------------------------------------------------

    def inject(self, op: str, error: Exception, times: int = 1) -> None:
        """The next ``times`` calls of ``op`` raise ``error``."""
        self.errors[op] += [error] * times

    def add_eni(
        self,
        *,
        device_index: int,
        primary: bool = False,
        ips: int = 0,
        prefixes: int = 0,
        no_manage: bool = False,
        pod_groups: Sequence[str] = (),
    ) -> FakeEni:
        """Put an ENI in the cloud and in the provider's view (as if inventory found it)."""
        eni = FakeEni(
            eni_id=f"eni-{self._seq:04d}",
            device_index=device_index,
            primary=primary,
            no_manage=no_manage,
            ips=self._take_ips(ips),
            prefixes=self._take_prefixes(prefixes),
            pod_groups=tuple(sorted(pod_groups)),
        )
        self._seq += 1
        self.cloud[eni.eni_id] = self.view[eni.eni_id] = eni
        return eni

    def ops(self, *names: str) -> list[Call]:
        return [c for c in self.calls if not names or c.op in names]

    def times(self, *names: str) -> list[float]:
        return [c.at for c in self.ops(*names)]

    # -- helpers ----------------------------------------------------------------------------

    async def _enter(self, op: str, *args: object) -> None:
        self.calls.append(Call(op, anyio.current_time(), args))
        delay = self.delays.get(op, 0.0)
        if delay:
            await anyio.sleep(delay)
        if self.errors[op]:
            raise self.errors[op].pop(0)

    def _take_ips(self, n: int) -> tuple[IPv4Address, ...]:
        if n > self.ips_left:
            raise SubnetExhausted("InsufficientFreeAddressesInSubnet")
        self.ips_left -= n
        out = tuple(IPv4Address(self._next_ip + i) for i in range(n))
        self._next_ip += n
        return out

    def _take_prefixes(self, n: int) -> tuple[IPv4Network, ...]:
        if n > self.prefixes_left:
            raise SubnetExhausted("InsufficientCidrBlocks")
        self.prefixes_left -= n
        out = tuple(IPv4Network((self._next_prefix + 16 * i, 28)) for i in range(n))
        self._next_prefix += 16 * n
        return out

    def _room(self, eni: FakeEni) -> int:
        return self.limits.slots_per_eni - len(eni.ips) - len(eni.prefixes)

    def _get(self, eni_id: str) -> FakeEni:
        try:
            return self.cloud[eni_id]
        except KeyError:
            raise NotFound(
                "DescribeNetworkInterfaces", "InvalidNetworkInterfaceID.NotFound"
            ) from None

    def _set(self, eni: FakeEni) -> None:
        self.cloud[eni.eni_id] = self.view[eni.eni_id] = eni

    # -- Provider ---------------------------------------------------------------------------

    async def inventory(self) -> Sequence[AddressBlock]:
        self.view = dict(self.cloud)
        return [e.block() for e in self.enis() if not e.no_manage]

    def facts(self) -> NodeFacts:
        return NodeFacts(primary_ip=IPv4Address("10.0.0.4"), vpc_cidrs=(), pod_cidrs=())

    # -- PoolCloud --------------------------------------------------------------------------

    def enis(self) -> list[FakeEni]:
        return sorted(self.view.values(), key=lambda e: e.device_index)

    async def assign_ips(self, eni_id: str, count: int) -> AddressBlock:
        await self._enter("assign_ips", eni_id, count)
        eni = self._get(eni_id)
        if count > self._room(eni):
            raise LimitExceeded("PrivateIpAddressLimitExceeded", "AssignPrivateIpAddresses")
        new = self._take_ips(count)
        self._set(attrs.evolve(eni, ips=eni.ips + new))
        return AddressBlock(owner=eni_id, ips=new, table=eni.table, group=eni.group)

    async def assign_prefixes(self, eni_id: str, count: int) -> AddressBlock:
        await self._enter("assign_prefixes", eni_id, count)
        eni = self._get(eni_id)
        if count > self._room(eni):
            raise LimitExceeded("PrivateIpAddressLimitExceeded", "AssignPrivateIpAddresses")
        new = self._take_prefixes(count)
        self._set(attrs.evolve(eni, prefixes=eni.prefixes + new))
        return AddressBlock(owner=eni_id, ips=tuple(ip for p in new for ip in p), table=eni.table)

    async def create_eni(
        self, *, ip_count: int = 0, prefix_count: int = 0, pod_groups: Sequence[str] = ()
    ) -> AddressBlock:
        await self._enter("create_eni", ip_count, prefix_count, *pod_groups)
        if len(self.cloud) >= self.limits.max_enis:
            raise LimitExceeded("AttachmentLimitExceeded", "AttachNetworkInterface")
        used = {e.device_index for e in self.cloud.values()}
        index = min(i for i in range(1, self.limits.max_enis) if i not in used)
        eni = self.add_eni(
            device_index=index, ips=ip_count, prefixes=prefix_count, pod_groups=pod_groups
        )
        return eni.block()

    async def release_ips(self, eni_id: str, ips: Sequence[IPv4Address]) -> None:
        await self._enter("release_ips", eni_id, tuple(ips))
        eni = self._get(eni_id)
        self.ips_left += len(ips)
        self._set(attrs.evolve(eni, ips=tuple(i for i in eni.ips if i not in set(ips))))

    async def release_prefixes(self, eni_id: str, prefixes: Sequence[IPv4Network]) -> None:
        await self._enter("release_prefixes", eni_id, tuple(prefixes))
        eni = self._get(eni_id)
        self.prefixes_left += len(prefixes)
        gone = set(prefixes)
        self._set(attrs.evolve(eni, prefixes=tuple(p for p in eni.prefixes if p not in gone)))

    async def free_eni(self, eni_id: str) -> None:
        await self._enter("free_eni", eni_id)
        self.cloud.pop(eni_id, None)
        self.view.pop(eni_id, None)

    async def resync_eni(self, eni_id: str) -> AddressBlock:
        await self._enter("resync_eni", eni_id)
        try:
            eni = self._get(eni_id)
        except NotFound:
            self.view.pop(eni_id, None)
            raise
        self.view[eni_id] = eni
        return eni.block()


# --- a trunk's branch ENIs (agent.sg) ---------------------------------------------------------


@attrs.frozen(kw_only=True)
class FakeAssociation:
    association_id: str
    branch_id: str
    vlan: int


class FakeTrunk:
    """In-memory ``cloud.trunk.BranchCloud``: branch ENIs and the trunk's associations, with
    EC2's refusals (VLAN taken, branch limit), client-token idempotency, and per-operation
    injected errors and delays. Calls are logged with the (virtual) time they started."""

    trunk_id = "eni-trunk"

    def __init__(self, limit: int = 9, subnet: str = "10.0.0.0/24") -> None:
        from cloud.trunk import BranchEni

        self._branch_cls = BranchEni
        self.limit = limit
        self.subnet = IPv4Network(subnet)
        self.enis: dict[str, Any] = {}  # eni id -> BranchEni
        self.assocs: dict[str, FakeAssociation] = {}  # association id -> association
        self.tokens: dict[str, str] = {}  # create client token -> eni id
        self.calls: list[Call] = []
        self.errors: dict[str, list[Exception]] = defaultdict(list)
        self.delays: dict[str, float] = {}
        self._seq = 0
        self._next_ip = int(self.subnet.network_address) + 10

    def __repr__(self) -> str:
        return f"<FakeTrunk enis={len(self.enis)} associations={len(self.assocs)}>"

    def inject(self, op: str, error: Exception, times: int = 1) -> None:
        self.errors[op] += [error] * times

    def ops(self, *names: str) -> list[Call]:
        return [c for c in self.calls if not names or c.op in names]

    def times(self, *names: str) -> list[float]:
        return [c.at for c in self.ops(*names)]

    async def _enter(self, op: str, *args: object) -> None:
        self.calls.append(Call(op, anyio.current_time(), args))
        delay = self.delays.get(op, 0.0)
        if delay:
            await anyio.sleep(delay)
        if self.errors[op]:
            raise self.errors[op].pop(0)

    def add_foreign(self, vlan: int) -> FakeAssociation:
        """A branch someone else (EKS's controller) associated with the trunk."""
        self._seq += 1
        a = FakeAssociation(
            association_id=f"trunk-assoc-x{self._seq}", branch_id=f"eni-x{self._seq}", vlan=vlan
        )
        self.assocs[a.association_id] = a
        return a

    def leak(self, vlan: int, *, associated: bool) -> Any:
        """A branch with our tags that no record knows (a workflow that died)."""
        eni = self._make(vlan, (), "")
        if associated:
            self._seq += 1
            a = FakeAssociation(
                association_id=f"trunk-assoc-{self._seq:04d}", branch_id=eni.eni_id, vlan=vlan
            )
            self.assocs[a.association_id] = a
            self.enis[eni.eni_id] = attrs.evolve(eni, status="associated")
        return self.enis[eni.eni_id]

    def _make(self, vlan: int, groups: tuple[str, ...], pod: str) -> Any:
        self._seq += 1
        eni = self._branch_cls(
            eni_id=f"eni-b{self._seq:04d}",
            mac=f"02:00:00:00:{self._seq // 256:02x}:{self._seq % 256:02x}",
            ip=IPv4Address(self._next_ip),
            subnet_cidr=self.subnet,
            groups=groups,
            vlan=vlan,
            pod=pod,
            created_at=anyio.current_time(),
        )
        self._next_ip += 1
        self.enis[eni.eni_id] = eni
        return eni

    # -- BranchCloud ------------------------------------------------------------------------

    async def create_branch(
        self, *, vlan: int, groups: Sequence[str], pod: str, client_token: str
    ) -> Any:
        await self._enter("create_branch", vlan, tuple(groups))
        if client_token in self.tokens and self.tokens[client_token] in self.enis:
            return self.enis[self.tokens[client_token]]
        for g in groups:
            if not g.startswith("sg-"):
                raise NotFound("CreateNetworkInterface", "InvalidSecurityGroupID.NotFound", g)
        eni = self._make(vlan, tuple(groups), pod)
        self.tokens[client_token] = eni.eni_id
        return eni

    async def associate(self, *, branch_id: str, vlan: int, client_token: str) -> str:
        await self._enter("associate", branch_id, vlan)
        from cloud.errors import CloudRequestFailed

        for a in self.assocs.values():
            if a.branch_id == branch_id:
                return a.association_id
            if a.vlan == vlan:
                raise CloudRequestFailed(
                    "AssociateTrunkInterface", "InvalidParameterValue", "vlan taken"
                )
        if len(self.assocs) >= self.limit:
            raise CloudRequestFailed("AssociateTrunkInterface", "InvalidParameterValue", "limit")
        if branch_id not in self.enis:
            raise NotFound("AssociateTrunkInterface", "InvalidNetworkInterfaceID.NotFound")
        self._seq += 1
        a = FakeAssociation(
            association_id=f"trunk-assoc-{self._seq:04d}", branch_id=branch_id, vlan=vlan
        )
        self.assocs[a.association_id] = a
        self.enis[branch_id] = attrs.evolve(self.enis[branch_id], status="associated")
        return a.association_id

    async def disassociate(self, association_id: str) -> None:
        await self._enter("disassociate", association_id)
        a = self.assocs.pop(association_id, None)
        if a is not None and a.branch_id in self.enis:
            self.enis[a.branch_id] = attrs.evolve(self.enis[a.branch_id], status="available")

    async def delete_branch(self, eni_id: str) -> None:
        await self._enter("delete_branch", eni_id)
        self.enis.pop(eni_id, None)
        for aid, a in list(self.assocs.items()):
            if a.branch_id == eni_id:
                del self.assocs[aid]

    async def set_groups(self, eni_id: str, groups: Sequence[str]) -> None:
        await self._enter("set_groups", eni_id, tuple(groups))
        if eni_id not in self.enis:
            raise NotFound("ModifyNetworkInterfaceAttribute", "InvalidNetworkInterfaceID.NotFound")
        for g in groups:
            if not g.startswith("sg-"):
                raise NotFound(
                    "ModifyNetworkInterfaceAttribute", "InvalidSecurityGroupID.NotFound", g
                )
        self.enis[eni_id] = attrs.evolve(self.enis[eni_id], groups=tuple(groups))

    async def branches(self) -> list[Any]:
        await self._enter("branches")
        return list(self.enis.values())

    async def associations(self) -> list[Any]:
        await self._enter("associations")
        from cloud.trunk import BranchAssociation

        return [
            BranchAssociation(association_id=a.association_id, branch_id=a.branch_id, vlan=a.vlan)
            for a in self.assocs.values()
        ]
