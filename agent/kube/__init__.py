"""The agent's own view of its cluster (``cloud.kube`` underneath): its node's pods, its Node's
pod CIDRs, SecurityGroupPolicy objects and the ServiceAccounts their selectors need."""

from agent.kube.service import KubeService

__all__ = ["KubeService"]
