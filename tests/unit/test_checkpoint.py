from __future__ import annotations

import tempfile
from ipaddress import IPv4Address
from pathlib import Path

import anyio
import attrs
import pytest

from agent.checkpoint import (
    Allocation,
    Checkpoint,
    CheckpointCorrupt,
    CoolingEntry,
    Snapshot,
    decode,
    encode,
    load,
    on_tmpfs,
    remove_stale_temps,
)

A = Allocation(
    network="podwire",
    container_id="c1",
    ifname="eth0",
    ip=IPv4Address("10.0.1.5"),
    netns="/run/netns/p1",
    host_veth="pwv0123456789ab",
    owner="10.0.1.0/24",
    table=None,
    pod_namespace="default",
    pod_name="web",
    created_at=1700000000.0,
)


def test_round_trip() -> None:
    snap = Snapshot(
        allocations=(A,), cooling=(CoolingEntry(ip=IPv4Address("10.0.1.9"), released_at=5.0),)
    )
    assert decode(encode(snap)) == snap


@pytest.mark.parametrize(
    "data", [b"", b"{", b"[]", b'{"version": 99}', b'{"version":1,"allocations":[{"ip":"x"}]}']
)
def test_corrupt_is_refused(data: bytes) -> None:
    with pytest.raises(CheckpointCorrupt):
        decode(data)


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert load(tmp_path / "state.json") == Snapshot()


@pytest.mark.anyio
async def test_group_commit_shares_writes(tmp_path: Path) -> None:
    allocs: list[Allocation] = []
    ck = Checkpoint(tmp_path / "state.json", lambda: Snapshot(allocations=tuple(allocs)))

    async def change_and_commit(i: int) -> None:
        allocs.append(attrs.evolve(A, container_id=f"c{i}", ip=IPv4Address(f"10.0.1.{i + 2}")))
        await ck.commit()
        # what this caller changed is on disk when its commit returns
        on_disk = {a.container_id for a in load(ck.path).allocations}
        assert f"c{i}" in on_disk

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(change_and_commit, i)
    assert len(load(ck.path).allocations) == 50
    assert ck.writes < 50  # concurrent commits were grouped
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.anyio
async def test_failed_write_raises_and_next_commit_retries(tmp_path: Path) -> None:
    target = tmp_path / "dir" / "state.json"
    ck = Checkpoint(target, Snapshot)
    with pytest.raises(OSError):
        await ck.commit()  # directory missing
    target.parent.mkdir()
    await ck.commit()
    assert load(target) == Snapshot()


def test_stale_temp_files_of_killed_agents_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{}")
    stale = [tmp_path / ".state.json.123.tmp", tmp_path / ".state.json.99999.tmp"]
    for p in stale:
        p.write_text("half")
    other = tmp_path / ".other.tmp"
    other.write_text("x")
    assert sorted(remove_stale_temps(path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp", "state.json"]


@pytest.mark.anyio
async def test_on_tmpfs_the_write_is_made_on_the_event_loop(tmp_path: Path) -> None:
    if not on_tmpfs(Path("/dev/shm")):
        pytest.skip("no tmpfs at /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        for where, inline in ((Path(shm), True), (tmp_path, on_tmpfs(tmp_path))):
            cp = Checkpoint(where / "state.json", lambda: Snapshot(allocations=(A,)))
            await cp.commit()
            assert cp._inline is inline and load(cp.path).allocations == (A,)
