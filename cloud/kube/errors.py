"""Errors of the Kubernetes source: one base, subclasses named by cause, carrying fields.

The client shell (``cloud.kube.client``) maps lightkube's and httpx's exceptions into these once,
at the edge; nothing above it sees a dependency's type.
"""

from __future__ import annotations

from cloud.errors import CloudError


class KubeError(CloudError):
    """Base of everything the Kubernetes source raises; ``what`` names the request."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


class KubeConfigError(KubeError):
    """The kubeconfig or the in-cluster service account cannot be used."""


class KubeUnavailable(KubeError):
    """The API server could not be reached, timed out, or failed on its side (5xx, 429)."""


class Expired(KubeError):
    """410 Gone: the resourceVersion a watch resumes from is older than the server keeps; the
    only way on is a fresh list."""


class Forbidden(KubeError):
    """401/403: the agent's identity may not do this (its RBAC lacks a rule, or its token is
    not accepted)."""


class KubeNotFound(KubeError):
    """404: the object (or the resource type: a CRD not installed) does not exist."""


class Conflict(KubeError):
    """409: the object changed since it was read (optimistic concurrency), or exists."""


class KubeRequestFailed(KubeError):
    """Any other refusal (4xx): ``status`` is the HTTP status."""

    def __init__(self, what: str, reason: str, status: int) -> None:
        super().__init__(what, reason)
        self.status = status
