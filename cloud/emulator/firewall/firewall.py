"""The shell around the renderer: applies the rule set in the router's namespace through
libnftables (``netlink.nftables``) and reads the drop counters back."""

from __future__ import annotations

from cloud.emulator import info
from cloud.emulator.errors import FirewallError
from cloud.emulator.firewall.model import Policy
from cloud.emulator.firewall.render import (
    FRAMES_TABLE,
    TABLE,
    Ruleset,
    drops_by_eni,
    parse_counters,
    render_delta,
    render_full,
    render_removed_frame_chains,
    ruleset,
)
from netlink.nftables import Nft, NftError


class Firewall:
    """The security groups of one VPC router: ``apply(policy)`` after every change."""

    def __init__(self, nft: Nft, netns: str) -> None:
        self._nft = nft
        self._netns = netns
        self._applied: Ruleset | None = None
        self.full_applies = 0
        self.delta_applies = 0

    @classmethod
    def open(cls, netns_name: str, netns_path: str) -> Firewall:
        """Bind to the router's namespace (nothing is changed until ``apply``)."""
        return cls(Nft.open(netns_path=netns_path), netns_name)

    @property
    def applied(self) -> Ruleset | None:
        """What the kernel holds now (None before the first apply or after a failure)."""
        return self._applied

    def apply(self, policy: Policy) -> None:
        """Make the router enforce ``policy``: the changes since the last apply, or the whole
        rule set the first time (or when the kernel refuses the changes). Raises
        FirewallError."""
        new = ruleset(policy)
        old, self._applied = self._applied, None
        try:
            if old is None:
                self._run(render_full(new))
                self.full_applies += 1
            else:
                for command in render_removed_frame_chains(old, new):
                    self._run(command, missing_ok=True)
                script = render_delta(old, new)
                if script:
                    try:
                        self._run(script)
                        self.delta_applies += 1
                    except FirewallError:
                        # The kernel is not what we last applied: start over (counters reset).
                        self._run(render_full(new))
                        self.full_applies += 1
        except FirewallError:
            raise
        self._applied = new

    def drops(self) -> dict[str, info.Drops]:
        """Packets dropped so far, per ENI on the wire. Raises FirewallError."""
        packets = parse_counters(self._run(f"list counters table ip {TABLE}"))
        packets |= parse_counters(self._run(f"list counters table netdev {FRAMES_TABLE}"))
        return {
            eni_id: info.Drops(inbound=c["in"], outbound=c["out"], frames=c["frames"])
            for eni_id, c in drops_by_eni(packets).items()
        }

    def remove(self) -> None:
        """Delete both tables (succeeds when they are gone)."""
        self._run(f"add table ip {TABLE}\ndelete table ip {TABLE}\n")
        self._run(f"add table netdev {FRAMES_TABLE}\ndelete table netdev {FRAMES_TABLE}\n")
        self._applied = None

    def close(self) -> None:
        self._nft.close()

    def _run(self, script: str, *, missing_ok: bool = False) -> str:
        try:
            return self._nft.run(script)
        except NftError as e:
            if missing_ok and "No such file or directory" in e.stderr:
                return ""
            raise FirewallError(self._netns, e.stderr, e.script_excerpt) from e

    def __repr__(self) -> str:
        return (
            f"Firewall({self._netns}, {self._applied!r}, full={self.full_applies}, "
            f"delta={self.delta_applies})"
        )
