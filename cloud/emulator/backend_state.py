"""Emulator state kept beside one moto EC2 backend (it goes when moto's state is reset)."""

from __future__ import annotations

import time
from typing import Any

import attrs

from cloud.emulator.trunk_table import TrunkTable


@attrs.define
class BackendExtras:
    """Attach delays in force, attachments still ``attaching``, trunk associations."""

    attach_delay: float = 0.0
    attaching_until: dict[str, float] = attrs.field(factory=dict)
    trunks: TrunkTable = attrs.field(factory=TrunkTable)


def extras(backend: Any) -> BackendExtras:
    """Return the emulator state of a moto EC2 backend, creating it on first use."""
    found = backend.__dict__.get("_podwire")
    if found is None:
        found = backend.__dict__["_podwire"] = BackendExtras()
    return found  # type: ignore[no-any-return]


def is_attaching(eni: Any) -> bool:
    """Whether an injected attach delay still holds the ENI in the ``attaching`` phase."""
    deadline = extras(eni.ec2_backend).attaching_until.get(eni.id)
    return deadline is not None and time.monotonic() < deadline
