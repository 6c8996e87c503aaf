"""podwire-agent: one task group owning every long-lived service of the node.

Start order: the health endpoint first (so probes answer during a long restore), then restore
state (checkpoint matched against the provider's inventory and the kernel), replay spooled
DELs, and only then serve the socket — a request never sees a half-restored pool. Readiness
(state restored, provider reachable, pool able to serve) gates writing the CNI conflist, so the
node is not reported network-ready before pods can get an address. SIGTERM/SIGINT cancel the
group; nothing the pods depend on is removed on the way out (pods keep working while the
agent restarts).
"""

from __future__ import annotations

import logging
import signal
from functools import partial
from pathlib import Path

import anyio
import anyio.abc

from agent import checkpoint as ckpt
from agent import install, notify, spool
from agent.api import MUTATING, AgentApi
from agent.cni import CniService
from agent.config import Config
from agent.datapath import ThreadedDatapath
from agent.events import EventBus
from agent.health import (
    POOL_CAN_SERVE,
    PROVIDER_REACHABLE,
    STATE_RESTORED,
    Health,
    install_when_ready,
    pool_readiness,
    serve_http,
)
from agent.ipam import IpPool
from agent.metrics import Metrics
from agent.snat_service import SnatService, pool_cidrs
from cloud.provider import Provider
from cloud.static import StaticProvider
from netlink.veth import Datapath
from rpc.server import ServerStats, serve

log = logging.getLogger("podwire.agent")


def build_provider(cfg: Config) -> Provider:
    if cfg.provider.kind == "static":
        return StaticProvider(cfg.static.cidrs, cfg.static.reserved)
    raise NotImplementedError(f"provider {cfg.provider.kind!r} is not available yet")


def enable_forwarding() -> None:
    """The node routes pod traffic: forwarding on, in the namespace the agent runs in."""
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


async def _stop_on_signals(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            _notify(notify.stopping)
            scope.cancel()
            return


def _notify(send: object, *args: str) -> None:
    try:
        send(*args)  # type: ignore[operator]
    except notify.NotifyError as e:
        log.warning("sd_notify failed", extra={"error": str(e)})


async def run(cfg: Config, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run the agent until cancelled or signalled."""
    Path(cfg.agent.state_dir).mkdir(parents=True, exist_ok=True, mode=0o755)
    if cfg.agent.ip_forward:
        enable_forwarding()
    datapath = Datapath()
    provider = build_provider(cfg)
    events = EventBus()
    cni = CniService(
        pool=IpPool(cooldown=cfg.ipam.cooldown),
        datapath=ThreadedDatapath(datapath),
        provider=provider,
        checkpoint_path=cfg.state_path,
        mtu=cfg.mtu,
        add_wait=cfg.agent.add_wait,
        events=events,
    )
    health, metrics, stats = Health(), Metrics(), ServerStats()
    metrics.watch_pool(cni.pool, cni.clock)
    metrics.watch_rpc(stats)
    metrics.watch_allocations(lambda: len(cni.allocations))
    metrics.watch_health(health)
    health.add_check(POOL_CAN_SERVE, lambda: pool_readiness(cni.pool, cni.clock()))
    snapshot = ckpt.load(cfg.state_path)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signals, tg.cancel_scope)
            port = await tg.start(
                health.run, "health-http",
                partial(serve_http, health, cfg.health.address, cfg.health.port, metrics_text=metrics.text),
            )
            await tg.start(notify.serve_watchdog, health)
            await tg.start(health.run, "veth-deleter", cni.run)
            try:
                dropped = await cni.restore(snapshot)
            except Exception as e:
                health.set_ready(PROVIDER_REACHABLE, False, f"{type(e).__name__}: {e}")
                raise
            health.set_ready(PROVIDER_REACHABLE, True, provider.name)
            health.set_ready(STATE_RESTORED, True, f"{len(cni.allocations)} allocations, {len(dropped)} dropped")
            replayed, kept = await spool.replay(Path(cfg.agent.spool_dir), cni.delete)
            snat = SnatService(
                cfg.snat, facts=provider.facts, metrics=metrics, events=events,
                pod_cidrs=lambda: pool_cidrs(cni.pool, provider.facts().pod_cidrs),
            )
            if cfg.snat.enabled and (provider.facts().vpc_cidrs or cfg.snat.vpc_cidrs):
                await tg.start(health.run, "snat", snat.serve)
            else:
                log.warning("SNAT off: enable it and give snat.vpc_cidrs (static provider)")
            api = AgentApi(cni, cfg, health=health, metrics=metrics, snat=snat)
            await tg.start(
                health.run, "rpc",
                partial(
                    serve, cfg.agent.socket, api, mutating=MUTATING, deadline=cfg.agent.request_timeout,
                    socket_gid=_group_id(cfg.agent.socket_group), stats=stats,
                ),
            )
            if cfg.cni.install:
                await tg.start(
                    install_when_ready, health,
                    partial(install.install, bin_dir=Path(cfg.cni.bin_dir), conf_dir=Path(cfg.cni.conf_dir),
                            socket=cfg.agent.socket, spool_dir=cfg.agent.spool_dir, chain=list(cfg.cni.chain)),
                )
            log.info(
                "ready",
                extra={"provider": provider.name, "allocations": len(cni.allocations),
                       "dropped": len(dropped), "spool_replayed": replayed, "spool_kept": kept,
                       "pool": repr(cni.pool), "socket": cfg.agent.socket,
                       "health": f"http://{cfg.health.address}:{port}"},
            )
            _notify(notify.ready, f"serving {len(cni.allocations)} pods")
            task_status.started()
    finally:
        datapath.close()


def _group_id(name: str) -> int | None:
    if not name:
        return None
    import grp

    return grp.getgrnam(name).gr_gid
