"""Replay of the plugin's DEL spool (agent.cni.spool)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.cni import spool
from agent.cni.spec import CniRequest


@pytest.mark.anyio
async def test_replay_removes_temp_files_of_killed_plugins_only_when_old(tmp_path: Path) -> None:
    old, fresh = tmp_path / ".del-1-2", tmp_path / ".del-3-4"
    old.write_text("half")
    fresh.write_text("being written")
    past = time.time() - spool.STALE_TEMP_AGE - 5
    os.utime(old, (past, past))
    seen: list[CniRequest] = []

    async def delete(req: CniRequest) -> None:
        seen.append(req)

    assert await spool.replay(tmp_path, delete) == (0, 0)
    assert not old.exists() and fresh.exists() and seen == []
