"""podwire-agent: one task group owning every long-lived service of the node.

Start order: the health endpoint first (so probes answer during a long restore), the veth
deleter and the netlink watcher, then restore state (the provider's inventory — IMDS and EC2
for aws, never the disk — matched against the checkpoint and the kernel), the pool refiller,
spooled DELs, SNAT and GC, and only then the socket: a request never sees a half-restored
pool. Readiness (state restored, provider reachable, pool able to serve) gates writing the CNI
conflist, so the node is not reported network-ready before pods can get an address.
SIGTERM/SIGINT cancel the group; nothing the pods depend on is removed on the way out (pods
keep working while the agent restarts).
"""

from __future__ import annotations

import logging
import resource
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.abc

from agent import checkpoint as ckpt
from agent import install, notify
from agent.api import MUTATING, AgentApi
from agent.cni import spool
from agent.cni.datapath import ThreadedDatapath
from agent.cni.service import CniService
from agent.config import Config, ConfigError, node_name, pool_targets
from agent.events import EventBus
from agent.gc import GcPolicy, GcService, KernelGc
from agent.health import (
    POOL_CAN_SERVE,
    PROVIDER_REACHABLE,
    STATE_RESTORED,
    Health,
    install_when_ready,
    pool_readiness,
    serve_http,
)
from agent.metrics import Metrics
from agent.pool import refiller
from agent.pool.ipam import IpPool
from agent.pool.pool_math import InstanceLimits, max_pods
from agent.pool.ranges import RangeFollower, RangeSource
from agent.repair import Repairer
from agent.sg.gc import SgGc
from agent.sg.metrics import SgMetrics
from agent.sg.service import SgService, snat_sources
from agent.snat.masq import IpMasqPolicy, ip_masq_facts
from agent.snat.service import SnatService, pool_cidrs
from cloud.provider import NodeFacts, Provider
from cloud.static import StaticProvider
from netlink.veth import Datapath
from netlink.watcher import Watcher
from rpc.server import Limits, ServerStats, serve

log = logging.getLogger("podwire.agent")


async def open_provider(
    cfg: Config, stack: AsyncExitStack, watcher: Watcher, metrics: Metrics, kube: Any = None
) -> Provider:
    """The configured provider; an aws provider's clients live as long as ``stack``."""
    if cfg.provider.kind == "static" and cfg.static.source == "node":
        from agent.kube.ranges import NodePodCidrs

        return NodePodCidrs(kube, cfg.static.reserved)
    if cfg.provider.kind == "static":
        return StaticProvider(cfg.static.cidrs, cfg.static.reserved)
    if cfg.provider.kind == "gce":
        return await open_gce_provider(cfg, stack)
    from cloud.aws.ec2 import RetryPolicy, open_ec2
    from cloud.aws.imds import Imds
    from cloud.aws.provider import AwsProvider, AwsSettings, NetlinkEniLinks

    aws = cfg.aws
    imds = await stack.enter_async_context(Imds(aws.imds_url))
    region = aws.region or (await imds.instance()).availability_zone[:-1]
    policy = RetryPolicy(
        base=aws.retry_base,
        cap=aws.retry_cap,
        max_attempts=aws.retry_attempts,
        attempt_timeout=aws.call_timeout,
        deadline=aws.call_deadline,
    )
    ec2 = await stack.enter_async_context(
        open_ec2(
            region=region,
            endpoint_url=aws.ec2_endpoint or None,
            policy=policy,
            rate=aws.ec2_rate,
            burst=aws.ec2_burst,
            on_call=metrics.ec2_call,
        )
    )
    settings = AwsSettings(
        cluster_name=aws.cluster_name or None,
        mtu=cfg.mtu,
        subnet_id=aws.subnet_id or None,
        security_groups=aws.security_groups,
        link_timeout=aws.link_timeout,
        leak_grace=aws.leak_grace,
        leak_interval=aws.leak_interval,
    )
    return AwsProvider(
        imds=imds, ec2=ec2, link_waiter=watcher, links=NetlinkEniLinks(None), settings=settings
    )


async def open_gce_provider(cfg: Config, stack: AsyncExitStack) -> Provider:
    """The gce provider; its metadata client lives as long as ``stack``."""
    from cloud.gce import GceMetadata, GceProvider, GceSettings

    g = cfg.gce
    metadata = await stack.enter_async_context(
        GceMetadata(g.metadata_url, timeout=g.request_timeout)
    )
    settings = GceSettings(
        nic=g.network_interface,
        reserved=g.reserved,
        watch_timeout=g.watch_timeout,
        retry_base=g.retry_base,
        retry_cap=g.retry_cap,
    )
    return GceProvider(metadata, settings)


async def _restore_until_reachable(
    cfg: Config,
    stack: AsyncExitStack,
    watcher: Watcher,
    metrics: Metrics,
    health: Health,
    datapath: ThreadedDatapath,
    events: EventBus,
    snapshot: ckpt.Snapshot,
    kube: Any = None,
) -> tuple[Provider, CniService, list[tuple[ckpt.Allocation, str]]]:
    """Open the provider and restore state, retrying with backoff while the cloud cannot be
    reached: the agent stays alive (liveness) and says why it is not ready (readiness)."""
    delay = 1.0
    sg_metrics = SgMetrics(metrics.registry)  # once: a retried restore makes a new SgService
    while True:
        attempt = AsyncExitStack()
        try:
            provider = await open_provider(cfg, attempt, watcher, metrics, kube)
            pool = IpPool(cooldown=cfg.ipam.cooldown)
            sg = None
            if provider.name == "aws":
                from agent.sg.aws import sg_service

                sg = sg_service(
                    cfg,
                    provider,
                    watcher=watcher,
                    rules=datapath,
                    events=events,
                    metrics=sg_metrics,
                    kube=kube,
                    pool=pool,
                )
            cni = CniService(
                pool=pool,
                datapath=datapath,
                provider=provider,
                checkpoint_path=cfg.state_path,
                mtu=cfg.mtu,
                add_wait=cfg.agent.add_wait,
                events=events,
                sg=sg,
            )
            if sg is not None:
                sg.commit = cni.checkpoint.commit
                sg.live = cni.holds
            dropped = await cni.restore(snapshot)
        except ckpt.CheckpointCorrupt:
            await attempt.aclose()
            raise
        except Exception as e:
            await attempt.aclose()
            reason = f"{type(e).__name__}: {e}"
            health.set_ready(PROVIDER_REACHABLE, False, reason)
            log.error(
                "cannot restore state from the provider; retrying",
                extra={"error": reason, "retry_in_s": delay},
            )
            await anyio.sleep(delay)
            delay = min(delay * 2, 30.0)
            continue
        await stack.enter_async_context(attempt)
        return provider, cni, dropped


# Descriptors kept for everything but client connections (netlink, checkpoint, threads).
FD_RESERVE = 256


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most 2**20); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit", extra={"error": str(e)})
    return soft


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


def _notify(send: Callable[..., bool], *args: str) -> None:
    try:
        send(*args)
    except notify.NotifyError as e:
        log.warning("sd_notify failed", extra={"error": str(e)})


async def _start_aws_services(
    cfg: Config,
    tg: anyio.abc.TaskGroup,
    health: Health,
    cni: CniService,
    provider: Any,
    on_pool_change: Callable[[], None],
) -> Any:
    """The fwmark rule, the refiller and the leaked-ENI cleanup; returns the refiller."""
    from netlink import eni

    await eni.ensure_fwmark_rule(None)
    targets = pool_targets(cfg)
    # security groups for pods: the trunk's ENI slot is never the pool's
    sg = cast("SgService | None", cni.sg)
    reserved = 1 if sg is not None and sg.reserves_trunk_slot else 0
    limits = InstanceLimits(
        max_enis=max(1, provider.max_enis - reserved), ipv4_per_eni=provider.ipv4_per_eni
    )

    def take_demand() -> anyio.Event:
        # ADDs set cni.demand when they wait for an address; the refiller consumes it
        event = cni.demand
        if event.is_set():
            cni.demand = anyio.Event()
        return event

    aws = cfg.aws
    sets = sg.sets if sg is not None else None
    if sets is not None:  # an ADD of a set with no free address wakes the refiller
        sets.wake = lambda: cni.demand.set()  # the current event: take_demand replaces it
    pool_refiller = await tg.start(
        health.run,
        "refiller",
        refiller.Refiller(
            cni.pool,
            provider,
            targets,
            limits,
            cni_notify=on_pool_change,
            demand=take_demand,
            interval=aws.refill_interval,
            min_eni_age=aws.min_eni_age,
            release_interval=aws.release_interval,
            exhaustion_pause=aws.exhaustion_pause,
            reconcile_interval=aws.reconcile_interval,
            pod_limit=max_pods(limits, prefix_mode=targets.prefix_mode, max_eni=targets.max_eni),
            **_set_settings(cfg, sets),
        ).run,
    )
    if aws.leak_cleanup:
        await tg.start(health.run, "eni-leak-cleanup", provider.serve_leak_cleanup)
    return pool_refiller


def _set_settings(cfg: Config, sets: Any) -> dict[str, Any]:
    """The refiller's settings for eni mode's sets of security groups (none: they drain)."""
    if sets is None:
        return {}
    from agent.pool.pool_math import SetTargets

    sg = cfg.security_groups
    return {
        "sets": sets,
        "set_targets": SetTargets(warm_ips=sg.set_warm_ips, reserve_enis=sg.shared_reserve),
        "set_cooldown": sg.set_cooldown,
    }


async def run(
    cfg: Config, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run the agent until cancelled or signalled."""
    if cfg.cni.install:
        install.check_chain(Path(cfg.cni.bin_dir), cfg.cni.chain)  # before serving anything
    nofile = raise_nofile_limit()
    limits = Limits(
        max_connections=min(cfg.agent.max_connections, max(16, nofile - FD_RESERVE)),
        idle_timeout=cfg.agent.idle_timeout,
        read_timeout=cfg.agent.read_timeout,
    )
    Path(cfg.agent.state_dir).mkdir(parents=True, exist_ok=True, mode=0o755)
    for tmp in ckpt.remove_stale_temps(cfg.state_path):
        log.info("removed a stale checkpoint temp file", extra={"file": str(tmp)})
    if cfg.agent.ip_forward:
        enable_forwarding()
    datapath = Datapath()
    threaded = ThreadedDatapath(datapath)
    events, health, metrics, stats = EventBus(), Health(), Metrics(), ServerStats()
    watcher = Watcher()
    snapshot = ckpt.load(cfg.state_path)
    kube_client = open_kube_client(cfg) if cfg.kubernetes.enabled else None
    try:
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signals, tg.cancel_scope)
            port = await tg.start(
                health.run,
                "health-http",
                partial(
                    serve_http,
                    health,
                    cfg.health.address,
                    cfg.health.port,
                    metrics_text=metrics.text,
                ),
            )
            await tg.start(notify.serve_watchdog, health)
            await tg.start(health.run, "netlink-watcher", watcher.serve)
            kube = None
            if kube_client is not None:
                kube = await _start_kube(cfg, stack, tg, health, metrics, events, kube_client)
            provider, cni, dropped = await _restore_until_reachable(
                cfg, stack, watcher, metrics, health, threaded, events, snapshot, kube
            )
            cni.deleter.poke = watcher.add_immediate_callback(
                cni.deleter.on_events, wanted=cni.deleter.wanted
            )
            await tg.start(health.run, "veth-deleter", cni.run)
            health.set_ready(PROVIDER_REACHABLE, True, provider.name)
            health.set_ready(
                STATE_RESTORED, True, f"{len(cni.allocations)} allocations, {len(dropped)} dropped"
            )
            metrics.watch_pool(cni.pool, cni.clock)
            metrics.watch_rpc(stats)
            metrics.watch_allocations(lambda: len(cni.allocations))
            metrics.watch_health(health)
            health.add_check(POOL_CAN_SERVE, lambda: pool_readiness(cni.pool, cni.clock()))

            snat_facts = provider.facts
            if provider.name == "gce":  # SNAT as GKE's ip-masq-agent does it
                snat_facts = partial(ip_masq_facts_of, provider, cfg)
            snat = SnatService(
                cfg.snat,
                facts=snat_facts,
                metrics=metrics,
                events=events,
                pod_cidrs=lambda: (
                    pool_cidrs(
                        cni.pool,
                        provider.facts().pod_cidrs if provider.name in ("static", "gce") else (),
                    )
                    + tuple(snat_sources(cni.allocations.values()))
                ),
            )
            cni.egress_ready = snat.covers
            if cni.sg is not None:
                cast("SgService", cni.sg).on_change = snat.changed

            def pool_changed() -> None:
                cni.notify_pool_changed()
                snat.changed()

            pool_refiller = range_follower = None
            if provider.name == "aws":
                pool_refiller = await _start_aws_services(
                    cfg, tg, health, cni, provider, pool_changed
                )
                if cni.sg is not None:
                    await tg.start(health.run, "security-groups", cast("SgService", cni.sg).run)
                    if kube is not None and cfg.security_groups.enabled:
                        await _start_sg_feeds(tg, health, cni, kube, kube_client, metrics, events)
            if provider.name == "gce" or hasattr(provider, "watch_ranges"):
                follower = RangeFollower(
                    cni.pool, cast(RangeSource, provider), on_change=pool_changed, events=events
                )
                name = "alias-ranges" if provider.name == "gce" else "node-pod-cidrs"
                range_follower = await tg.start(health.run, name, follower.run)
            replayed, kept = await spool.replay(Path(cfg.agent.spool_dir), cni.delete)
            if cfg.snat.enabled and (provider.facts().vpc_cidrs or cfg.snat.vpc_cidrs):
                await tg.start(health.run, "snat", snat.serve)
            else:
                log.warning(snat_off_reason(cfg))
            g = cfg.gc
            gc = GcService(
                cni,
                KernelGc(cni.datapath, watcher.dump_rules),
                policy=GcPolicy(
                    missing_grace=g.missing_grace,
                    orphan_grace=g.orphan_grace or None,
                    own_netns_mounts=g.own_netns_mounts,
                    netns_dirs=g.netns_dirs,
                ),
                interval=g.interval,
                spool_dir=Path(cfg.agent.spool_dir),
                extra=(
                    SgGc(
                        threaded,
                        lambda: list(cni.allocations.values()),
                        cni.deleter.delete,
                        grace=g.missing_grace,
                        clock=cni.clock,
                        trunks=cast("SgService", cni.sg).trunk_indexes,
                    )
                    if cni.sg is not None
                    else None
                ),
            )
            watcher.add_callback(gc.on_watch)
            if cni.sg is not None:
                watcher.add_callback(cast("SgService", cni.sg).on_watch)
            if cfg.agent.repair:
                repairer = Repairer(cni, threaded.repair_host, metrics=metrics, events=events)
                watcher.add_callback(repairer.on_watch)
                await tg.start(health.run, "repair", repairer.serve)
            await tg.start(health.run, "gc", gc.serve)
            api = AgentApi(
                cni,
                cfg,
                health=health,
                metrics=metrics,
                snat=snat,
                gc=gc,
                provider=provider,
                refiller=pool_refiller,
                ranges=range_follower,
                kube=kube,
                sg=cast("SgService | None", cni.sg),
            )
            await tg.start(
                health.run,
                "rpc",
                partial(
                    serve,
                    cfg.agent.socket,
                    api,
                    mutating=MUTATING,
                    deadline=cfg.agent.request_timeout,
                    socket_gid=_group_id(cfg.agent.socket_group),
                    stats=stats,
                    limits=limits,
                ),
            )
            if cfg.cni.install:
                await tg.start(
                    install_when_ready,
                    health,
                    partial(
                        install.install,
                        bin_dir=Path(cfg.cni.bin_dir),
                        conf_dir=Path(cfg.cni.conf_dir),
                        socket=cfg.agent.socket,
                        spool_dir=cfg.agent.spool_dir,
                        chain=list(cfg.cni.chain),
                        name=cfg.cni.network_name,
                        cni_version=cfg.cni.cni_version,
                        capabilities=cfg.cni.capabilities,
                    ),
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
                    "health": f"http://{cfg.health.address}:{port}",
                },
            )
            _notify(notify.ready, f"serving {len(cni.allocations)} pods")
            task_status.started()
    finally:
        datapath.close()


def open_kube_client(cfg: Config) -> Any:
    """The Kubernetes client (``cloud.kube``); raises ConfigError when its credentials cannot
    be read (a missing kubeconfig, no service account)."""
    from cloud.kube.client import KubeClient, KubeSettings
    from cloud.kube.errors import KubeConfigError

    k = cfg.kubernetes
    settings = KubeSettings(
        kubeconfig=k.kubeconfig,
        service_account_dir=k.service_account_dir,
        request_timeout=k.request_timeout,
    )
    try:
        return KubeClient(settings)
    except KubeConfigError as e:
        setting = "kubernetes.kubeconfig" if k.kubeconfig else "kubernetes.service_account_dir"
        raise ConfigError(setting, e.reason) from None


async def _start_kube(
    cfg: Config,
    stack: AsyncExitStack,
    tg: anyio.abc.TaskGroup,
    health: Health,
    metrics: Metrics,
    events: EventBus,
    client: Any,
) -> Any:
    """The agent's watches of its cluster (agent/kube), running from now on."""
    from agent.kube.metrics import KubeCollector
    from agent.kube.service import KubeService
    from cloud.kube.client import ClusterCollections

    k = cfg.kubernetes
    await stack.enter_async_context(client)
    name = node_name(k)
    kube = KubeService(
        ClusterCollections(client),
        name,
        policies=sg_policies_wanted(cfg),
        session=k.watch_session,
        retry_base=k.retry_base,
        retry_cap=k.retry_cap,
        events=events,
    )
    metrics.registry.register(KubeCollector(kube))
    log.info("watching the cluster", extra={"server": client.server, "node": name})
    return await tg.start(health.run, "kubernetes", kube.run)


async def _start_sg_feeds(
    tg: anyio.abc.TaskGroup,
    health: Health,
    cni: CniService,
    kube: Any,
    client: Any,
    metrics: Metrics,
    events: EventBus,
) -> None:
    """Live changes of running pods' groups, from the cluster."""
    from agent.kube.feeds import start_live_groups

    sg = cast("SgService", cni.sg)
    live = await start_live_groups(
        tg,
        health,
        cni=cni,
        sg=sg,
        kube=kube,
        client=client,
        registry=metrics.registry,
        events=events,
    )
    kube.extra_status["groups"] = live.status
    if sg.settings.branches == "controller":  # EKS's resource controller makes the branches
        from agent.kube.cninode import CniNodeFeature

        feature = await tg.start(
            health.run, "cninode-feature", CniNodeFeature(client, kube.node_name).run
        )
        kube.extra_status["cninode"] = feature.status


def sg_policies_wanted(cfg: Config) -> bool:
    """Whether this node needs SecurityGroupPolicy objects (security groups for pods on)."""
    sg = getattr(cfg, "security_groups", None)
    return bool(getattr(sg, "enabled", False))


def ip_masq_facts_of(provider: Provider, cfg: Config) -> NodeFacts:
    """The provider's facts with ip-masq-agent's non-masquerade set as the VPC CIDRs."""
    policy = IpMasqPolicy(
        non_masquerade_cidrs=cfg.gce.nonMasqueradeCIDRs, masq_link_local=cfg.gce.masqLinkLocal
    )
    return ip_masq_facts(provider.facts(), policy)


def snat_off_reason(cfg: Config) -> str:
    """Why SNAT is not running, in words that say what to change."""
    if not cfg.snat.enabled:
        return "SNAT off: snat.enabled is false"
    return (
        "SNAT off: no VPC CIDRs known; give snat.vpc_cidrs (the destinations pods reach without"
        " NAT) to enable it"
    )


def _group_id(name: str) -> int | None:
    if not name:
        return None
    import grp

    return grp.getgrnam(name).gr_gid
