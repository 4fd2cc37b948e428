"""Lifecycle states and the validator of single transition requests."""

from __future__ import annotations

from ._generated.lifecycle_tables import CONTEXT_FIELDS, ExtendedLifecycle, Reason

__all__ = ["CONTEXT_FIELDS", "ExtendedLifecycle", "Reason"]
