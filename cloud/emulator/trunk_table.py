"""The trunk-interface associations of one EC2 backend: plain data, indexed by branch."""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class TrunkAssociation:
    """One branch ENI reached through a VLAN of a trunk ENI (attribute names = EC2's shape)."""

    association_id: str
    branch_interface_id: str
    trunk_interface_id: str
    vlan_id: int
    interface_protocol: str = "VLAN"


@attrs.frozen
class TrunkRequest:
    """What an AssociateTrunkInterface call asked for (compared for client-token reuse)."""

    branch_interface_id: str
    trunk_interface_id: str
    vlan_id: int | None


class TrunkTable:
    """The associations of one backend, by id, by branch and by trunk, plus the client tokens
    seen (token -> the request and the association it made)."""

    def __init__(self) -> None:
        self.by_id: dict[str, TrunkAssociation] = {}
        self._by_branch: dict[str, str] = {}
        self.tokens: dict[str, tuple[TrunkRequest, TrunkAssociation]] = {}

    def of_branch(self, eni_id: str) -> TrunkAssociation | None:
        """The association ``eni_id`` is the branch of, or None."""
        found = self._by_branch.get(eni_id)
        return self.by_id[found] if found is not None else None

    def of_trunk(self, eni_id: str) -> list[TrunkAssociation]:
        """The associations of trunk ``eni_id``, oldest first."""
        return [a for a in self.by_id.values() if a.trunk_interface_id == eni_id]

    def add(self, assoc: TrunkAssociation) -> None:
        self.by_id[assoc.association_id] = assoc
        self._by_branch[assoc.branch_interface_id] = assoc.association_id

    def remove(self, association_id: str) -> TrunkAssociation | None:
        assoc = self.by_id.pop(association_id, None)
        if assoc is not None:
            self._by_branch.pop(assoc.branch_interface_id, None)
        return assoc

    def drop_eni(self, eni_id: str) -> list[TrunkAssociation]:
        """Remove every association ``eni_id`` is the trunk or the branch of; return them."""
        gone = [
            a
            for a in self.by_id.values()
            if eni_id in (a.branch_interface_id, a.trunk_interface_id)
        ]
        for assoc in gone:
            self.remove(assoc.association_id)
        return gone

    def __len__(self) -> int:
        return len(self.by_id)

    def __repr__(self) -> str:
        trunks = len({a.trunk_interface_id for a in self.by_id.values()})
        return f"TrunkTable(associations={len(self.by_id)}, trunks={trunks})"
