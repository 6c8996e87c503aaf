"""The agent's Kubernetes client: lightkube's AsyncClient (asyncio), and the one place where its
errors and httpx's are turned into ``cloud.kube.errors``.

Why lightkube: it is asyncio-native on httpx, small (an import costs ~0.2 s, against ~0.7 s for
kubernetes_asyncio's generated client and its 48 MB of models), typed, and it does the parts
that are easy to get wrong: kubeconfig contexts, client certificates, exec credential plugins,
and in-cluster service-account tokens re-read when the kubelet rotates them. Its watch follows
the server's own ends of a watch with the last resourceVersion; what it does on 410 Gone
(resume without a resourceVersion, which loses every deletion in the gap) is not used: errors
are raised to ``cloud.kube.reflector``, which lists again instead.

Every object is handled as the API's JSON (lightkube's generic resources are dicts) and parsed
by ``cloud.kube.objects`` into the few fields the agent keeps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs
import httpx2
from lightkube import AsyncClient, ConfigError, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.core.resource import NamespacedResourceG
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.types import OnErrorAction, OnErrorResult, PatchType

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
from cloud.kube.objects import (
    NodeInfo,
    PodInfo,
    PolicyObject,
    ServiceAccountInfo,
    parse_node,
    parse_pod,
    parse_policy,
    parse_service_account,
    resource_version,
)
from cloud.kube.store import EventType, Object, WatchEvent

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# The resources the agent reads and writes (deploy/kubernetes/rbac.yaml grants exactly these).
PODS = create_namespaced_resource("", "v1", "Pod", "pods")
NODES = create_global_resource("", "v1", "Node", "nodes")
SERVICE_ACCOUNTS = create_namespaced_resource("", "v1", "ServiceAccount", "serviceaccounts")
EVENTS = create_namespaced_resource("", "v1", "Event", "events")
SECURITY_GROUP_POLICIES = create_namespaced_resource(
    "vpcresources.k8s.aws", "v1beta1", "SecurityGroupPolicy", "securitygrouppolicies"
)
CNI_NODES = create_global_resource("networking.k8s.aws", "v1alpha1", "CNINode", "cninodes")

# (API group, resource) -> the verbs the agent uses on it: deploy/kubernetes/rbac.yaml grants
# exactly these (tests/unit/test_deploy.py), and tests/k8s checks from the API server's audit log
# that the running agents use every one of them and are never denied.
ACCESS: Mapping[tuple[str, str], frozenset[str]] = {
    ("", "pods"): frozenset({"list", "watch"}),
    ("", "nodes"): frozenset({"list", "watch"}),
    ("", "serviceaccounts"): frozenset({"list", "watch"}),
    ("", "events"): frozenset({"create"}),
    ("vpcresources.k8s.aws", "securitygrouppolicies"): frozenset({"list", "watch"}),
    ("networking.k8s.aws", "cninodes"): frozenset({"get", "patch"}),
}

T = TypeVar("T", bound=Object)


@attrs.frozen(kw_only=True)
class KubeSettings:
    kubeconfig: str = ""  # "": in-cluster (the pod's service account)
    service_account_dir: str = SERVICE_ACCOUNT_DIR
    context: str = ""  # "": the kubeconfig's current context
    request_timeout: float = 10.0


def load_config(settings: KubeSettings, environ: Mapping[str, str] | None = None) -> KubeConfig:
    """The client configuration; raises KubeConfigError saying what is missing."""
    env = os.environ if environ is None else environ
    try:
        if settings.kubeconfig:
            if not Path(settings.kubeconfig).is_file():
                raise KubeConfigError("kubeconfig", f"{settings.kubeconfig} does not exist")
            config = KubeConfig.from_file(settings.kubeconfig)
            if settings.context and config.get(settings.context) is None:
                raise KubeConfigError("kubeconfig", f"no context {settings.context!r}")
            return config
        missing = [
            v for v in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT") if not env.get(v)
        ]
        if missing:
            raise KubeConfigError(
                "in-cluster config", f"{' and '.join(missing)} not set (not running in a pod?)"
            )
        return KubeConfig.from_service_account(settings.service_account_dir)
    except ConfigError as e:
        raise KubeConfigError("kubeconfig", str(e)) from None
    except (OSError, ValueError) as e:
        raise KubeConfigError("kubeconfig", f"{type(e).__name__}: {e}") from None


def map_error(e: Exception, what: str) -> KubeError:
    """One table from lightkube's and httpx's exceptions to ours."""
    if isinstance(e, KubeError):
        return e
    if isinstance(e, ApiError):
        code, message = e.status.code or 0, e.status.message or str(e)
        if code == 410:
            return Expired(what, message)
        if code in (401, 403):
            return Forbidden(what, f"{code} {message}")
        if code == 404:
            return KubeNotFound(what, message)
        if code == 409:
            return Conflict(what, message)
        if code == 429 or code >= 500:
            return KubeUnavailable(what, f"{code} {message}")
        return KubeRequestFailed(what, message, code)
    if isinstance(e, httpx2.HTTPStatusError):
        code = e.response.status_code
        if code in (401, 403):
            return Forbidden(what, str(code))
        if code == 429 or code >= 500:
            return KubeUnavailable(what, str(code))
        return KubeRequestFailed(what, str(e), code)
    if isinstance(e, httpx2.TransportError | OSError | TimeoutError):
        return KubeUnavailable(what, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    return KubeRequestFailed(what, f"{type(e).__name__}: {e}", 0)


_MAPPED = (httpx2.HTTPError, OSError, TimeoutError, ValueError, ConfigError)


@contextlib.contextmanager
def _mapped(what: str) -> Any:
    try:
        yield
    except _MAPPED as e:
        raise map_error(e, what) from None


def _raise(e: Exception, count: int) -> OnErrorResult:
    return OnErrorResult(OnErrorAction.RAISE)


class KubeClient:
    """The API server, for the agent (asyncio only). Use as an async context manager."""

    def __init__(self, settings: KubeSettings, *, config: KubeConfig | None = None) -> None:
        self.settings = settings
        self.config = config if config is not None else load_config(settings)
        single = self.config.get(settings.context or None)
        if single is None:
            raise KubeConfigError("kubeconfig", "no usable context")
        self.server = single.cluster.server
        self._client = AsyncClient(
            single, timeout=httpx2.Timeout(settings.request_timeout), field_manager="podwire"
        )

    def __repr__(self) -> str:
        return f"<KubeClient {self.server}>"

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    # -- reads ----------------------------------------------------------------------------------

    def collection(
        self,
        resource: Any,
        parse: Callable[[Mapping[str, Any]], T],
        *,
        namespace: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> Collection[T]:
        """A ``ListWatch`` of ``resource`` (in ``namespace``; None: all), with a field
        selector."""
        return Collection(self, resource, parse, namespace=namespace, fields=fields)

    async def get(self, resource: Any, name: str, *, namespace: str | None = None) -> Any:
        what = f"get {_plural(resource)} {name}"
        with _mapped(what):
            return await self._client.get(resource, name, namespace=namespace)

    # -- writes ---------------------------------------------------------------------------------

    async def merge_patch(
        self, resource: Any, name: str, patch: Mapping[str, Any], *, namespace: str | None = None
    ) -> Any:
        """A JSON merge patch; with ``metadata.resourceVersion`` in it the server refuses it
        (Conflict) if the object changed meanwhile."""
        what = f"patch {_plural(resource)} {name}"
        with _mapped(what):
            return await self._client.patch(
                resource, name, dict(patch), namespace=namespace, patch_type=PatchType.MERGE
            )

    async def create(self, resource: Any, obj: Mapping[str, Any], *, namespace: str) -> Any:
        what = f"create {_plural(resource)} in {namespace}"
        body = {**obj, "metadata": {**obj.get("metadata", {}), "namespace": namespace}}
        with _mapped(what):
            return await self._client.create(resource(body))

    # -- the lightkube calls a Collection makes ---------------------------------------------------

    async def _list(
        self, resource: Any, namespace: str | None, fields: Mapping[str, str] | None
    ) -> tuple[list[Mapping[str, Any]], str]:
        it = self._client.list(
            resource, namespace=_where(resource, namespace), fields=dict(fields or {})
        )
        items: list[Mapping[str, Any]] = [dict(x) async for x in it]  # no chunk_size: one page
        return items, it.resourceVersion

    def _watch(
        self,
        resource: Any,
        namespace: str | None,
        fields: Mapping[str, str] | None,
        resource_version: str,
        timeout: int,
    ) -> AsyncIterator[tuple[str, Any]]:
        # lightkube makes the next request itself (from the last resourceVersion) each time the
        # server ends one after ``timeout``; every error is raised to the reflector
        return aiter(
            self._client.watch(
                resource,
                namespace=_where(resource, namespace),
                fields=dict(fields or {}),
                resource_version=resource_version,
                server_timeout=timeout,
                on_error=_raise,
            )
        )


def _where(resource: Any, namespace: str | None) -> str | None:
    """lightkube's namespace argument: ``*`` lists a namespaced resource in all namespaces; a
    cluster-scoped one takes none."""
    if namespace:
        return namespace
    return "*" if issubclass(resource, NamespacedResourceG) else None


def _plural(resource: Any) -> str:
    return str(resource._api_info.plural)


class Collection(Generic[T]):
    """One list+watch of the API, parsed (``cloud.kube.reflector.ListWatch``)."""

    def __init__(
        self,
        client: KubeClient,
        resource: Any,
        parse: Callable[[Mapping[str, Any]], T],
        *,
        namespace: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.parse = parse
        self.namespace = namespace
        self.fields = dict(fields or {})
        where = f" in {namespace}" if namespace else ""
        select = ",".join(f"{k}={v}" for k, v in self.fields.items())
        self.name = f"{_plural(resource)}{where}" + (f" ({select})" if select else "")

    def __repr__(self) -> str:
        return f"<Collection {self.name}>"

    async def list(self) -> tuple[Sequence[T], str]:
        with _mapped(f"list {self.name}"):
            items, rv = await self.client._list(self.resource, self.namespace, self.fields)
        return [self.parse(i) for i in items], rv

    async def watch(
        self, resource_version: str, timeout: int
    ) -> AsyncGenerator[WatchEvent[T], None]:
        events = self.client._watch(
            self.resource, self.namespace, self.fields, resource_version, timeout
        )
        try:
            while True:
                with _mapped(f"watch {self.name}"):
                    try:
                        kind, obj = await events.__anext__()
                    except StopAsyncIteration:
                        return
                raw = dict(obj)
                etype = EventType(kind)
                parsed = None if etype is EventType.BOOKMARK else self.parse(raw)
                yield WatchEvent(type=etype, obj=parsed, resource_version=resource_version_of(raw))
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


def resource_version_of(raw: Mapping[str, Any]) -> str:
    return resource_version(raw)


class ClusterCollections:
    """What one node's agent watches (``agent.kube.service.Collections``)."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    def pods(self, node: str) -> Collection[PodInfo]:
        return self.client.collection(PODS, parse_pod, fields={"spec.nodeName": node})

    def node(self, node: str) -> Collection[NodeInfo]:
        return self.client.collection(NODES, parse_node, fields={"metadata.name": node})

    def policies(self) -> Collection[PolicyObject]:
        return self.client.collection(SECURITY_GROUP_POLICIES, parse_policy)

    def service_accounts(self, namespace: str) -> Collection[ServiceAccountInfo]:
        return self.client.collection(SERVICE_ACCOUNTS, parse_service_account, namespace=namespace)
