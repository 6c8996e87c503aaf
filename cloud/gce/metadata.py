"""The GCE metadata server over aiohttp (asyncio only): instance facts, the NIC, alias ranges.

Every request carries ``Metadata-Flavor: Google`` and every reply must carry it back: one that
does not came from something else (a proxy, the wrong address) and raises NotGceMetadata. The
paths are the ones Kubernetes' own GCE node scripts read: ``instance/network-interfaces/<n>/
ip-aliases/`` (a listing: one index per line) and ``.../ip-aliases/<i>`` (one CIDR), plus the
NIC's ``ip``, ``subnetmask``, ``gateway``, ``mac`` and ``mtu`` and the instance's ``id``,
``zone`` and ``name``. Changes are followed with ``?wait_for_change=true&last_etag=<etag>&
timeout_sec=<n>``: the server answers at once when the value's ETag differs from ``last_etag``,
else when it changes, else after ``timeout_sec`` with the same ETag.

Errors leave as ``cloud`` exceptions: CloudUnavailable (no answer, 5xx, after a few quick
retries), MetadataError (another status), NotGceMetadata, BadMetadata (a value that does not
parse).
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network

import aiohttp
import anyio
import attrs

from cloud.errors import BadMetadata, CloudUnavailable, MetadataError, NotGceMetadata
from cloud.local_http import LocalHttpClient

# metadata.google.internal resolves to this address on GCE; the address needs no DNS.
DEFAULT_BASE_URL = "http://169.254.169.254/computeMetadata/v1"
FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR = "Google"
ETAG_HEADER = "ETag"


def nic_path(nic: int) -> str:
    return f"instance/network-interfaces/{nic}/"


def aliases_path(nic: int) -> str:
    """The listing of the NIC's alias IP ranges (a directory: the trailing slash matters)."""
    return nic_path(nic) + "ip-aliases/"


@attrs.frozen(kw_only=True)
class Reply:
    text: str
    etag: str


@attrs.frozen(kw_only=True)
class InstanceFacts:
    id: str
    zone: str  # the zone's name (the server gives projects/<number>/zones/<name>)
    name: str


@attrs.frozen(kw_only=True)
class InterfaceFacts:
    ip: IPv4Address
    subnet: IPv4Network  # from ip and subnetmask
    gateway: IPv4Address
    mac: str
    mtu: int | None


def parse_listing(text: str) -> list[str]:
    """Entries of a directory listing, without the trailing ``/`` of subdirectories."""
    return [line.strip().rstrip("/") for line in text.splitlines() if line.strip()]


def parse_alias(path: str, text: str) -> IPv4Network:
    """One alias range (``10.4.1.0/24``; a bare address is a /32); raises BadMetadata."""
    value = text.strip()
    try:
        return IPv4Network(value if "/" in value else f"{value}/32")
    except ValueError as e:
        raise BadMetadata(path, value, str(e)) from None


def _address(path: str, text: str) -> IPv4Address:
    try:
        return IPv4Address(text.strip())
    except ValueError as e:
        raise BadMetadata(path, text.strip(), str(e)) from None


class GceMetadata(LocalHttpClient):
    """A GCE metadata client; use as an async context manager (it owns an aiohttp session)."""

    def __init__(
        self, base_url: str = DEFAULT_BASE_URL, *, timeout: float = 5.0, attempts: int = 3
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self.requests = 0

    def __repr__(self) -> str:
        return f"<GceMetadata {self.base_url} requests={self.requests}>"

    async def get(
        self, path: str, params: Mapping[str, str] | None = None, *, timeout: float | None = None
    ) -> Reply:
        """Return the text and ETag at ``path`` (relative to the base URL).

        A connection failure, a timeout or a 5xx is retried ``attempts`` times with a short
        backoff, then raises CloudUnavailable; another non-200 status raises MetadataError;
        a reply without ``Metadata-Flavor: Google`` raises NotGceMetadata.
        """
        url = f"{self.base_url}/{path.lstrip('/')}"
        last: BaseException | None = None
        for attempt in range(self.attempts):
            if attempt:
                await anyio.sleep(0.05 * 2**attempt)
            self.requests += 1
            try:
                with anyio.fail_after(timeout or self.timeout):
                    async with self._http().get(
                        url,
                        params=params,
                        headers={FLAVOR_HEADER: FLAVOR},
                        allow_redirects=False,
                    ) as resp:
                        text = await resp.text()
                        if resp.headers.get(FLAVOR_HEADER) != FLAVOR:
                            raise NotGceMetadata(url, resp.status)
                        if resp.status == 200:
                            return Reply(text=text, etag=resp.headers.get(ETAG_HEADER, ""))
                        if resp.status < 500:
                            raise MetadataError(path, resp.status, "GCE metadata")
                        last = MetadataError(path, resp.status, "GCE metadata")
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                last = e
        raise CloudUnavailable(f"GCE metadata {path}", repr(last))

    async def text(self, path: str) -> str:
        return (await self.get(path)).text.strip()

    async def wait_for_change(
        self, path: str, *, last_etag: str, timeout_sec: int, recursive: bool = False
    ) -> Reply:
        """Return ``path`` once its ETag differs from ``last_etag`` (at once if it already
        does), or after ``timeout_sec`` with the same ETag. Raises as ``get``."""
        params = {"wait_for_change": "true", "timeout_sec": str(timeout_sec)}
        if last_etag:
            params["last_etag"] = last_etag
        if recursive:
            params["recursive"] = "true"
        return await self.get(path, params, timeout=timeout_sec + self.timeout)

    async def instance(self) -> InstanceFacts:
        """The instance's numeric id, zone name and name."""
        zone = await self.text("instance/zone")
        return InstanceFacts(
            id=await self.text("instance/id"),
            zone=zone.rsplit("/", 1)[-1],
            name=await self.text("instance/name"),
        )

    async def interface(self, nic: int = 0) -> InterfaceFacts:
        """The NIC's address, subnet (from ``subnetmask``), gateway, MAC and MTU."""
        base = nic_path(nic)
        ip = _address(base + "ip", await self.text(base + "ip"))
        mask = await self.text(base + "subnetmask")
        try:
            subnet = IPv4Network(f"{ip}/{mask}", strict=False)
        except ValueError as e:
            raise BadMetadata(base + "subnetmask", mask, str(e)) from None
        try:
            mtu_text = await self.text(base + "mtu")
            mtu: int | None = int(mtu_text)
        except MetadataError as e:
            if e.status != 404:
                raise
            mtu = None
        except ValueError:
            mtu = None
        return InterfaceFacts(
            ip=ip,
            subnet=subnet,
            gateway=_address(base + "gateway", await self.text(base + "gateway")),
            mac=(await self.text(base + "mac")).lower(),
            mtu=mtu,
        )

    async def alias_ranges(self, nic: int = 0) -> tuple[IPv4Network, ...]:
        """The NIC's alias IP ranges: the listing, then each entry (raises BadMetadata for an
        entry that is not a CIDR)."""
        listing = await self.text(aliases_path(nic))
        out = []
        for entry in sorted(parse_listing(listing), key=lambda e: (len(e), e)):
            path = aliases_path(nic) + entry
            out.append(parse_alias(path, await self.text(path)))
        return tuple(out)

    async def aliases_etag(self, nic: int = 0) -> str:
        """The ETag of the NIC's alias ranges as a whole: that of the listing's recursive view
        (a JSON list of the CIDRs), which changes when any range does."""
        return (await self.get(aliases_path(nic), {"recursive": "true"})).etag
