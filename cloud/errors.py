"""Errors of the cloud package: one base, subclasses named by cause, carrying fields."""

from __future__ import annotations


class CloudError(Exception):
    """Base of everything a provider raises."""
