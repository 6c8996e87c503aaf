"""The gce provider: the node's alias IP ranges from the GCE metadata server (asyncio only)."""

from cloud.gce.metadata import DEFAULT_BASE_URL, GceMetadata, InstanceFacts, InterfaceFacts
from cloud.gce.provider import GceProvider, GceSettings

__all__ = [
    "DEFAULT_BASE_URL",
    "GceMetadata",
    "GceProvider",
    "GceSettings",
    "InstanceFacts",
    "InterfaceFacts",
]
