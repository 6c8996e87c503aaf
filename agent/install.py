"""``podwire-agent install-cni`` / ``uninstall``: put the plugin and its conflist in place.

The plugin is copied with an absolute interpreter in its shebang, found now (never a pyenv
shim or a venv: the plugin is stdlib only and must start fast with ``-IS``, one word because
Linux passes the shebang's arguments as one). Files are written atomically so a runtime
scanning the directories never reads half a file. Both steps are idempotent.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

PLUGIN_NAME = "podwire"
CONFLIST_NAME = "10-podwire.conflist"
NETWORK_NAME = "podwire"


def find_interpreter() -> str:
    """Return an absolute path to a system python3 (not a shim, not this venv)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    base = getattr(sys, "_base_executable", sys.executable)
    return os.path.realpath(base)


def _write_atomically(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` unless ``path`` already holds it; return whether it changed."""
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def plugin_source(interpreter: str) -> bytes:
    """The plugin file's bytes with ``interpreter`` in its shebang."""
    text = resources.files("cni_client").joinpath("podwire.py").read_bytes()
    _, _, body = text.partition(b"\n")
    return f"#!{interpreter} -IS\n".encode() + body


def conflist(*, socket: str, spool_dir: str, mtu: int | None, chain: list[str]) -> dict[str, Any]:
    plugin: dict[str, Any] = {"type": PLUGIN_NAME, "agentSocket": socket, "spoolDir": spool_dir}
    if mtu:
        plugin["mtu"] = mtu
    plugins = [plugin]
    for name in chain:
        if name == "portmap":
            plugins.append(
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
            )
        elif name == "bandwidth":
            plugins.append({"type": "bandwidth", "capabilities": {"bandwidth": True}})
        else:
            plugins.append({"type": name})
    return {"cniVersion": "1.0.0", "name": NETWORK_NAME, "plugins": plugins}


def install(
    *,
    bin_dir: Path,
    conf_dir: Path,
    socket: str,
    spool_dir: str,
    mtu: int | None = None,
    chain: list[str] | None = None,
    interpreter: str | None = None,
) -> list[Path]:
    """Install the plugin and the conflist; return the files that changed."""
    changed = []
    plugin = bin_dir / PLUGIN_NAME
    if _write_atomically(plugin, plugin_source(interpreter or find_interpreter()), 0o755):
        changed.append(plugin)
    doc = conflist(socket=socket, spool_dir=spool_dir, mtu=mtu, chain=chain or [])
    conf = conf_dir / CONFLIST_NAME
    if _write_atomically(conf, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n", 0o644):
        changed.append(conf)
    return changed


def uninstall(*, bin_dir: Path, conf_dir: Path) -> list[Path]:
    """Remove the conflist first (the node stops looking network-ready), then the plugin."""
    removed = []
    for path in (conf_dir / CONFLIST_NAME, bin_dir / PLUGIN_NAME):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed

