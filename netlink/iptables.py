"""iptables from Python: ``<binary>-save`` and ``<binary>-restore --noflush -w``.

A restore is atomic per table. Binaries act in the namespace of the calling thread, or in
``netns_path`` through ``nsenter``; see ``netlink.nftables.NetnsBinding``.
"""

from __future__ import annotations

import shutil
import subprocess

from netlink.errors import NetlinkError
from netlink.nftables import NetnsBinding


class IptablesError(NetlinkError):
    """An iptables binary failed. Carries the command, the start of its input and stderr."""

    def __init__(self, command: str, input_excerpt: str, stderr: str) -> None:
        super().__init__(f"{command} failed: {stderr.strip() or 'no error text'}")
        self.command = command
        self.input_excerpt = input_excerpt
        self.stderr = stderr


class IptablesUnavailable(NetlinkError):
    """The iptables binaries are not installed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"iptables unavailable: {reason}")
        self.reason = reason


class IptablesRestore:
    """``<binary>-save`` / ``<binary>-restore`` in one namespace.

    ``binary`` is ``iptables-nft`` (default), ``iptables-legacy`` or ``iptables``.
    """

    kind = "iptables"

    def __init__(self, binary: str = "iptables-nft", *, netns_path: str | None = None) -> None:
        save, restore = shutil.which(f"{binary}-save"), shutil.which(f"{binary}-restore")
        if save is None or restore is None:
            raise IptablesUnavailable(f"no {binary}-save / {binary}-restore")
        self._save: str = save
        self._restore: str = restore
        if netns_path is not None and shutil.which("nsenter") is None:
            raise IptablesUnavailable("nsenter is needed to run iptables in another namespace")
        self.binary = binary
        self._binding = NetnsBinding(netns_path)

    def _exec(self, argv: list[str], stdin: str | None = None) -> str:
        self._binding.check()
        try:
            proc = subprocess.run(
                self._binding.command(argv),
                input=stdin,
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise IptablesError(" ".join(argv), (stdin or "")[:800], str(e)) from e
        if proc.returncode != 0:
            raise IptablesError(" ".join(argv), (stdin or "")[:800], proc.stderr)
        return proc.stdout

    def save(self) -> str:
        """Return ``iptables-save`` output (all tables)."""
        return self._exec([self._save])

    def restore(self, text: str) -> None:
        """Feed ``text`` to ``iptables-restore --noflush -w``. Raises IptablesError."""
        if text:
            self._exec([self._restore, "--noflush", "-w"], text)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"IptablesRestore(binary={self.binary!r})"
