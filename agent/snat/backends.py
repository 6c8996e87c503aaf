"""The SNAT state applied to the kernel: nftables (one table of ours) or iptables (chains of ours).

Both backends take a ``SnatSpec`` and use ``agent.snat.rules`` to render and to read back; the
transports (``netlink.nftables.Nft``, ``netlink.iptables.IptablesRestore``) know nothing of SNAT.

- nftables: a full apply replaces our table in one transaction (after reading what is there, so
  the base chains are flushed and refilled, never deleted: deleting a nat chain drops the NAT
  bindings of live connections); CIDR changes are set-element deltas.
- iptables: reads ``iptables-save`` to learn which jump rules of ours exist (they live in the
  built-in POSTROUTING / PREROUTING chains, which are not ours to flush), then feeds one
  ``iptables-restore --noflush -w`` per apply: a re-apply leaves exactly one jump.

Blocking: call from a worker thread in the node's namespace, or open with ``netns_path``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Protocol

from agent.snat.rules import (
    NFT_FAMILY,
    NFT_TABLE,
    SetDelta,
    SnatSpec,
    UpdatePlan,
    diff_sets,
    expected_iptables,
    expected_nft_state,
    parse_iptables_save,
    parse_nft_listing,
    plan_update,
    render_iptables,
    render_iptables_removal,
    render_nft,
    render_nft_delta,
    render_nft_removal,
)
from netlink.iptables import IptablesRestore
from netlink.nftables import Nft, NftError, NftUnavailable

BackendPreference = Literal["auto", "nftables", "iptables"]


class SnatBackend(Protocol):
    """What the agent's SNAT reconciler needs from a ruleset backend."""

    @property
    def kind(self) -> str: ...

    def apply(self, spec: SnatSpec) -> None:
        """Make the live state exactly ``spec``'s, atomically."""
        ...

    def update(self, old: SnatSpec | None, new: SnatSpec) -> UpdatePlan:
        """Move from ``old`` (last applied, None if unknown) to ``new`` the cheapest way."""
        ...

    def remove(self) -> bool:
        """Remove everything of ours; succeed when it is already gone. Return whether there
        was anything to remove."""
        ...

    def current_spec_matches(self, spec: SnatSpec) -> bool:
        """True when the live state is exactly ``spec``'s."""
        ...

    def close(self) -> None: ...


class NftSnat:
    """The SNAT state in ``table ip podwire``."""

    def __init__(self, nft: Nft) -> None:
        self.nft = nft

    @property
    def kind(self) -> str:
        """``libnftables`` or ``nft``."""
        return self.nft.kind

    def listing(self) -> dict[str, Any] | None:
        """Our table as nft JSON, or None when it is absent."""
        return self.nft.list_table_json(NFT_FAMILY, NFT_TABLE)

    def apply(self, spec: SnatSpec) -> None:
        """Make our table hold ``spec``'s state in one transaction, removing whatever else was
        added to it. Raises NftError."""
        doc = self.listing()
        present = parse_nft_listing(doc) if doc is not None else None
        self.nft.run(render_nft(spec, present))

    def apply_delta(self, deltas: Iterable[SetDelta]) -> None:
        """Apply set-element changes in one transaction. Raises NftError when the kernel's
        sets are not what the deltas assume (then nothing changed)."""
        script = render_nft_delta(deltas)
        if script:
            self.nft.run(script)

    def update(self, old: SnatSpec | None, new: SnatSpec) -> UpdatePlan:
        """Move from ``old`` (what was applied last, None if unknown) to ``new``: element
        deltas when only CIDRs changed, falling back to a full apply when the kernel's sets
        have drifted. Returns what was done."""
        plan = plan_update(old, new)
        if plan == "delta" and old is not None:
            try:
                self.apply_delta(diff_sets(old, new))
            except NftError:
                self.apply(new)
                return "full"
        elif plan == "full":
            self.apply(new)
        return plan

    def remove(self) -> bool:
        """Delete our table; succeeds when it is already gone. Return whether it existed."""
        existed = self.listing() is not None
        self.nft.run(render_nft_removal())
        return existed

    def current_spec_matches(self, spec: SnatSpec) -> bool:
        """True when the live table holds exactly ``spec``'s chains, rules and set elements
        (a rule edited, a chain flushed or an element removed by someone else reads False)."""
        doc = self.listing()
        if doc is None:
            return False
        return parse_nft_listing(doc) == expected_nft_state(spec)

    def close(self) -> None:
        self.nft.close()

    def __enter__(self) -> NftSnat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NftSnat({self.nft!r})"


class IptablesSnat:
    """The SNAT state in chains of our own (``PODWIRE-*``), one jump to each."""

    kind = "iptables"

    def __init__(self, ipt: IptablesRestore) -> None:
        self.ipt = ipt

    def apply(self, spec: SnatSpec) -> None:
        """Make our chains hold ``spec``'s rules, with exactly one jump to each."""
        self.ipt.restore(render_iptables(spec, parse_iptables_save(self.ipt.save())))

    def update(self, old: SnatSpec | None, new: SnatSpec) -> UpdatePlan:
        """Without sets every change rewrites our chains: a full apply unless nothing changed."""
        if plan_update(old, new) == "unchanged":
            return "unchanged"
        self.apply(new)
        return "full"

    def remove(self) -> bool:
        """Delete our jumps and chains; succeeds when they are already gone. Return whether
        there were any."""
        present = parse_iptables_save(self.ipt.save())
        if not (present.jumps or present.chains):
            return False
        self.ipt.restore(render_iptables_removal(present))
        return True

    def current_spec_matches(self, spec: SnatSpec) -> bool:
        """True when our chains, their rules and the jumps to them are exactly ``spec``'s."""
        return parse_iptables_save(self.ipt.save()) == expected_iptables(spec)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"IptablesSnat({self.ipt!r})"


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
        return IptablesSnat(IptablesRestore(iptables_binary, netns_path=netns_path))
    if preference == "nftables":
        return NftSnat(Nft.open(netns_path=netns_path))
    try:
        nft = Nft.open(netns_path=netns_path)
    except NftUnavailable:
        return IptablesSnat(IptablesRestore(iptables_binary, netns_path=netns_path))
    try:
        nft.run("list tables")  # the kernel may lack nf_tables
    except (NftError, NftUnavailable):
        nft.close()
        return IptablesSnat(IptablesRestore(iptables_binary, netns_path=netns_path))
    return NftSnat(nft)
