"""The aws provider: pod addresses are ENI secondary IPs or /28 prefixes of this instance.

Theory of operation. The provider keeps one record per ENI attached to this instance, rebuilt
by ``inventory`` from IMDS (which instance, which type, the VPC) and EC2 (which ENIs, their
addresses, prefixes and tags: EC2 is authoritative, IMDS lags), never from disk. A record's
pool addresses are its secondary IPs plus every address of its prefixes; an ENI's own primary
IP never goes to a pod (the primary ENI's primary IP is the node's address). ENIs tagged
``node.k8s.amazonaws.com/no_manage=true`` are reported (they take an ENI slot) but their
addresses are not ours. Secondary ENIs use route table device number + 1; the primary ENI uses
main.

Workflows pair with the refiller's plan: ``create_eni`` (create with its addresses in the same
call -> first free device index -> attach -> DeleteOnTermination -> wait for the Linux link by
MAC -> configure it), ``assign_ips``/``assign_prefixes`` (one call with a count),
``release_ips``/``release_prefixes``, ``free_eni`` (describe -> detach -> wait available ->
delete -> unconfigure, retried with backoff) and ``cleanup_leaked``. Each has a deadline, and a
failed ``create_eni`` undoes what it did (unconfigure, detach, wait, delete) in a shielded scope
before raising: a CloudError as it came, anything else as EniSetupFailed.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Protocol

import anyio
import attrs
from anyio.abc import TaskStatus

from cloud.aws.ec2 import Ec2, Eni, RetryPolicy, Subnet
from cloud.aws.imds import Imds, InstanceMeta
from cloud.errors import CloudError, EniSetupFailed, LimitExceeded, NotFound
from cloud.provider import AddressBlock, NodeFacts, group_key

log = logging.getLogger("podwire.aws")

TAG_INSTANCE = "node.k8s.amazonaws.com/instance_id"
TAG_CREATED_AT = "node.k8s.amazonaws.com/createdAt"
TAG_NO_MANAGE = "node.k8s.amazonaws.com/no_manage"
TAG_CLUSTER = "cluster.k8s.amazonaws.com/name"
# EKS's resource controller marks the ENIs it made (trunks, branches): never ours to delete.
TAG_EKS_OWNER = "eks:eni:owner"
# Branch ENIs the agent made (agent.sg): their own workflows clean them up, not the ENI sweep.
TAG_BRANCH_VLAN = "podwire.io/vlan-id"
TAG_BRANCH_TRUNK = "podwire.io/trunk-eni-id"
# ENIs made for a set of security groups (eni mode): the set's key (cloud.provider.group_key).
TAG_POD_GROUPS = "podwire.io/security-groups"
DESCRIPTION_PREFIX = "podwire-"
TRUNK_DESCRIPTION_PREFIX = "podwire-trunk-"


# --- the kernel side, behind two small protocols ------------------------------------------


class LinkRef(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def name(self) -> str: ...


class LinkWaiter(Protocol):
    async def wait_link(self, mac: str, timeout: float) -> LinkRef:
        """Return the link with ``mac`` once it exists; raise TimeoutError after ``timeout``."""
        ...


@attrs.frozen(kw_only=True)
class LinkSpec:
    """What a secondary ENI's link must carry (see ``netlink.eni``)."""

    mac: str
    address: IPv4Interface
    gateway: IPv4Address
    table: int
    mtu: int


class EniLinks(Protocol):
    async def configure(self, spec: LinkSpec) -> None: ...
    async def unconfigure(self, spec: LinkSpec) -> None: ...
    async def ensure_fwmark_rule(self) -> None: ...
    async def configure_trunk(self, mac: str, mtu: int) -> None: ...


class NetlinkEniLinks:
    """``EniLinks`` through ``netlink.eni`` in ``netns_path`` (None: the agent's own)."""

    def __init__(self, netns_path: str | None = None) -> None:
        self.netns_path = netns_path

    def __repr__(self) -> str:
        return f"NetlinkEniLinks({self.netns_path!r})"

    async def configure(self, spec: LinkSpec) -> None:
        from netlink import eni

        await eni.configure(
            self.netns_path,
            eni.EniLinkSpec(
                mac=spec.mac,
                address=spec.address,
                gateway=spec.gateway,
                table=spec.table,
                mtu=spec.mtu,
            ),
        )

    async def unconfigure(self, spec: LinkSpec) -> None:
        from netlink import eni

        await eni.unconfigure(self.netns_path, table=spec.table, address=spec.address, mac=spec.mac)

    async def ensure_fwmark_rule(self) -> None:
        from netlink import eni

        await eni.ensure_fwmark_rule(self.netns_path)

    async def configure_trunk(self, mac: str, mtu: int) -> None:
        from netlink import eni

        await eni.configure_trunk(self.netns_path, mac, mtu)


# --- settings and records -------------------------------------------------------------------


def proportional_jitter(fraction: float) -> Callable[[float], float]:
    """A jitter that stretches a sleep by up to ``fraction`` (k8s wait.Backoff's Jitter)."""
    return lambda d: d * (1.0 + random.uniform(0.0, fraction))


FREE_ENI_BACKOFF = RetryPolicy(
    base=0.2, cap=60.0, max_attempts=12, jitter=proportional_jitter(0.15), deadline=900.0
)


@attrs.frozen(kw_only=True)
class AwsSettings:
    """The provider's knobs (the daemon fills them from the ``[aws]`` config section)."""

    cluster_name: str | None = None
    mtu: int = 9001
    subnet_id: str | None = None  # new ENIs' subnet; None: the primary ENI's
    security_groups: tuple[str, ...] = ()  # new ENIs' groups; (): the primary ENI's
    extra_tags: Mapping[str, str] = attrs.field(factory=dict)
    link_timeout: float = 60.0
    workflow_deadline: float = 180.0
    undo_deadline: float = 120.0
    detach_poll: float = 0.5
    free_backoff: RetryPolicy = FREE_ENI_BACKOFF
    leak_grace: float = 300.0
    leak_interval: float = 3600.0


@attrs.frozen(kw_only=True)
class EniInfo:
    """One ENI of this instance as the pool and ``agentctl enis`` see it."""

    eni_id: str
    device_index: int
    primary: bool
    no_manage: bool
    mac: str
    subnet_id: str
    subnet_cidr: IPv4Network
    primary_ip: IPv4Address
    table: int | None
    attachment_id: str | None
    ips: tuple[IPv4Address, ...] = ()
    prefixes: tuple[IPv4Network, ...] = ()
    trunk: bool = False  # the trunk ENI of security groups for pods: never the pool's
    security_groups: tuple[str, ...] = ()
    # eni mode: made for this set of security groups (its tag); () = the shared pool's
    pod_groups: tuple[str, ...] = ()

    @property
    def group(self) -> str:
        """The pool group of its addresses: "" (shared), or its set's key."""
        return group_key(self.pod_groups)

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet_cidr.network_address + 1

    @property
    def pool_ips(self) -> tuple[IPv4Address, ...]:
        """The addresses pods may get: secondary IPs, then every address of each prefix."""
        return self.ips + tuple(ip for p in self.prefixes for ip in p)

    def block(self) -> AddressBlock:
        return AddressBlock(
            owner=self.eni_id, ips=self.pool_ips, table=self.table, group=self.group
        )

    def link_spec(self, mtu: int) -> LinkSpec:
        return LinkSpec(
            mac=self.mac,
            address=IPv4Interface(f"{self.primary_ip}/{self.subnet_cidr.prefixlen}"),
            gateway=self.gateway,
            table=self.table if self.table is not None else 254,
            mtu=mtu,
        )


def table_of(device_index: int) -> int | None:
    """Route table of the ENI at ``device_index``: main (None) for the primary, else index + 1."""
    return None if device_index == 0 else device_index + 1


def is_no_manage(tags: Mapping[str, str]) -> bool:
    return tags.get(TAG_NO_MANAGE, "").lower() == "true"


def pod_groups_of(tags: Mapping[str, str]) -> tuple[str, ...]:
    """The set of security groups an ENI was made for (eni mode), from its tag; () if none."""
    return tuple(sorted({g for g in tags.get(TAG_POD_GROUPS, "").split(",") if g}))


def rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- the provider ---------------------------------------------------------------------------


@attrs.define
class _Attaching:
    """How far attaching a new ENI got: the step an error names, the attachment the undo
    detaches."""

    step: str
    attachment: str | None = None


class AwsProvider:
    """``cloud.provider.Provider`` for ENIs, plus the workflows the refiller executes."""

    name = "aws"
    can_grow = True

    def __init__(
        self,
        *,
        imds: Imds,
        ec2: Ec2,
        link_waiter: LinkWaiter,
        links: EniLinks,
        settings: AwsSettings | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.imds = imds
        self.ec2 = ec2
        self.link_waiter = link_waiter
        self.links = links
        self.settings = settings or AwsSettings()
        self._wall = wall_clock
        self._instance: InstanceMeta | None = None
        self._enis: dict[str, EniInfo] = {}
        self._subnets: dict[str, Subnet] = {}
        self._vpc_cidrs: tuple[IPv4Network, ...] = ()
        self._primary_groups: tuple[str, ...] = ()
        self._primary_subnet = ""
        self._trunk: EniInfo | None = None
        self.max_enis = 0
        self.ipv4_per_eni = 0
        self.vcpus = 0

    def __repr__(self) -> str:
        iid = self._instance.instance_id if self._instance else "?"
        return f"<AwsProvider {iid} enis={len(self._enis)}>"

    @property
    def instance(self) -> InstanceMeta:
        if self._instance is None:
            raise RuntimeError("inventory() has not run yet")
        return self._instance

    # -- Provider -----------------------------------------------------------------------------

    async def inventory(self) -> Sequence[AddressBlock]:
        """Rebuild every ENI record from IMDS + EC2, adopting (tagging and configuring) attached
        secondary ENIs; return the managed ENIs' blocks. Raises CloudError."""
        inst = await self.imds.instance()
        self._instance = inst
        itype = await self.ec2.describe_instance_type(inst.instance_type)
        self.max_enis, self.ipv4_per_eni, self.vcpus = (
            itype.max_enis,
            itype.ipv4_per_eni,
            itype.vcpus,
        )
        primary_meta = await self.imds.interface(inst.mac)
        self._vpc_cidrs = primary_meta.vpc_cidrs
        enis = await self._attached()
        records: dict[str, EniInfo] = {}
        trunk: EniInfo | None = None
        for eni in enis:
            assert eni.attachment is not None
            if eni.attachment.device_index == 0:
                self._primary_groups = eni.security_groups
                self._primary_subnet = eni.subnet_id
            if eni.interface_type == "trunk":
                # Never the pool's, whoever made it: its addresses are not pod addresses.
                trunk = await self._record(eni)
                continue
            records[eni.eni_id] = await self._record(eni)
        self._trunk = trunk
        await self.links.ensure_fwmark_rule()
        for rec in sorted(records.values(), key=lambda r: r.device_index):
            if rec.primary or rec.no_manage:
                continue
            eni = next(e for e in enis if e.eni_id == rec.eni_id)
            if rec.pod_groups and set(rec.pod_groups) != set(rec.security_groups):
                log.warning(
                    "ENI %s was made for security groups %s but has %s now: its pods are "
                    "judged by the groups it has",
                    rec.eni_id,
                    rec.group,
                    ",".join(rec.security_groups),
                )
            if eni.tags.get(TAG_INSTANCE) != inst.instance_id:
                await self.ec2.create_tags([rec.eni_id], self._node_tags())
            try:
                await self.link_waiter.wait_link(rec.mac, self.settings.link_timeout)
                await self.links.configure(rec.link_spec(self.settings.mtu))
            except Exception as e:  # a link we cannot use now: leave the ENI out
                log.warning("ENI %s: link not usable yet, left out: %r", rec.eni_id, e)
                del records[rec.eni_id]
        self._enis = records
        return [r.block() for r in self._managed()]

    def facts(self) -> NodeFacts:
        inst = self.instance
        subnets = sorted({r.subnet_cidr for r in self._managed()})
        return NodeFacts(
            primary_ip=inst.local_ipv4, vpc_cidrs=self._vpc_cidrs, pod_cidrs=tuple(subnets)
        )

    # -- reads --------------------------------------------------------------------------------

    def enis(self) -> list[EniInfo]:
        """Every ENI of this instance known now (no-manage ones included), by device index."""
        return sorted(self._enis.values(), key=lambda r: r.device_index)

    def eni(self, eni_id: str) -> EniInfo:
        return self._enis[eni_id]

    @property
    def instance_type(self) -> str:
        return self.instance.instance_type

    def trunk(self) -> EniInfo | None:
        """The trunk ENI attached to this instance (security groups for pods), if any."""
        return self._trunk

    async def find_trunk(self) -> EniInfo | None:
        """Look at EC2 again for a trunk attached since ``inventory`` (EKS's resource
        controller attaches it once the node asks for SecurityGroupsForPods); raises
        CloudError."""
        if self._trunk is None:
            for eni in await self._attached():
                if eni.interface_type == "trunk" and eni.attachment is not None:
                    self._trunk = await self._record(eni)
                    break
        return self._trunk

    @property
    def primary_groups(self) -> tuple[str, ...]:
        """The primary ENI's security groups (what new ENIs get unless configured)."""
        return self._primary_groups

    @property
    def primary_subnet(self) -> str:
        return self._primary_subnet

    async def subnet(self, subnet_id: str) -> Subnet:
        """The subnet (cached; raises NotFound)."""
        return await self._subnet(subnet_id)

    def _managed(self) -> list[EniInfo]:
        return [r for r in self.enis() if not r.no_manage]

    async def _attached(self) -> list[Eni]:
        return await self.ec2.describe_network_interfaces(
            filters={"attachment.instance-id": [self.instance.instance_id]}
        )

    async def _subnet(self, subnet_id: str) -> Subnet:
        found = self._subnets.get(subnet_id)
        if found is None:
            found = self._subnets[subnet_id] = await self.ec2.describe_subnet(subnet_id)
        return found

    async def _record(self, eni: Eni) -> EniInfo:
        att = eni.attachment
        subnet = await self._subnet(eni.subnet_id)
        index = att.device_index if att else -1
        return EniInfo(
            eni_id=eni.eni_id,
            device_index=index,
            primary=index == 0,
            no_manage=index != 0 and is_no_manage(eni.tags),
            mac=eni.mac,
            subnet_id=eni.subnet_id,
            subnet_cidr=subnet.cidr,
            primary_ip=eni.primary_ip,
            table=table_of(index),
            attachment_id=att.attachment_id if att else None,
            ips=eni.secondary_ips,
            prefixes=eni.prefixes,
            trunk=eni.interface_type == "trunk",
            security_groups=eni.security_groups,
            pod_groups=pod_groups_of(eni.tags) if index != 0 else (),
        )

    def _node_tags(self) -> dict[str, str]:
        tags = dict(self.settings.extra_tags)
        tags[TAG_INSTANCE] = self.instance.instance_id
        tags[TAG_CREATED_AT] = rfc3339(self._wall())
        if self.settings.cluster_name:
            tags[TAG_CLUSTER] = self.settings.cluster_name
        return tags

    # -- growing ------------------------------------------------------------------------------

    async def create_eni(
        self, *, ip_count: int = 0, prefix_count: int = 0, pod_groups: Sequence[str] = ()
    ) -> AddressBlock:
        """Create, attach and configure one ENI carrying ``ip_count`` secondary IPs or
        ``prefix_count`` prefixes; return its block. On failure everything done is undone.
        With ``pod_groups`` (security groups for pods, eni mode) the ENI is made with exactly
        those groups and a tag recording them, and its addresses are that set's.

        Raises SubnetExhausted / LimitExceeded / other CloudError as EC2 raised them, and
        EniSetupFailed for a kernel-side failure or the workflow's deadline.
        """
        inst = self.instance
        at = _Attaching("create")
        eni: Eni | None = None
        spec: LinkSpec | None = None
        try:
            with anyio.fail_after(self.settings.workflow_deadline):
                try:
                    subnet_id = self.settings.subnet_id or self._primary_subnet
                    groups = self.settings.security_groups or self._primary_groups
                    tags = self._node_tags()
                    if pod_groups:  # eni mode: the pods' subnet, the set's groups
                        groups = tuple(pod_groups)
                        tags[TAG_POD_GROUPS] = group_key(pod_groups)
                    eni = await self.ec2.create_network_interface(
                        subnet_id=subnet_id,
                        security_groups=groups,
                        description=f"{DESCRIPTION_PREFIX}{inst.instance_id}",
                        tags=tags,
                        ip_count=ip_count,
                        prefix_count=prefix_count,
                    )
                    index = await self._attach_new(eni, at)
                    at.step = "configure link"
                    subnet = await self._subnet(eni.subnet_id)
                    rec = EniInfo(
                        eni_id=eni.eni_id,
                        device_index=index,
                        primary=False,
                        no_manage=False,
                        mac=eni.mac,
                        subnet_id=eni.subnet_id,
                        subnet_cidr=subnet.cidr,
                        primary_ip=eni.primary_ip,
                        table=table_of(index),
                        attachment_id=at.attachment,
                        ips=eni.secondary_ips,
                        prefixes=eni.prefixes,
                        security_groups=eni.security_groups,
                        pod_groups=pod_groups_of(tags),
                    )
                    spec = rec.link_spec(self.settings.mtu)
                    await self.links.configure(spec)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self._undo_create(eni, at.attachment, spec)
                    raise
        except CloudError:
            raise
        except Exception as e:
            raise EniSetupFailed(at.step, eni.eni_id if eni else None, e) from e
        self._enis[rec.eni_id] = rec
        log.info("ENI %s attached at device %d (%s)", rec.eni_id, rec.device_index, rec.mac)
        return rec.block()

    async def _attach_new(self, eni: Eni, at: _Attaching) -> int:
        """Attach a just-created ENI at a free device index, have EC2 delete it with the
        instance, and wait for its link to appear; return the index. ``at`` follows each step
        (the caller's error names it, its undo detaches what was attached)."""
        at.step = "device index"
        index = await self._free_device_index()
        at.step = "attach"
        at.attachment = await self.ec2.attach_network_interface(
            eni_id=eni.eni_id, instance_id=self.instance.instance_id, device_index=index
        )
        at.step = "delete on termination"
        await self.ec2.set_delete_on_termination(eni.eni_id, at.attachment)
        at.step = "wait for link"
        await self.link_waiter.wait_link(eni.mac, self.settings.link_timeout)
        return index

    async def _undo_create(
        self, eni: Eni | None, attachment: str | None, spec: LinkSpec | None
    ) -> None:
        if eni is None:
            return
        with anyio.move_on_after(self.settings.undo_deadline) as scope:
            if spec is not None:
                try:
                    await self.links.unconfigure(spec)
                except Exception as e:  # keep undoing
                    log.warning("undo ENI %s: unconfigure: %r", eni.eni_id, e)
            try:
                await self._detach_and_delete(eni.eni_id, attachment)
            except CloudError as e:
                log.error("undo ENI %s: could not delete it (leak cleanup will): %r", eni.eni_id, e)
        if scope.cancelled_caught:
            log.error("undo ENI %s: gave up after %ss", eni.eni_id, self.settings.undo_deadline)

    async def create_trunk(self) -> EniInfo:
        """Create, attach and bring up the trunk ENI (security groups for pods): InterfaceType
        trunk, the node's subnet and groups (or the configured ones), our tags, no addresses
        for pods; its link gets the MTU and goes up, nothing more. On failure everything done
        is undone. Raises like ``create_eni``; LimitExceeded when no device index is free.
        """
        inst = self.instance
        at = _Attaching("create")
        eni: Eni | None = None
        try:
            with anyio.fail_after(self.settings.workflow_deadline):
                try:
                    eni = await self.ec2.create_network_interface(
                        subnet_id=self.settings.subnet_id or self._primary_subnet,
                        security_groups=self.settings.security_groups or self._primary_groups,
                        description=f"{TRUNK_DESCRIPTION_PREFIX}{inst.instance_id}",
                        tags=self._node_tags(),
                        interface_type="trunk",
                    )
                    index = await self._attach_new(eni, at)
                    at.step = "configure link"
                    await self.links.configure_trunk(eni.mac, self.settings.mtu)
                    subnet = await self._subnet(eni.subnet_id)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self._undo_create(eni, at.attachment, None)
                    raise
        except CloudError:
            raise
        except Exception as e:
            raise EniSetupFailed(at.step, eni.eni_id if eni else None, e) from e
        rec = EniInfo(
            eni_id=eni.eni_id,
            device_index=index,
            primary=False,
            no_manage=False,
            mac=eni.mac,
            subnet_id=eni.subnet_id,
            subnet_cidr=subnet.cidr,
            primary_ip=eni.primary_ip,
            table=None,
            attachment_id=at.attachment,
            trunk=True,
            security_groups=eni.security_groups,
        )
        self._trunk = rec
        log.info("trunk ENI %s attached at device %d (%s)", rec.eni_id, index, rec.mac)
        return rec

    async def configure_trunk(self) -> EniInfo:
        """Wait for the attached trunk's link and bring it up (MTU, up); idempotent."""
        trunk = self._trunk
        if trunk is None:
            raise RuntimeError("no trunk ENI is attached")
        await self.link_waiter.wait_link(trunk.mac, self.settings.link_timeout)
        await self.links.configure_trunk(trunk.mac, self.settings.mtu)
        return trunk

    async def _free_device_index(self) -> int:
        attached = await self._attached()
        used = {e.attachment.device_index for e in attached if e.attachment}
        free = [i for i in range(1, self.max_enis) if i not in used]
        if not free:
            raise LimitExceeded("AttachmentLimitExceeded", "AttachNetworkInterface")
        return free[0]

    async def assign_ips(self, eni_id: str, count: int) -> AddressBlock:
        """Add ``count`` secondary IPs to the ENI in one call; return a block of the new ones."""
        rec = self._enis[eni_id]
        with anyio.fail_after(self.settings.workflow_deadline):
            new = await self.ec2.assign_private_ips(eni_id, count)
        self._enis[eni_id] = attrs.evolve(rec, ips=rec.ips + new)
        return AddressBlock(owner=eni_id, ips=new, table=rec.table, group=rec.group)

    async def assign_prefixes(self, eni_id: str, count: int) -> AddressBlock:
        """Delegate ``count`` /28s to the ENI in one call; return a block of their addresses."""
        rec = self._enis[eni_id]
        with anyio.fail_after(self.settings.workflow_deadline):
            new = await self.ec2.assign_prefixes(eni_id, count)
        self._enis[eni_id] = attrs.evolve(rec, prefixes=rec.prefixes + new)
        ips = tuple(ip for p in new for ip in p)
        return AddressBlock(owner=eni_id, ips=ips, table=rec.table, group=rec.group)

    async def resync_eni(self, eni_id: str) -> AddressBlock:
        """Re-read one ENI from EC2 (after PrivateIpAddressLimitExceeded) and return its whole
        block; raises NotFound when it is gone (the record is dropped)."""
        try:
            eni = await self.ec2.describe_network_interface(eni_id)
        except NotFound:
            self._enis.pop(eni_id, None)
            raise
        rec = await self._record(eni)
        self._enis[eni_id] = rec
        return rec.block()

    # -- shrinking ----------------------------------------------------------------------------

    async def release_ips(self, eni_id: str, ips: Sequence[IPv4Address]) -> None:
        """Unassign secondary IPs of the ENI (one call)."""
        rec = self._enis[eni_id]
        with anyio.fail_after(self.settings.workflow_deadline):
            await self.ec2.unassign_private_ips(eni_id, ips)
        gone = set(ips)
        self._enis[eni_id] = attrs.evolve(rec, ips=tuple(i for i in rec.ips if i not in gone))

    async def release_prefixes(self, eni_id: str, prefixes: Sequence[IPv4Network]) -> None:
        """Unassign delegated prefixes of the ENI (one call)."""
        rec = self._enis[eni_id]
        with anyio.fail_after(self.settings.workflow_deadline):
            await self.ec2.unassign_prefixes(eni_id, prefixes)
        gone = set(prefixes)
        self._enis[eni_id] = attrs.evolve(
            rec, prefixes=tuple(p for p in rec.prefixes if p not in gone)
        )

    async def free_eni(self, eni_id: str) -> None:
        """Detach and delete a secondary ENI, then remove its rule and table; retried with
        backoff (``settings.free_backoff``). An ENI already gone counts as freed."""
        rec = self._enis.get(eni_id)
        if rec is not None and (rec.primary or rec.no_manage):
            raise ValueError(f"{eni_id} is the primary or a no-manage ENI: never freed")
        policy = self.settings.free_backoff
        with anyio.fail_after(policy.deadline):
            for attempt in range(1, policy.max_attempts + 1):
                try:
                    await self._detach_and_delete(eni_id, None)
                    break
                except CloudError as e:
                    if attempt == policy.max_attempts:
                        raise
                    log.warning("free ENI %s: attempt %d: %r", eni_id, attempt, e)
                    await anyio.sleep(policy.backoff(attempt))
        self._enis.pop(eni_id, None)
        log.info("ENI %s freed", eni_id)
        if rec is not None:
            # Best effort: the link (and its routes) went with the detach; a rule left behind
            # names an address no longer ours and is removed again when the slot is reused.
            try:
                await self.links.unconfigure(rec.link_spec(self.settings.mtu))
            except Exception as e:
                log.warning("ENI %s freed, but its rule/table stay: %r", eni_id, e)

    async def _detach_and_delete(self, eni_id: str, attachment_id: str | None) -> None:
        # describe (NotFound = done) -> detach -> wait until available -> delete
        try:
            eni = await self.ec2.describe_network_interface(eni_id)
        except NotFound:
            return
        att = eni.attachment.attachment_id if eni.attachment else attachment_id
        if eni.status != "available" and att is not None:
            with contextlib.suppress(NotFound):
                await self.ec2.detach_network_interface(att)
            while True:
                try:
                    eni = await self.ec2.describe_network_interface(eni_id)
                except NotFound:
                    return
                if eni.status == "available":
                    break
                await anyio.sleep(self.settings.detach_poll)
        try:
            await self.ec2.delete_network_interface(eni_id)
        except NotFound:
            return

    # -- leaked ENIs --------------------------------------------------------------------------

    async def cleanup_leaked(self) -> list[str]:
        """Delete ENIs tagged for this instance, ``available``, older than the grace period;
        no-manage ones stay. ENIs with no createdAt tag get one now (deleted a round later).
        Return the ids deleted."""
        now = self._wall()
        found = await self.ec2.describe_network_interfaces(
            filters={f"tag:{TAG_INSTANCE}": [self.instance.instance_id], "status": ["available"]}
        )
        deleted: list[str] = []
        for eni in found:
            if is_no_manage(eni.tags) or eni.attachment is not None:
                continue
            if TAG_EKS_OWNER in eni.tags or TAG_BRANCH_VLAN in eni.tags:
                continue  # EKS's own, or a branch whose workflow (agent.sg) cleans it up
            created = parse_rfc3339(eni.tags.get(TAG_CREATED_AT, ""))
            if created is None:
                await self.ec2.create_tags([eni.eni_id], {TAG_CREATED_AT: rfc3339(now)})
                continue
            if now - created < self.settings.leak_grace:
                continue
            try:
                await self.ec2.delete_network_interface(eni.eni_id)
            except NotFound:
                continue
            log.info("deleted leaked ENI %s (created %s)", eni.eni_id, eni.tags[TAG_CREATED_AT])
            deleted.append(eni.eni_id)
        return deleted

    async def serve_leak_cleanup(
        self,
        *,
        start_delay: float | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``cleanup_leaked`` every ``settings.leak_interval`` (jittered +-10 %) after a
        random start delay in [0, interval); errors are logged, never fatal."""
        interval = self.settings.leak_interval
        task_status.started()
        await anyio.sleep(random.uniform(0, interval) if start_delay is None else start_delay)
        while True:
            try:
                await self.cleanup_leaked()
            except CloudError as e:
                log.warning("leaked-ENI cleanup failed: %r", e)
            await anyio.sleep(interval * random.uniform(0.9, 1.1))
