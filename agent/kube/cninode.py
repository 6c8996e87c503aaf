"""Asking EKS's resource controller for branch ENIs, as aws-node does: the feature
``SecurityGroupsForPods`` on the node's CNINode (``networking.k8s.aws/v1alpha1``). The controller
creates the CNINode of every node; until it has, the request is retried. The controller then
attaches the trunk ENI, advertises ``vpc.amazonaws.com/pod-eni`` on the Node, and annotates each
pod that asks for one with its branch."""

from __future__ import annotations

import logging
import random
from typing import Any

import anyio
import anyio.abc

from cloud.kube.errors import Conflict, KubeError, KubeNotFound

log = logging.getLogger("podwire.kube")

FEATURE = "SecurityGroupsForPods"


def with_feature(cninode: Any, feature: str = FEATURE) -> list[dict[str, Any]] | None:
    """The CNINode's ``spec.features`` with ``feature`` added, or None when it has it already
    (other features, CustomNetworking among them, are kept as they are)."""
    spec = cninode.get("spec") or {}
    features = [dict(f) for f in (spec.get("features") or []) if isinstance(f, dict)]
    if any(f.get("name") == feature for f in features):
        return None
    return [*features, {"name": feature}]


class CniNodeFeature:
    """Adds the feature to the node's CNINode, retrying until it holds, and puts it back if
    someone removes it."""

    def __init__(
        self, client: Any, node_name: str, *, retry: float = 5.0, recheck: float = 300.0
    ) -> None:
        self.client = client
        self.node_name = node_name
        self.retry = retry
        self.recheck = recheck
        self.state = "starting"

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[CniNodeFeature] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        from cloud.kube.client import CNI_NODES

        task_status.started(self)
        said = ""
        while True:
            try:
                node = await self.client.get(CNI_NODES, self.node_name)
                features = with_feature(node)
                if features is None:
                    if not self.state.endswith("requested"):
                        log.info("CNINode %s has %s", self.node_name, FEATURE)
                    self.state = f"{FEATURE} requested"
                    said = ""
                    # never exits (a finished service reads as dead); looks again now and then
                    await anyio.sleep(self.recheck * random.uniform(0.8, 1.2))
                    continue
                # the resourceVersion makes the server refuse it if the CNINode changed meanwhile
                await self.client.merge_patch(
                    CNI_NODES,
                    self.node_name,
                    {
                        "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
                        "spec": {"features": features},
                    },
                )
                continue  # read it back
            except Conflict:
                continue
            except KubeNotFound:
                why = f"no CNINode {self.node_name} yet (EKS's resource controller makes it)"
            except KubeError as e:
                why = str(e)
            self.state = f"waiting: {why}"
            if why != said:
                log.warning("cannot request branch ENIs on the CNINode yet: %s", why)
                said = why
            await anyio.sleep(self.retry * random.uniform(0.8, 1.2))

    def status(self) -> dict[str, Any]:
        return {"name": self.node_name, "state": self.state}
