"""IMDSv2 over aiohttp (asyncio only): a session token, instance facts, per-MAC interface data.

The token comes from ``PUT /latest/api/token`` with a TTL header and is renewed a minute before
it expires, or at once when IMDS answers 401 (the token was lost, e.g. IMDS restarted). Every
request has a deadline; a connection failure or 5xx is retried a few times with a short backoff
(IMDS is local and usually answers in a millisecond). Errors leave as ``cloud`` exceptions:
MetadataError (HTTP status), CloudUnavailable (no answer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

import aiohttp
import anyio
import attrs

from cloud.errors import CloudUnavailable, MetadataError
from cloud.local_http import LocalHttpClient

DEFAULT_BASE_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
META = "/latest/meta-data/"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"


@attrs.frozen(kw_only=True)
class InstanceMeta:
    instance_id: str
    instance_type: str
    availability_zone: str
    mac: str
    local_ipv4: IPv4Address


@attrs.frozen(kw_only=True)
class InterfaceMeta:
    """One attached ENI as IMDS sees it (``network/interfaces/macs/<mac>/``)."""

    mac: str
    device_number: int
    interface_id: str
    local_ipv4s: tuple[IPv4Address, ...]
    subnet_id: str
    subnet_cidr: IPv4Network
    security_group_ids: tuple[str, ...]
    vpc_id: str
    vpc_cidrs: tuple[IPv4Network, ...]
    prefixes: tuple[IPv4Network, ...] = ()


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


class Imds(LocalHttpClient):
    """An IMDSv2 client; use as an async context manager (it owns an aiohttp session)."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        token_ttl: int = 21600,
        timeout: float = 2.0,
        attempts: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_ttl = token_ttl
        self.timeout = timeout
        self.attempts = attempts
        self._clock = clock
        self._token: str | None = None
        self._token_expires = 0.0

    def __repr__(self) -> str:
        return f"<Imds {self.base_url} token={'yes' if self._token else 'no'}>"

    async def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        last: BaseException | None = None
        for attempt in range(self.attempts):
            if attempt:
                await anyio.sleep(0.05 * 2**attempt)
            try:
                with anyio.fail_after(self.timeout):
                    async with self._http().request(
                        method, self.base_url + path, headers=headers
                    ) as resp:
                        text = await resp.text()
                        if resp.status < 500:
                            return resp.status, text
                        last = MetadataError(path, resp.status)
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                last = e
        if isinstance(last, MetadataError):
            raise last
        raise CloudUnavailable(f"IMDS {path}", repr(last))

    async def _ensure_token(self, *, renew: bool = False) -> str:
        if not renew and self._token is not None and self._clock() < self._token_expires:
            return self._token
        status, text = await self._request("PUT", TOKEN_PATH, {TTL_HEADER: str(self.token_ttl)})
        if status != 200:
            raise MetadataError(TOKEN_PATH, status)
        self._token = text.strip()
        # Renew a minute early (or halfway for short TTLs) so a token never expires in flight.
        self._token_expires = self._clock() + max(self.token_ttl - 60, self.token_ttl / 2)
        return self._token

    async def get(self, path: str) -> str:
        """Return the text at ``meta-data/<path>``; raises MetadataError (404 included)."""
        full = META + path.lstrip("/")
        token = await self._ensure_token()
        status, text = await self._request("GET", full, {TOKEN_HEADER: token})
        if status == 401:
            token = await self._ensure_token(renew=True)
            status, text = await self._request("GET", full, {TOKEN_HEADER: token})
        if status != 200:
            raise MetadataError(full, status)
        return text

    async def _get_optional(self, path: str) -> str:
        try:
            return await self.get(path)
        except MetadataError as e:
            if e.status == 404:
                return ""
            raise

    async def instance(self) -> InstanceMeta:
        """Return this instance's id, type, zone, primary MAC and primary IPv4 address."""
        return InstanceMeta(
            instance_id=(await self.get("instance-id")).strip(),
            instance_type=(await self.get("instance-type")).strip(),
            availability_zone=(await self.get("placement/availability-zone")).strip(),
            mac=(await self.get("mac")).strip().lower(),
            local_ipv4=IPv4Address((await self.get("local-ipv4")).strip()),
        )

    async def macs(self) -> list[str]:
        """Return the MACs of the attached ENIs."""
        return [m.rstrip("/").lower() for m in _lines(await self.get("network/interfaces/macs/"))]

    async def interface(self, mac: str) -> InterfaceMeta:
        """Return what IMDS knows about the ENI with ``mac``."""
        base = f"network/interfaces/macs/{mac}/"
        vpc_cidrs = _lines(await self._get_optional(base + "vpc-ipv4-cidr-blocks"))
        if not vpc_cidrs:
            vpc_cidrs = _lines(await self.get(base + "vpc-ipv4-cidr-block"))
        return InterfaceMeta(
            mac=mac,
            device_number=int((await self.get(base + "device-number")).strip()),
            interface_id=(await self.get(base + "interface-id")).strip(),
            local_ipv4s=tuple(
                IPv4Address(x) for x in _lines(await self._get_optional(base + "local-ipv4s"))
            ),
            subnet_id=(await self.get(base + "subnet-id")).strip(),
            subnet_cidr=IPv4Network((await self.get(base + "subnet-ipv4-cidr-block")).strip()),
            security_group_ids=tuple(_lines(await self._get_optional(base + "security-group-ids"))),
            vpc_id=(await self.get(base + "vpc-id")).strip(),
            vpc_cidrs=tuple(IPv4Network(c) for c in vpc_cidrs),
            prefixes=tuple(
                IPv4Network(p) for p in _lines(await self._get_optional(base + "ipv4-prefix"))
            ),
        )

    async def interfaces(self) -> list[InterfaceMeta]:
        """Return every attached ENI's data, by device number."""
        found = [await self.interface(mac) for mac in await self.macs()]
        return sorted(found, key=lambda i: i.device_number)
