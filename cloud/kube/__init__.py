"""The agent's view of the Kubernetes API: a pure store of watched objects, the reflector that
keeps it current across disconnects and 410 Gone, and the lightkube shell (asyncio only)."""

from cloud.kube.errors import (
    Conflict,
    Expired,
    Forbidden,
    KubeConfigError,
    KubeError,
    KubeNotFound,
    KubeRequestFailed,
    KubeUnavailable,
)
from cloud.kube.objects import NodeInfo, PodInfo, PolicyObject, ServiceAccountInfo
from cloud.kube.reflector import ListWatch, Reflector, WatchStatus
from cloud.kube.store import Change, ChangeKind, EventType, Store, WatchEvent

__all__ = [
    "Change",
    "ChangeKind",
    "Conflict",
    "EventType",
    "Expired",
    "Forbidden",
    "KubeConfigError",
    "KubeError",
    "KubeNotFound",
    "KubeRequestFailed",
    "KubeUnavailable",
    "ListWatch",
    "NodeInfo",
    "PodInfo",
    "PolicyObject",
    "Reflector",
    "ServiceAccountInfo",
    "Store",
    "WatchEvent",
    "WatchStatus",
]
