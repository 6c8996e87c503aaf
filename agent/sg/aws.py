"""Security groups for pods on the aws provider: the SgService built from the agent's config,
the provider (trunk, EC2 client) and the kernel side."""

from __future__ import annotations

from typing import Any

from agent.config import Config
from agent.events import EventBus
from agent.pool.ipam import IpPool
from agent.sg.metrics import SgMetrics
from agent.sg.service import NodeRules, SgService, TrunkInfo
from cloud.trunk import BranchCloud


def sg_service(
    cfg: Config,
    provider: Any,
    *,
    watcher: Any,
    rules: NodeRules,
    events: EventBus,
    metrics: SgMetrics,
    kube: Any = None,
    pool: IpPool | None = None,
) -> SgService:
    """The node's SgService (state "disabled" unless ``[security_groups] enabled``); with the
    agent's Kubernetes watch (``kube``), SecurityGroupPolicy objects select pods too. In eni
    mode the sets of groups live in ``pool`` (the CNI service's)."""
    from cloud.aws.branches import AwsBranches
    from cloud.aws.trunking import branch_limit

    async def branch_cloud(trunk: TrunkInfo) -> BranchCloud:
        subnet = await provider.subnet(trunk.subnet_id)
        return AwsBranches(
            provider.ec2,
            instance_id=provider.instance.instance_id,
            trunk_id=trunk.eni_id,
            subnet_id=trunk.subnet_id,
            subnet_cidr=subnet.cidr,
            cluster_name=cfg.aws.cluster_name or None,
        )

    groups = None
    if kube is not None and cfg.security_groups.enabled:
        from agent.sg.kube import KubeGroups

        groups = KubeGroups(
            kube,
            pod_wait=cfg.kubernetes.pod_wait,
            eks=cfg.security_groups.branches == "controller",
        )
    sg = SgService(
        cfg.security_groups,
        policies=groups,
        identities=groups,
        provider=provider,
        link_waiter=watcher,
        rules=rules,
        branch_cloud=branch_cloud,
        branch_limit=branch_limit,
        events=events,
        metrics=metrics,
        link_timeout=cfg.aws.link_timeout,
        leak_grace=cfg.aws.leak_grace,
        leak_interval=cfg.aws.leak_interval,
        trunk_retry=cfg.security_groups.trunk_retry,
        pool=pool,
    )
    sg.enis = provider.enis
    return sg
