"""The gce provider: pod addresses are the node's alias IP ranges (GKE's VPC-native mode).

Theory of operation. GCE routes every alias IP range of a VM's NIC to that VM natively (no
custom routes), so the node only has to hand the range's addresses to pods and route them to
their veths. ``inventory`` reads, from the metadata server, the instance (id, zone, name), the
NIC (address, subnet mask, gateway, MAC, MTU) and its alias ranges, and returns one block per
range: every usable address (never the network or broadcast address, nor the node's own address,
the gateway or a configured reserved one). The ETag of the ranges is taken *before* they are read,
so a change that lands in between is seen by the next wait. ``watch_ranges`` then long-polls the
ranges' recursive view with ``wait_for_change`` and ``last_etag``; when the ETag moves it reads
the ranges again by the same paths and yields the new set if it differs. While the server is
unreachable it retries with jittered exponential backoff; the pool keeps serving what it has.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import anyio
import attrs

from cloud.errors import BadMetadata, CloudError
from cloud.gce.metadata import GceMetadata, InstanceFacts, InterfaceFacts, aliases_path
from cloud.provider import AddressBlock, NodeFacts
from cloud.static import first_overlap, usable_hosts

log = logging.getLogger("podwire.gce")


@attrs.frozen(kw_only=True)
class GceSettings:
    """The provider's knobs (the daemon fills them from the ``[gce]`` config section)."""

    nic: int = 0
    reserved: tuple[IPv4Address, ...] = ()
    watch_timeout: int = 60  # timeout_sec of each wait_for_change
    retry_base: float = 1.0
    retry_cap: float = 30.0


class GceProvider:
    """``cloud.provider.Provider`` for alias IP ranges, and a ``RangeSource`` for the follower."""

    name = "gce"
    can_grow = False

    def __init__(self, metadata: GceMetadata, settings: GceSettings | None = None) -> None:
        self.metadata = metadata
        self.settings = settings or GceSettings()
        self._instance: InstanceFacts | None = None
        self._nic: InterfaceFacts | None = None
        self._ranges: tuple[IPv4Network, ...] = ()
        self.etag = ""
        self.waits = 0
        self.errors = 0
        self.last_error = ""

    def __repr__(self) -> str:
        name = self._instance.name if self._instance else "?"
        return f"<GceProvider {name} ranges={', '.join(map(str, self._ranges)) or '-'}>"

    @property
    def instance(self) -> InstanceFacts:
        if self._instance is None:
            raise RuntimeError("inventory() has not run yet")
        return self._instance

    @property
    def nic(self) -> InterfaceFacts:
        if self._nic is None:
            raise RuntimeError("inventory() has not run yet")
        return self._nic

    @property
    def ranges(self) -> tuple[IPv4Network, ...]:
        return self._ranges

    @property
    def reserved(self) -> tuple[IPv4Address, ...]:
        """Addresses never handed to a pod even inside a range: the node's own, the gateway,
        and the configured ones."""
        return (self.nic.ip, self.nic.gateway, *self.settings.reserved)

    # -- Provider -----------------------------------------------------------------------------

    async def inventory(self) -> Sequence[AddressBlock]:
        """Read the instance, the NIC and its alias ranges; return one block per range.
        Raises CloudError (BadMetadata for a value that does not parse)."""
        md, nic = self.metadata, self.settings.nic
        self._instance = await md.instance()
        self._nic = await md.interface(nic)
        etag = await md.aliases_etag(nic)
        ranges = await self._read_ranges()
        self._ranges, self.etag = ranges, etag
        log.info(
            "GCE instance %s (%s, %s): %s on %s, alias ranges %s",
            self.instance.name,
            self.instance.id,
            self.instance.zone,
            self.nic.ip,
            self.nic.subnet,
            ", ".join(map(str, ranges)) or "none",
        )
        return self.blocks()

    def blocks(self) -> list[AddressBlock]:
        return [
            AddressBlock(owner=str(r), ips=usable_hosts(r, self.reserved)) for r in self._ranges
        ]

    def facts(self) -> NodeFacts:
        return NodeFacts(
            primary_ip=self.nic.ip, vpc_cidrs=(self.nic.subnet,), pod_cidrs=self._ranges
        )

    async def _read_ranges(self) -> tuple[IPv4Network, ...]:
        ranges = await self.metadata.alias_ranges(self.settings.nic)
        overlap = first_overlap(ranges)
        if overlap is not None:
            a, b = overlap
            raise BadMetadata(aliases_path(self.settings.nic), str(b), f"overlaps {a}")
        return ranges

    # -- following changes --------------------------------------------------------------------

    async def watch_ranges(self) -> AsyncIterator[tuple[IPv4Network, ...]]:
        """Yield each new set of alias ranges, forever (see the module docstring).

        Errors never end the feed: an unreachable server is retried with backoff, a value that
        does not parse is logged and skipped until the ranges change again.
        """
        delay = self.settings.retry_base
        nic = self.settings.nic
        while True:
            try:
                self.waits += 1
                etag = (
                    await self.metadata.wait_for_change(
                        aliases_path(nic),
                        last_etag=self.etag,
                        timeout_sec=self.settings.watch_timeout,
                        recursive=True,
                    )
                ).etag
                if etag == self.etag:
                    continue  # timed out without a change
                try:
                    ranges = await self._read_ranges()
                except BadMetadata:
                    self.etag = etag  # not read again until the ranges change again
                    raise
                self.etag = etag
            except BadMetadata as e:
                self._failed(e, "refused the alias ranges the metadata server gave")
                continue
            except CloudError as e:
                self._failed(e, "cannot follow the alias ranges; retrying")
                await anyio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.settings.retry_cap)
                continue
            delay = self.settings.retry_base
            self.last_error = ""
            if ranges != self._ranges:
                log.info(
                    "alias ranges changed: %s -> %s",
                    ", ".join(map(str, self._ranges)) or "none",
                    ", ".join(map(str, ranges)) or "none",
                )
                self._ranges = ranges
                yield ranges

    def _failed(self, e: CloudError, what: str) -> None:
        self.errors += 1
        text = f"{type(e).__name__}: {e}"
        if text != self.last_error:
            log.error("%s: %s", what, text)
        self.last_error = text

    def status(self) -> dict[str, Any]:
        inst, nic = self._instance, self._nic
        return {
            "instance": attrs.asdict(inst) if inst else None,
            "ip": str(nic.ip) if nic else None,
            "subnet": str(nic.subnet) if nic else None,
            "gateway": str(nic.gateway) if nic else None,
            "mtu": nic.mtu if nic else None,
            "alias_ranges": [str(r) for r in self._ranges],
            "etag": self.etag,
            "waits": self.waits,
            "errors": self.errors,
            "last_error": self.last_error,
        }
