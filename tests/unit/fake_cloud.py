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
from cloud.provider import AddressBlock, NodeFacts


@attrs.frozen(kw_only=True)
class FakeEni:
    eni_id: str
    device_index: int
    primary: bool = False
    no_manage: bool = False
    ips: tuple[IPv4Address, ...] = ()
    prefixes: tuple[IPv4Network, ...] = ()

    @property
    def table(self) -> int | None:
        return None if self.device_index == 0 else self.device_index + 1

    @property
    def pool_ips(self) -> tuple[IPv4Address, ...]:
        return self.ips + tuple(ip for p in self.prefixes for ip in p)

    def block(self) -> AddressBlock:
        return AddressBlock(owner=self.eni_id, ips=self.pool_ips, table=self.table)


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
    ) -> FakeEni:
        """Put an ENI in the cloud and in the provider's view (as if inventory found it)."""
        eni = FakeEni(
            eni_id=f"eni-{self._seq:04d}",
            device_index=device_index,
            primary=primary,
            no_manage=no_manage,
            ips=self._take_ips(ips),
            prefixes=self._take_prefixes(prefixes),
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
        return AddressBlock(owner=eni_id, ips=new, table=eni.table)

    async def assign_prefixes(self, eni_id: str, count: int) -> AddressBlock:
        await self._enter("assign_prefixes", eni_id, count)
        eni = self._get(eni_id)
        if count > self._room(eni):
            raise LimitExceeded("PrivateIpAddressLimitExceeded", "AssignPrivateIpAddresses")
        new = self._take_prefixes(count)
        self._set(attrs.evolve(eni, prefixes=eni.prefixes + new))
        return AddressBlock(owner=eni_id, ips=tuple(ip for p in new for ip in p), table=eni.table)

    async def create_eni(self, *, ip_count: int = 0, prefix_count: int = 0) -> AddressBlock:
        await self._enter("create_eni", ip_count, prefix_count)
        if len(self.cloud) >= self.limits.max_enis:
            raise LimitExceeded("AttachmentLimitExceeded", "AttachNetworkInterface")
        used = {e.device_index for e in self.cloud.values()}
        index = min(i for i in range(1, self.limits.max_enis) if i not in used)
        eni = self.add_eni(device_index=index, ips=ip_count, prefixes=prefix_count)
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
