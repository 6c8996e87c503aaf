"""Errors of the cloud package: one base, subclasses named by cause, carrying fields.

Provider shells map their dependency's errors (botocore ``ClientError`` codes, HTTP statuses,
connection failures) into these once, at the edge; callers never see a botocore type.
"""

from __future__ import annotations


class CloudError(Exception):
    """Base of everything a provider raises."""


class Throttled(CloudError):
    """The cloud API kept refusing ``action`` for rate reasons after every retry we allow."""

    def __init__(self, action: str, attempts: int) -> None:
        super().__init__(f"{action}: throttled ({attempts} attempts)")
        self.action = action
        self.attempts = attempts


class CloudUnavailable(CloudError):
    """The cloud API could not be reached or kept failing on its side (5xx, connection, time)."""

    def __init__(self, action: str, reason: str) -> None:
        super().__init__(f"{action}: unavailable: {reason}")
        self.action = action
        self.reason = reason


class NotFound(CloudError):
    """The object the request names does not exist (``code`` is the API's, e.g.
    ``InvalidNetworkInterfaceID.NotFound``)."""

    def __init__(self, action: str, code: str, message: str = "") -> None:
        super().__init__(f"{action}: {code}: {message}" if message else f"{action}: {code}")
        self.action = action
        self.code = code
        self.message = message


class LimitExceeded(CloudError):
    """An instance or ENI limit was hit; ``what`` is the API's code (e.g.
    ``PrivateIpAddressLimitExceeded``, ``AttachmentLimitExceeded``)."""

    def __init__(self, what: str, action: str = "", message: str = "") -> None:
        super().__init__(f"{action}: {what}" if action else what)
        self.what = what
        self.action = action
        self.message = message


class SubnetExhausted(CloudError):
    """The subnet has no free addresses (``InsufficientFreeAddressesInSubnet``) or no free
    aligned /28 (``InsufficientCidrBlocks``): ``code`` says which."""

    def __init__(self, code: str, action: str = "") -> None:
        super().__init__(f"{action}: {code}" if action else code)
        self.code = code
        self.action = action

    @property
    def prefixes_only(self) -> bool:
        """Whether only /28 prefixes are short (single addresses may still be free)."""
        return self.code == "InsufficientCidrBlocks"


class CloudRequestFailed(CloudError):
    """The cloud refused the request for a reason no other class names (``code``, ``message``
    as the API gave them)."""

    def __init__(self, action: str, code: str, message: str = "") -> None:
        super().__init__(f"{action}: {code}: {message}" if message else f"{action}: {code}")
        self.action = action
        self.code = code
        self.message = message


class EniSetupFailed(CloudError):
    """Creating, attaching or configuring an ENI failed at ``step``; what had been done was
    undone (``cause`` is the original error)."""

    def __init__(self, step: str, eni_id: str | None, cause: BaseException) -> None:
        super().__init__(f"ENI setup failed at {step} ({eni_id or 'no ENI yet'}): {cause}")
        self.step = step
        self.eni_id = eni_id
        self.cause = cause


class MetadataError(CloudError):
    """The instance metadata service (``service``: IMDS, GCE) answered ``status`` for ``path``."""

    def __init__(self, path: str, status: int, service: str = "IMDS") -> None:
        super().__init__(f"{service} {path}: HTTP {status}")
        self.path = path
        self.status = status
        self.service = service


class NotGceMetadata(CloudError):
    """What answered at ``url`` is not a GCE metadata server: its reply lacks the
    ``Metadata-Flavor: Google`` header (a proxy, or the wrong address)."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"{url}: HTTP {status} without Metadata-Flavor: Google (not GCE metadata)")
        self.url = url
        self.status = status


class BadMetadata(CloudError):
    """A metadata value at ``path`` cannot be used (``value`` as given, ``reason`` why)."""

    def __init__(self, path: str, value: str, reason: str) -> None:
        super().__init__(f"metadata {path}: {value!r}: {reason}")
        self.path = path
        self.value = value
        self.reason = reason
