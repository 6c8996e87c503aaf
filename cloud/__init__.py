"""Providers of pod addresses: static CIDRs, AWS ENIs, and the emulator used by tests."""

from cloud.errors import CloudError

__all__ = ["CloudError"]
