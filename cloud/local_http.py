"""The HTTP session of a client for a node-local metadata service (EC2's IMDS, GCE's metadata
server): opened and closed as an async context manager, never through a proxy from the
environment (a metadata request must reach the link-local address itself)."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import aiohttp


class LocalHttpClient:
    """Base of a metadata client: ``async with client:`` owns its aiohttp session."""

    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(trust_env=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"{type(self).__name__} used outside 'async with'")
        return self._session
