from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.netns import Netns, unique_name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root to create network namespaces")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], Netns]]:
    """Factory fixture: ``make_netns("tag")`` returns a fresh namespace, deleted at teardown."""
    made: list[Netns] = []

    def make(tag: str) -> Netns:
        ns = Netns(unique_name(tag))
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.close()
