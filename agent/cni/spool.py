"""Replay of the DELs the plugin spooled while the agent was unreachable.

Each file holds one ``{"env": {...}, "config": {...}}`` document, written atomically by the
plugin. At start the agent replays them in order before serving the socket; a file is removed
once its DEL succeeded or was found invalid (an invalid DEL can never succeed), and kept for
the next replay when the DEL failed for a passing reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from agent.cni.spec import CniError, CniRequest, validate

log = logging.getLogger("podwire.spool")


# A plugin writes its temp file and renames it within milliseconds; one older than this was
# left by a plugin killed mid-write and will never be renamed.
STALE_TEMP_AGE = 60.0


async def replay(
    spool_dir: Path, delete: Callable[[CniRequest], Awaitable[None]]
) -> tuple[int, int]:
    """Replay every spooled DEL; return (replayed, kept for later). Also removes the temp
    files of plugins killed while spooling."""
    _remove_stale_temps(spool_dir)
    try:
        files = sorted(
            (p for p in spool_dir.iterdir() if p.suffix == ".json" and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime_ns,
        )
    except FileNotFoundError:
        return 0, 0
    done = kept = 0
    for path in files:
        try:
            doc = orjson.loads(path.read_bytes())
            env = {str(k): str(v) for k, v in doc["env"].items()}
            req = validate(env, doc["config"])
            if req.command != "DEL":
                raise CniError(4, f"spooled command is {req.command}, not DEL")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, CniError) as e:
            log.error("discarding unusable spooled DEL", extra={"file": path.name, "error": str(e)})
            path.unlink(missing_ok=True)
            continue
        try:
            await delete(req)
        except Exception as e:
            log.warning(
                "spooled DEL failed; kept for later", extra={"key": str(req.key), "error": str(e)}
            )
            kept += 1
            continue
        path.unlink(missing_ok=True)
        log.info("replayed spooled DEL", extra={"key": str(req.key)})
        done += 1
    return done, kept


def _remove_stale_temps(spool_dir: Path) -> None:
    try:
        temps = [p for p in spool_dir.iterdir() if p.name.startswith(".")]
    except FileNotFoundError:
        return
    now = time.time()
    for path in temps:
        try:
            if now - path.stat().st_mtime > STALE_TEMP_AGE:
                path.unlink()
                log.info("removed a stale spool temp file", extra={"file": path.name})
        except FileNotFoundError:
            pass
