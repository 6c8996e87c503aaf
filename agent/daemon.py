"""podwire-agent: one task group owning every long-lived service of the node.

Start order: restore state (checkpoint matched against the provider's inventory and the
kernel), replay spooled DELs, and only then serve the socket — a request never sees a
half-restored pool. SIGTERM/SIGINT cancel the group; nothing the pods depend on is removed on
the way out (pods keep working while the agent restarts).
"""

from __future__ import annotations

import logging
import signal
from functools import partial
from pathlib import Path

import anyio
import anyio.abc

from agent import checkpoint as ckpt
from agent import spool
from agent.api import MUTATING, AgentApi
from agent.cni import CniService
from agent.config import Config
from agent.datapath import ThreadedDatapath
from agent.ipam import IpPool
from cloud.provider import Provider
from cloud.static import StaticProvider
from netlink.veth import Datapath
from rpc.server import serve

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
            scope.cancel()
            return


async def run(
    cfg: Config, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run the agent until cancelled or signalled."""
    Path(cfg.agent.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    if cfg.agent.ip_forward:
        enable_forwarding()
    datapath = Datapath()
    provider = build_provider(cfg)
    cni = CniService(
        pool=IpPool(cooldown=cfg.ipam.cooldown),
        datapath=ThreadedDatapath(datapath),
        provider=provider,
        checkpoint_path=cfg.state_path,
        mtu=cfg.mtu,
        add_wait=cfg.agent.add_wait,
    )
    snapshot = ckpt.load(cfg.state_path)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signals, tg.cancel_scope)
            await tg.start(cni.run)
            dropped = await cni.restore(snapshot)
            replayed, kept = await spool.replay(Path(cfg.agent.spool_dir), cni.delete)
            await tg.start(
                partial(
                    serve,
                    cfg.agent.socket,
                    AgentApi(cni, cfg),
                    mutating=MUTATING,
                    deadline=cfg.agent.request_timeout,
                    socket_gid=_group_id(cfg.agent.socket_group),
                )
            )
            log.info(
                "ready",
                extra={
                    "provider": provider.name,
                    "allocations": len(cni.allocations),
                    "dropped": len(dropped),
                    "spool_replayed": replayed,
                    "spool_kept": kept,
                    "pool": repr(cni.pool),
                    "socket": cfg.agent.socket,
                },
            )
            task_status.started()
    finally:
        datapath.close()


def _group_id(name: str) -> int | None:
    if not name:
        return None
    import grp

    return grp.getgrnam(name).gr_gid
