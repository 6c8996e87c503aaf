"""Remove namespaces left behind by a crashed test or demo run: ``python -m tests.cleanup``.

Only names made by ``tests.netns.unique_name`` are considered, and only those whose owning
process is gone (pass ``--all`` to remove every ``pw-`` namespace regardless).
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.netns import NETNS_DIR, PREFIX


def _owner_alive(name: str) -> bool:
    parts = name.split("-")
    try:
        pid = int(parts[-2])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> int:
    everything = "--all" in argv
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        names = []
    removed = 0
    for name in names:
        if not name.startswith(PREFIX):
            continue
        if not everything and _owner_alive(name):
            continue
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        removed += 1
    print(f"removed {removed} namespace(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
