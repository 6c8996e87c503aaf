"""Replay of the DELs the plugin spooled while the agent was unreachable.

Each file holds one ``{"env": {...}, "config": {...}}`` document, written atomically by the
plugin. At start the agent replays them in order before serving the socket; a file is removed
once its DEL succeeded or was found invalid (an invalid DEL can never succeed), and kept for
the next replay when the DEL failed for a passing reason.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from agent.cni.spec import CniError, CniRequest, validate

log = logging.getLogger("podwire.spool")


async def replay(
    spool_dir: Path, delete: Callable[[CniRequest], Awaitable[None]]
) -> tuple[int, int]:
    """Replay every spooled DEL; return (replayed, kept for later)."""
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
