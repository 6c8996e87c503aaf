"""The SNAT reconciler: keeps the kernel's SNAT state equal to the desired state.

Theory of operation: the desired state (``agent.snat.rules.SnatSpec``) is a function of the
configuration, the provider's facts (VPC CIDRs, the node's primary address) and the pod
addresses the node owns. It is applied whole at start (which also repairs whatever a previous
agent left), then kept true:

- when the desired state changes (pod addresses come and go with the pool, external SNAT is
  switched), the backend applies set-element deltas where it can, a full transaction otherwise;
- when someone else changes or flushes the ruleset, the kernel's nftables notifications
  (NETLINK_NETFILTER, group NFNLGRP_NFTABLES) wake a verification at once, and the table is
  re-applied if it differs; a slow timer verifies too, for backends without notifications
  (iptables-legacy). Our own changes also notify; their verification simply finds a match.

Replacing the table does not touch conntrack, so connections keep the NAT decision they started
with when external SNAT is switched. The table is removed only by ``podwire-agent uninstall``,
never when the agent stops: pods keep working while the agent restarts.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from typing import Any

import anyio
import anyio.abc

from agent.config import SnatSection
from agent.events import EventBus
from agent.metrics import Metrics
from agent.pool.ipam import IpPool
from agent.snat.backends import SnatBackend, choose_backend
from agent.snat.rules import SnatSpec, mode_from_vpc_cni
from cloud.provider import NodeFacts

log = logging.getLogger("podwire.snat")

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SIOCGIFADDR = 0x8915


class SnatUnconfigured(Exception):
    """SNAT is enabled but the node's facts do not say where the VPC ends or what to SNAT to."""

    def __init__(self, missing: str) -> None:
        super().__init__(f"SNAT needs {missing}")
        self.missing = missing


def interface_ipv4(name: str) -> IPv4Address | None:
    """The first IPv4 address of interface ``name`` in this namespace, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return IPv4Address(raw[20:24])


def desired_spec(
    cfg: SnatSection, facts: NodeFacts, pod_cidrs: tuple[IPv4Network, ...], *, external: bool
) -> SnatSpec:
    """The SNAT state this node should have; raises SnatUnconfigured when facts are missing."""
    vpc = facts.vpc_cidrs or cfg.vpc_cidrs
    if not vpc:
        raise SnatUnconfigured("the VPC CIDRs (snat.vpc_cidrs with the static provider)")
    node_ip = (
        IPv4Address(cfg.node_ip)
        if cfg.node_ip
        else facts.primary_ip or interface_ipv4(cfg.primary_interface)
    )
    if node_ip is None:
        raise SnatUnconfigured(
            f"the node's address (snat.node_ip, or an address on {cfg.primary_interface})"
        )
    return SnatSpec(
        pod_cidrs=pod_cidrs,
        vpc_cidrs=vpc,
        excluded_cidrs=cfg.exclude_cidrs,
        node_ip=node_ip,
        mode=mode_from_vpc_cni(cfg.mode) if cfg.mode == "prng" else cfg.mode,
        external_snat=external,
        primary_iface=cfg.primary_interface,
    )


def pool_cidrs(pool: IpPool, ranges: tuple[IPv4Network, ...]) -> tuple[IPv4Network, ...]:
    """Pod sources to SNAT: the node's ranges (static, gce) and the addresses pods still hold
    outside them (withdrawn from a range that shrank), else every address the pool owns,
    collapsed."""
    if ranges:
        outside = [
            IPv4Network(ip) for ip in pool.withdrawn_in_use() if not any(ip in r for r in ranges)
        ]
        return tuple(collapse_addresses([*ranges, *outside])) if outside else ranges
    return tuple(collapse_addresses(IPv4Network(ip) for ip in pool.addresses()))


class SnatService:
    def __init__(
        self,
        cfg: SnatSection,
        *,
        facts: Callable[[], NodeFacts],
        pod_cidrs: Callable[[], tuple[IPv4Network, ...]],
        metrics: Metrics | None = None,
        events: EventBus | None = None,
        open_backend: Callable[[], SnatBackend] | None = None,
        run_sync: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self._open_backend = open_backend or partial(choose_backend, cfg.backend)
        # Backends block: worker threads by default (tests on a virtual clock run them inline).
        self._run_sync = run_sync or anyio.to_thread.run_sync
        self.external = cfg.external
        self._facts = facts
        self._pod_cidrs = pod_cidrs
        self.metrics = metrics or Metrics()
        self.events = events or EventBus()
        self.backend: SnatBackend | None = None
        self.applied: SnatSpec | None = None
        self.repairs = 0
        self.reconciles = 0
        self.last_error = ""
        self._wake = anyio.Event()
        self._verify_soon = True
        self._serving = False
        self._urgent = False
        self._reconciled = anyio.Event()

    def __repr__(self) -> str:
        kind = self.backend.kind if self.backend else "-"
        return f"<SnatService backend={kind} applied={self.applied!r} repairs={self.repairs}>"

    def changed(self) -> None:
        """Say the desired state may have changed (pool grew or shrank, a switch flipped)."""
        self._wake.set()

    async def covers(self, ip: IPv4Address, timeout: float = 2.0) -> bool:
        """Return once the kernel's SNAT state covers traffic from ``ip`` (an address the desired
        state counts among the pod sources); True at once when there is nothing to wait for.

        An ADD calls this before it answers: a pod's address can join the sources after the
        pool's ranges were applied (a security-groups pod's branch address, an ENI's new IPs),
        and the pod's first connection must not leave un-NATed. Returns False (and logs) when
        the state still does not cover ``ip`` after ``timeout`` (a failing backend): the ADD
        goes on rather than failing on SNAT.
        """

        def applied() -> bool:
            return self.applied is not None and any(ip in n for n in self.applied.pod_cidrs)

        if not self._serving or applied() or not any(ip in n for n in self._pod_cidrs()):
            return True
        with anyio.move_on_after(timeout):
            self._urgent = True
            while True:
                self.changed()
                await self._reconciled.wait()
                if applied():
                    return True
                await anyio.sleep(0.1)  # that round failed: retry, but never in a tight loop
        log.warning("SNAT state not updated for a new pod", extra={"ip": str(ip)})
        return False

    def set_external(self, external: bool) -> None:
        self.external = external
        self.events.publish("snat.external", external=external)
        self.changed()

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.cfg.enabled,
            "backend": self.backend.kind if self.backend else None,
            "external": self.external,
            "mode": self.cfg.mode,
            "applied": repr(self.applied) if self.applied else None,
            "reconciles": self.reconciles,
            "repairs": self.repairs,
            "last_error": self.last_error,
        }

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._run_sync(fn, *args)

    async def _reconcile(self, *, verify: bool) -> None:
        assert self.backend is not None
        want = desired_spec(self.cfg, self._facts(), self._pod_cidrs(), external=self.external)
        started = time.perf_counter()
        result = "unchanged"
        try:
            if want != self.applied:
                result = await self._run(self.backend.update, self.applied, want)
                self.applied = want
            elif verify and not await self._run(self.backend.current_spec_matches, want):
                await self._run(self.backend.apply, want)
                self.repairs += 1
                result = "repaired"
                log.warning(
                    "SNAT ruleset differed from the desired state; put back",
                    extra={"backend": self.backend.kind},
                )
                self.events.publish("snat.repaired", backend=self.backend.kind)
            self.last_error = ""
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            self.applied = None  # unknown: the next round applies in full
            result = "error"
            log.error("SNAT reconcile failed", extra={"error": self.last_error})
        self.reconciles += 1
        self.metrics.snat_reconciled(self.backend.kind, result, time.perf_counter() - started)
        done, self._reconciled = self._reconciled, anyio.Event()
        done.set()

    async def _watch_nftables(self) -> None:
        """Wake a verification on every nftables change in this namespace."""
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
        try:
            sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            while True:
                await anyio.wait_readable(sock)
                try:
                    while sock.recv(65536):
                        pass
                except BlockingIOError:
                    pass
                except OSError:  # ENOBUFS: we only need to know that something changed
                    pass
                self._verify_soon = True
                self._wake.set()
        finally:
            sock.close()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Apply the desired state, then keep it true until cancelled. Reports the backend."""
        self.backend = await self._run(self._open_backend)
        await self._reconcile(verify=True)
        log.info("SNAT applied", extra={"backend": self.backend.kind, "spec": repr(self.applied)})
        task_status.started(self.backend.kind)
        self._serving = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_nftables)
                while True:
                    with anyio.move_on_after(self.cfg.verify_interval) as timer:
                        await self._wake.wait()
                    self._wake = anyio.Event()
                    if not self._urgent:  # an ADD waiting for its address: no settling
                        await anyio.sleep(0.05)  # let a burst of changes settle into one reconcile
                    self._urgent = False
                    verify = self._verify_soon or timer.cancelled_caught
                    self._verify_soon = False
                    await self._reconcile(verify=verify)
        finally:
            self._serving = False


def remove_all() -> list[str]:
    """Remove the agent's SNAT state from both backends (``podwire-agent uninstall``); return
    the backends where there was some."""
    removed = []
    for pref in ("nftables", "iptables"):
        try:
            backend = choose_backend(pref)
            existed = backend.remove()
            backend.close()
            if existed:
                removed.append(backend.kind)
        except Exception as e:  # a backend that is not there has nothing to remove
            log.debug("nothing removed", extra={"backend": pref, "error": str(e)})
    return removed
