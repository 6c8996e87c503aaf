"""The one cloud state every endpoint reads: moto's EC2 backend, the nodes, faults, the fabric
and the router's security groups.

One re-entrant lock serialises moto (it is not thread-safe), IMDS reads and fabric changes, so
an API call that returns has already changed the fabric and the rules the router enforces
(``reconcile`` runs inside the call).
Attachments held ``attaching`` by an injected delay are wired by a timer when the delay ends.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

from cloud.emulator import backend_state, rules
from cloud.emulator.errors import EmulatorError, FabricError, FirewallError, VlanError
from cloud.emulator.fabric import Fabric
from cloud.emulator.faults import FaultPlan
from cloud.emulator.firewall import Firewall, TrunkCable, desired_policy
from cloud.emulator.wiring import NodeSpec, desired_wiring


class CloudState:
    def __init__(
        self, region: str, fabric: Fabric | None, firewall: Firewall | None = None
    ) -> None:
        self.region = region
        self.account_id = DEFAULT_ACCOUNT_ID
        self.lock = threading.RLock()
        self.fabric = fabric
        self.firewall = firewall
        self.vpc_id = ""
        self.nodes: dict[str, NodeSpec] = {}
        self.faults = FaultPlan(on_attach_delay=self._set_attach_delay)
        self.fabric_errors: list[EmulatorError] = []
        self._timer: threading.Timer | None = None
        self._closed = False

    @property
    def backend(self) -> Any:
        """moto's EC2 backend for this region (hold ``lock`` while using it)."""
        return ec2_backends[self.account_id][self.region]

    def reset(self) -> None:
        """Forget every EC2 resource (moto's state and the emulator's rules state)."""
        with self.lock:
            self.backend.reset()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` against the backend under the lock, then bring the fabric up to date."""
        with self.lock:
            try:
                return fn()
            finally:
                self.reconcile()

    def reconcile(self) -> None:
        """Make the fabric match the cloud state; a failure is recorded and printed, not raised
        (the EC2 call that caused it has already happened)."""
        with self.lock:
            if self._closed:
                return
            if self.fabric is not None and self.vpc_id:
                wiring = desired_wiring(self.backend, self.vpc_id, self.nodes.values())
                try:
                    self.fabric.apply(wiring)
                except (FabricError, VlanError) as e:
                    self._failed(e)
                if self.firewall is not None:
                    trunks = [
                        TrunkCable(eni_id=e, ifname=i, mac=m)
                        for e, (i, m) in self.fabric.trunk_cables().items()
                    ]
                    policy = desired_policy(
                        self.backend,
                        self.vpc_id,
                        self.nodes.values(),
                        self.fabric.ports(),
                        trunks,
                    )
                    try:
                        self.firewall.apply(policy)
                    except FirewallError as e:
                        self._failed(e)
            self._schedule_attach_timer()

    def _failed(self, error: EmulatorError) -> None:
        self.fabric_errors.append(error)
        print(f"podwire emulator: fabric: {error}", file=sys.stderr)

    def instance_of_address(self, address: str) -> str | None:
        """The simulated node whose ENIs hold ``address`` (an IP, inside a prefix or a pod
        CIDR), or None."""
        ip = IPv4Address(address)
        with self.lock:
            for spec in self.nodes.values():
                instance = self.backend.get_instance(spec.instance_id)
                if any(ip in cidr for cidr in spec.pod_cidrs):
                    return spec.instance_id
                for eni in instance.nics.values():
                    if address in rules.private_ips_of(eni) or any(
                        ip in p for p in rules.prefixes_of(eni)
                    ):
                        return spec.instance_id
        return None

    def close(self) -> None:
        with self.lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if self.firewall is not None:
                self.firewall.close()

    def _set_attach_delay(self, seconds: float) -> None:
        with self.lock:
            backend_state.extras(self.backend).attach_delay = seconds

    def _schedule_attach_timer(self) -> None:
        pending = backend_state.extras(self.backend).attaching_until
        now = time.monotonic()
        for eni_id in [e for e, t in pending.items() if t <= now]:
            del pending[eni_id]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if pending:
            wait = min(pending.values()) - now + 0.005
            self._timer = threading.Timer(wait, self.reconcile)
            self._timer.daemon = True
            self._timer.start()
