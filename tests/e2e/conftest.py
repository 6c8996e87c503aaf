"""Fixtures for the emulator: a running ``Vpc`` (with or without the namespace fabric) and
aiobotocore EC2 clients that talk to it over real HTTP. Every ``Vpc`` is stopped at teardown,
whatever the test did; a crashed run's namespaces are removed by ``python -m cloud.emulator
cleanup``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from cloud.emulator import Vpc


@pytest.fixture
def anyio_backend() -> str:
    # aiobotocore is asyncio-only.
    return "asyncio"


@pytest.fixture
def cloud() -> Iterator[Vpc]:
    """The EC2 API and IMDS only (no namespaces, no root needed), fresh state per test."""
    with Vpc.start(fabric=False) as vpc:
        yield vpc


@pytest.fixture
def vpc() -> Iterator[Vpc]:
    """The full emulator: router and internet namespaces; nodes are added by the test."""
    with Vpc.start() as running:
        yield running
        assert running.state.fabric_errors == []


# One session for the run: it caches botocore's EC2 model (~0.4 s to load).
_session = get_session()


def ec2_client(vpc: Vpc, attempts: int = 1) -> AbstractAsyncContextManager[Any]:
    """An aiobotocore EC2 client for ``vpc`` with ``attempts`` tries per call (standard mode)."""
    config = AioConfig(retries={"mode": "standard", "total_max_attempts": attempts})
    return _session.create_client("ec2", config=config, **vpc.client_kwargs())


@pytest.fixture
async def ec2(cloud: Vpc) -> AsyncIterator[Any]:
    """An EC2 client for the ``cloud`` fixture, without retries (errors surface at once)."""
    async with ec2_client(cloud) as client:
        yield client
