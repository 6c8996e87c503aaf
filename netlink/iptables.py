"""iptables backend for the SNAT state (``iptables-restore --noflush``), the backend protocol
shared with nftables, and backend selection.

The backend reads ``iptables-save`` to learn which jump rules of ours exist (they live in the
built-in POSTROUTING / PREROUTING chains, which are not ours to flush), then feeds one
``iptables-restore --noflush -w`` per apply: atomic per table, and a re-apply leaves exactly one
jump. Binaries act in the namespace of the calling thread, or in ``netns_path`` through
``nsenter``; see ``netlink.nftables.NetnsBinding``.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Literal, Protocol

from agent.snat import (
    SnatSpec,
    UpdatePlan,
    expected_iptables,
    parse_iptables_save,
    plan_update,
    render_iptables,
    render_iptables_removal,
)
from netlink.errors import NetlinkError
from netlink.nftables import NetnsBinding, Nft, NftError, NftUnavailable

BackendPreference = Literal["auto", "nftables", "iptables"]


class SnatBackend(Protocol):
    """What the agent's SNAT reconciler needs from a ruleset backend. Blocking: call from a
    worker thread in the node's namespace (or open the backend with ``netns_path``)."""

    @property
    def kind(self) -> str: ...

    def apply(self, spec: SnatSpec) -> None:
        """Make the live state exactly ``spec``'s, atomically."""
        ...

    def update(self, old: SnatSpec | None, new: SnatSpec) -> UpdatePlan:
        """Move from ``old`` (last applied, None if unknown) to ``new`` the cheapest way."""
        ...

    def remove(self) -> None:
        """Remove everything of ours; succeed when it is already gone."""
        ...

    def current_spec_matches(self, spec: SnatSpec) -> bool:
        """True when the live state is exactly ``spec``'s."""
        ...

    def close(self) -> None: ...


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
    """The SNAT state in chains of our own, through ``<binary>-save`` / ``<binary>-restore``.

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

    def apply(self, spec: SnatSpec) -> None:
        """Make our chains hold ``spec``'s rules, with exactly one jump to each."""
        self.restore(render_iptables(spec, parse_iptables_save(self.save())))

    def update(self, old: SnatSpec | None, new: SnatSpec) -> UpdatePlan:
        """Without sets every change rewrites our chains: a full apply unless nothing changed."""
        if plan_update(old, new) == "unchanged":
            return "unchanged"
        self.apply(new)
        return "full"

    def remove(self) -> None:
        """Delete our jumps and chains; succeeds when they are already gone."""
        self.restore(render_iptables_removal(parse_iptables_save(self.save())))

    def current_spec_matches(self, spec: SnatSpec) -> bool:
        """True when our chains, their rules and the jumps to them are exactly ``spec``'s."""
        return parse_iptables_save(self.save()) == expected_iptables(spec)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"IptablesRestore(binary={self.binary!r})"


def choose_backend(
    preference: BackendPreference = "auto",
    *,
    netns_path: str | None = None,
    iptables_binary: str = "iptables-nft",
) -> SnatBackend:
    """Open the SNAT backend: ``nftables`` (libnftables, else the nft binary), ``iptables``, or
    ``auto`` (nftables when the library loads or ``nft`` works, else iptables).

    Raises NftUnavailable / IptablesUnavailable when the asked-for backend cannot be used.
    """
    if preference == "iptables":
        return IptablesRestore(iptables_binary, netns_path=netns_path)
    if preference == "nftables":
        return Nft.open(netns_path=netns_path)
    try:
        nft = Nft.open(netns_path=netns_path)
    except NftUnavailable:
        return IptablesRestore(iptables_binary, netns_path=netns_path)
    try:
        nft.run("list tables")  # the kernel may lack nf_tables
    except (NftError, NftUnavailable):
        nft.close()
        return IptablesRestore(iptables_binary, netns_path=netns_path)
    return nft
