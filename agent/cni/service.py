"""The CNI verbs: ADD, DEL, CHECK, GC and STATUS over the pool, the datapath and the checkpoint.

Theory of operation:

- One operation per key (network, container ID, ifname) at a time (``KeyLocks``).
- ADD assigns an address and records the allocation in the checkpoint *before* wiring, so an
  agent killed mid-ADD restarts knowing the address is taken; at start an allocation whose host
  veth never appeared is dropped (its address cools down), one whose veth exists is kept (the
  runtime will DEL it after the failed ADD, or ADD it again). A failed ADD undoes itself —
  links, address, record — before answering.
- DEL undoes what ADD made before it answers: the host rules (pods of a secondary ENI), then the
  veth pair, deleted in a round shared with every other deletion in flight and answered as soon
  as the kernel has unlisted the links (``agent.cni.deleter``); the pair's routes go with it.
  Only then does the address start its cooldown, recorded in the checkpoint.
- DEL is idempotent and succeeds when the allocation or the netns is already gone. GC releases
  its attachments the same way, concurrently, so they share rounds too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc

from agent.checkpoint import Allocation, Checkpoint, Snapshot, snapshot_of
from agent.cni.deleter import LinkDeleter
from agent.cni.spec import (
    CHECK_FAILED,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    STATUS_UNAVAILABLE,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    AddOutcome,
    CniError,
    CniRequest,
    PodKey,
    prev_result_ip,
    render_add_result,
)
from agent.events import EventBus
from agent.pool.ipam import AddressTaken, AddressUnknown, IpPool, Lease, PoolExhausted
from agent.sg.branches import BranchRecord
from agent.sg.records import SetMembership, SgAttachment
from agent.trace import mark
from cloud.provider import Provider
from netlink.errors import LinkExists, NetlinkError, NetnsNotFound, NotANetns
from netlink.names import host_veth_name, host_veth_names
from netlink.veth import PodNet, WiredPod
from netlink.vlan import BranchLink
from netlink.vlan import link_name as branch_link_name

log = logging.getLogger("podwire.cni")


class SgHook(Protocol):
    """Security groups for pods as the CNI service sees them (``agent.sg.service.SgService``):
    a pod with groups gets its address from its branch ENI (not from the pool), or in eni mode
    from its set's group of the pool (then it is wired like any pod of a secondary ENI)."""

    async def lease(self, req: CniRequest) -> tuple[Lease, SgAttachment | SetMembership] | None: ...
    def settled(self) -> None: ...
    def release(self, alloc: Allocation) -> None: ...
    def branch_link(self, alloc: Allocation) -> BranchLink | None: ...
    def records(self) -> list[BranchRecord]: ...
    async def restore(
        self, allocations: Iterable[Allocation], saved: Sequence[BranchRecord]
    ) -> None: ...


class DatapathPort(Protocol):
    """The datapath as the CNI service sees it (netlink's Datapath run in worker threads)."""

    def is_node_netns(self, path: str) -> bool: ...
    async def wire(self, pod: PodNet) -> WiredPod: ...
    async def check(self, pod: PodNet) -> list[str]: ...
    async def unwire_host(self, pod: PodNet) -> None: ...
    async def park_links(
        self, names: list[str], group: int
    ) -> tuple[dict[str, int], Mapping[str, Exception]]: ...
    async def delete_parked(self, names: list[str], group: int) -> None: ...
    async def host_veths(self) -> dict[str, int]: ...
    async def link_exists(self, name: str) -> bool: ...


class KeyLocks:
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[PodKey, tuple[anyio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: PodKey) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (anyio.Lock(fast_acquire=True), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def busy(self, key: PodKey) -> bool:
        return key in self._locks


class CniService:
    """Serves the CNI verbs; owns the allocations and their checkpoint."""

    def __init__(
        self,
        *,
        pool: IpPool,
        datapath: DatapathPort,
        provider: Provider,
        checkpoint_path: Any,
        mtu: int,
        add_wait: float = 2.0,
        wire_timeout: float = 10.0,
        clock: Callable[[], float] = anyio.current_time,
        events: EventBus | None = None,
        sg: SgHook | None = None,
        checkpoint_writer: Callable[[Path, bytes], Awaitable[None]] | None = None,
    ) -> None:
        self.sg = sg
        # Set by the daemon to the SNAT service's ``covers``: an ADD answers only once the
        # kernel NATs its address (when the address needs it).
        self.egress_ready: Callable[[IPv4Address], Awaitable[object]] | None = None
        self.pool = pool
        self.datapath = datapath
        self.provider = provider
        self.mtu = mtu
        self.add_wait = add_wait
        self.wire_timeout = wire_timeout
        self.clock = clock
        self.events = events or EventBus()
        self.allocations: dict[PodKey, Allocation] = {}
        self.checkpoint = Checkpoint(checkpoint_path, self.snapshot, checkpoint_writer)
        self.locks = KeyLocks()
        self.ready = False
        self.pool_changed = anyio.Event()
        self.demand = anyio.Event()
        self.deleter = LinkDeleter(datapath)

    def __repr__(self) -> str:
        return f"<CniService allocations={len(self.allocations)} pool={self.pool!r}>"

    # -- lifecycle ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        now = self.clock()
        return snapshot_of(
            self.allocations.values(),
            self.pool.cooling_items(now),  # not the ended cooldowns: a DEL burst's O(n^2)
            now,
            self.sg.records() if self.sg is not None else (),
        )

    async def restore(self, snap: Snapshot) -> list[tuple[Allocation, str]]:
        """Rebuild the pool from the provider and match the checkpoint against the kernel.

        Returns the allocations dropped, each with the reason. Writes the checkpoint.
        """
        for block in await self.provider.inventory():
            self.pool.add_block(block.owner, block.ips, table=block.table, group=block.group)
        now, wall = self.clock(), time.time()
        for c in snap.cooling:
            self.pool.cool(c.ip, now - max(0.0, wall - c.released_at))
        live = await self.datapath.host_veths()
        dropped: list[tuple[Allocation, str]] = []
        for a in snap.allocations:
            if a.host_veth not in live:
                dropped.append((a, "pod link is gone"))
                self.pool.cool(a.ip, now)
                continue
            if a.sg is not None:  # its address is its branch ENI's, not the pool's
                self.allocations[a.key] = a
                continue
            try:
                self.pool.claim(a.ip, a.key)
            except AddressUnknown:
                dropped.append((a, f"{a.ip} is no longer owned by this node"))
                continue
            except AddressTaken as e:
                dropped.append((a, f"{a.ip} is also recorded for {e.holder}"))
                continue
            self.allocations[a.key] = a
        for a, why in dropped:
            log.warning(
                "dropped allocation", extra={"key": str(a.key), "ip": str(a.ip), "reason": why}
            )
            self.events.publish("allocation.dropped", key=str(a.key), ip=str(a.ip), reason=why)
        if self.sg is not None:
            await self.sg.restore(list(self.allocations.values()), snap.branches)
        await self.checkpoint.commit()
        self.ready = True
        return dropped

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the shared veth deletions (``LinkDeleter.run``) until cancelled."""
        await self.deleter.run(task_status=task_status)

    def notify_pool_changed(self) -> None:
        """Called by whoever adds addresses to the pool: wakes ADDs waiting for one."""
        event, self.pool_changed = self.pool_changed, anyio.Event()
        event.set()

    # -- verbs --------------------------------------------------------------------------------

    def pod_net(self, a: Allocation, netns: str | None = None) -> PodNet:
        """The datapath's view of allocation ``a`` (optionally in another netns path)."""
        return PodNet(
            netns=netns or a.netns,
            ifname=a.ifname,
            host_veth=a.host_veth,
            ip=a.ip,
            mtu=self.mtu,
            table=a.table,
            branch=self.sg.branch_link(a) if self.sg is not None else None,
        )

    async def add(self, req: CniRequest) -> dict[str, Any]:
        """Wire the pod and return the ADD result in the config's version; raises CniError."""
        try:
            return await self._add(req)
        finally:
            if self.sg is not None:
                self.sg.settled()  # work this ADD's lease made wait for it (eni mode's top-up)

    async def _add(self, req: CniRequest) -> dict[str, Any]:
        key = req.key
        if self.datapath.is_node_netns(req.netns):
            raise CniError(INVALID_ENV, "CNI_NETNS is the node's own network namespace", req.netns)
        async with self.locks.hold(key):
            old = self.allocations.get(key)
            want = req.requested_ip
            sg: SgAttachment | None = None
            member: SetMembership | None = None
            got: tuple[Lease, SgAttachment | SetMembership] | None = None
            if old is not None:
                # The runtime retries an ADD it got no answer to: start over with the same IP
                # (unless it now asks for another).
                await self._teardown(old, keep_record=True)
                if want in (None, old.ip) or old.sg is not None or old.sg_set is not None:
                    lease, sg = Lease(ip=old.ip, owner=old.owner, table=old.table), old.sg
                    member = old.sg_set
                else:
                    del self.allocations[key]
                    self.pool.release(old.ip, self.clock())
                    try:
                        lease = self._requested(key, want)
                    except CniError:
                        with anyio.CancelScope(shield=True):
                            await self.checkpoint.commit()
                        raise
            elif self.sg is not None and (got := await self.sg.lease(req)) is not None:
                # security groups for pods: the address is the pod's branch ENI's, or its set's
                lease, att = got
                sg, member = (att, None) if isinstance(att, SgAttachment) else (None, att)
                if want is not None and want != lease.ip:
                    raise CniError(
                        INVALID_CONFIG,
                        "a pod with security groups gets its branch ENI's address",
                        f"asked for {want}, its branch has {lease.ip}",
                    )
            elif want is not None:
                lease = self._requested(key, want)
            else:
                lease = await self._acquire(key)
            mark("ipam")
            alloc = Allocation(
                network=key.network,
                container_id=key.container_id,
                ifname=key.ifname,
                ip=lease.ip,
                netns=req.netns,
                host_veth=host_veth_name(
                    key.network, key.container_id, key.ifname, strict=sg is not None and sg.strict
                ),
                owner=lease.owner,
                table=lease.table,
                pod_namespace=req.pod_namespace,
                pod_name=req.pod_name,
                created_at=old.created_at if old else time.time(),
                sg=sg,
                sg_set=member,
            )
            self.allocations[key] = alloc
            wired: WiredPod | None = None
            try:
                await self.checkpoint.commit()
                mark("checkpoint")
                await self.deleter.wait_for(alloc.host_veth)
                if sg is not None:
                    await self.deleter.wait_for(branch_link_name(sg.vlan))
                with anyio.fail_after(self.wire_timeout):
                    wired = await self.datapath.wire(self.pod_net(alloc))
                mark("wire")
                if self.egress_ready is not None:
                    await self.egress_ready(alloc.ip)
                    mark("snat")
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._undo_add(alloc, wired)
                raise
        mtu = req.conf.mtu or self.mtu
        out = AddOutcome(
            ifname=req.ifname,
            netns=req.netns,
            pod_mac=wired.pod_mac,
            host_veth=alloc.host_veth,
            host_mac=wired.host_mac,
            ip=alloc.ip,
            mtu=mtu,
        )
        self.events.publish(
            "pod.added",
            key=str(key),
            ip=str(alloc.ip),
            owner=alloc.owner,
            pod=f"{alloc.pod_namespace}/{alloc.pod_name}" if alloc.pod_name else "",
            **(
                {"groups": ",".join(sg.groups) or sg.source, "vlan": sg.vlan, "mode": sg.mode}
                if sg is not None
                else {"groups": ",".join(member.groups)}
                if member is not None
                else {}
            ),
        )
        return render_add_result(req.conf.cni_version, out, req.conf.dns)

    def _requested(self, key: PodKey, ip: IPv4Address) -> Lease:
        """Assign the address the runtime asked for; raises CniError when it cannot be had."""
        try:
            return self.pool.assign_requested(ip, key, self.clock())
        except AddressUnknown:
            raise CniError(
                INVALID_CONFIG,
                "requested address is not one this node can give",
                f"{ip} is not in the pool of this node ({self.provider.name} provider)",
            ) from None
        except AddressTaken as e:
            raise CniError(
                TRY_AGAIN_LATER, "requested address is in use", f"{ip} is assigned to {e.holder}"
            ) from None

    async def _acquire(self, key: PodKey) -> Lease:
        deadline = self.clock() + self.add_wait
        while True:
            try:
                return self.pool.assign(key, self.clock())
            except PoolExhausted as e:
                remaining = deadline - self.clock()
                if not self.provider.can_grow or remaining <= 0:
                    raise CniError(TRY_AGAIN_LATER, "no IP address available", e.reason) from None
                self.demand.set()
                with anyio.move_on_after(remaining):
                    await self.pool_changed.wait()

    async def _undo_add(self, alloc: Allocation, wired: WiredPod | None) -> None:
        try:
            if wired is not None:
                await self._unwire(alloc)
        except NetlinkError as e:  # the netns may be gone; GC collects what is left
            log.warning(
                "undo of a failed ADD incomplete", extra={"key": str(alloc.key), "error": str(e)}
            )
        self.allocations.pop(alloc.key, None)
        if alloc.sg is None:
            self.pool.release(alloc.ip, self.clock())
        # A branch ENI stays the pod's for a while: a retried ADD gets it back (agent.sg).
        try:
            await self.checkpoint.commit()
        except OSError as e:
            log.error("checkpoint write failed while undoing ADD", extra={"error": str(e)})

    async def _teardown(self, alloc: Allocation, *, keep_record: bool) -> None:
        """Remove the datapath of ``alloc``."""
        await self._unwire(alloc)
        if not keep_record:
            self.allocations.pop(alloc.key, None)

    async def _unwire(self, alloc: Allocation) -> None:
        """Remove the host rules of ``alloc`` (if its address has any) and its veth pair (and a
        branch pod's VLAN link); their routes go with them. Returns once the pod's interface
        is gone."""
        if alloc.table is not None or alloc.sg is not None:
            await self.datapath.unwire_host(self.pod_net(alloc))
        await self.deleter.delete(self._links_of(alloc))

    @staticmethod
    def _links_of(alloc: Allocation) -> list[str]:
        """The host links of an attachment: its veth, and a branch pod's VLAN link."""
        links = [alloc.host_veth]
        if alloc.sg is not None:
            links.append(branch_link_name(alloc.sg.vlan))
        return links

    def _release_address(self, alloc: Allocation) -> None:
        if alloc.sg is not None:
            if self.sg is not None:
                self.sg.release(alloc)
        else:
            self.pool.release(alloc.ip, self.clock())

    async def delete(self, req: CniRequest) -> None:
        """Release the attachment; succeeds when it or its netns is already gone."""
        async with self.locks.hold(req.key):
            await self._release(req.key)

    async def _release(self, key: PodKey) -> Allocation | None:
        alloc = self.allocations.get(key)
        if alloc is None:
            # A veth left by an ADD the agent never recorded (killed mid-ADD at first start).
            await self.deleter.delete(
                list(host_veth_names(key.network, key.container_id, key.ifname))
            )
            return None
        await self._unwire(alloc)
        mark("delete")
        del self.allocations[key]
        self._release_address(alloc)
        await self.checkpoint.commit()
        mark("checkpoint")
        self.events.publish(
            "pod.deleted", key=str(key), ip=str(alloc.ip), cooldown_s=self.pool.cooldown
        )
        return alloc

    async def check(self, req: CniRequest) -> None:
        """Raise CniError naming what is missing from what ADD made."""
        alloc = self.allocations.get(req.key)
        if alloc is None:
            raise CniError(UNKNOWN_CONTAINER, "no allocation for this container", str(req.key))
        want = prev_result_ip(req.conf.prev_result)
        if want is not None and want != alloc.ip:
            raise CniError(
                CHECK_FAILED,
                "address differs from prevResult",
                f"prevResult {want}, allocated {alloc.ip}",
            )
        try:
            missing = await self.datapath.check(self.pod_net(alloc, req.netns))
        except NetnsNotFound:
            raise CniError(CHECK_FAILED, "network namespace is gone", req.netns) from None
        if missing:
            raise CniError(
                CHECK_FAILED, "pod network is incomplete", "missing: " + "; ".join(missing)
            )

    async def gc(self, req: CniRequest) -> list[Allocation]:
        """Release every allocation of this network absent from the valid attachments."""
        valid = set(req.conf.valid_attachments or ())
        stale = [
            k
            for k in list(self.allocations)
            if k.network == req.conf.name and (k.container_id, k.ifname) not in valid
        ]
        released: list[Allocation] = []
        errors: list[str] = []

        # The runtime never runs GC concurrently with ADD/DEL on the network, so a held key lock
        # is the agent's own (repair, its GC): wait for it rather than skip the attachment.
        # Concurrent, so that the veth deletions share rounds.
        async def release(key: PodKey) -> None:
            try:
                async with self.locks.hold(key):
                    alloc = await self._release(key)
            except (NetlinkError, OSError) as e:
                errors.append(f"{key}: {e}")
                return
            if alloc is not None:
                released.append(alloc)
                log.info("gc released", extra={"key": str(key), "ip": str(alloc.ip)})

        async with anyio.create_task_group() as tg:
            for key in stale:
                tg.start_soon(release, key)
        if errors:
            raise CniError(
                INTERNAL, f"GC failed for {len(errors)} attachment(s)", "; ".join(errors)
            )
        return released

    def status(self) -> None:
        """Raise CniError(50) unless an ADD could be served now or soon."""
        if not self.ready:
            raise CniError(STATUS_UNAVAILABLE, "agent is restoring its state")
        if self.provider.can_grow:
            return
        if self.pool.available(self.clock()) == 0 and self.pool.cooling == 0:
            total = self.pool.total
            why = "no pod addresses configured" if total == 0 else f"all {total} addresses in use"
            raise CniError(STATUS_UNAVAILABLE, "no IP address available", why)

    def pods(self) -> Iterable[Allocation]:
        return self.allocations.values()

    def holds(self, key: str) -> bool:
        """Whether an attachment with this key (``network/container/ifname``) is recorded."""
        parts = key.split("/")
        if len(parts) != 3:
            return False
        network, container_id, ifname = parts
        return PodKey(network=network, container_id=container_id, ifname=ifname) in self.allocations


def map_error(exc: Exception) -> CniError:
    """Map what the lower layers raise to the CNI error a runtime sees (done once, here)."""
    if isinstance(exc, CniError):
        return exc
    if isinstance(exc, NetnsNotFound):
        return CniError(INVALID_ENV, "network namespace does not exist", exc.path)
    if isinstance(exc, NotANetns):
        return CniError(INVALID_ENV, "CNI_NETNS is not a network namespace", exc.path)
    if isinstance(exc, LinkExists):
        return CniError(INVALID_ENV, "interface already exists in the network namespace", str(exc))
    if isinstance(exc, TimeoutError):
        return CniError(TRY_AGAIN_LATER, "datapath operation timed out")
    if isinstance(exc, NetlinkError):
        return CniError(INTERNAL, "datapath operation failed", str(exc))
    if isinstance(exc, OSError):
        return CniError(5, "I/O failure", str(exc))
    return CniError(INTERNAL, "internal error", f"{type(exc).__name__}: {exc}")
