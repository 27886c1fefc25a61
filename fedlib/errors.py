"""Errors that cross module boundaries, each carrying a machine-readable reason code.

A reason code is what the ledger records when an update is quarantined, so every
refusal on a trust boundary raises :class:`RejectedUpdate` (or a subclass) with one
of :data:`REASONS`.
"""

from __future__ import annotations

from typing import Final

REASONS: Final[frozenset[str]] = frozenset(
    {
        "bad_signature",
        "unknown_client",
        "revoked_client",
        "unknown_server_key",
        "suite_not_accepted",
        "decrypt_failed",
        "malformed",
        #: An inbox object whose name is not ``updates/<client id>/<canonical UUIDv7>``.
        "malformed_name",
        "unsupported_version",
        "unknown_base_version",
        "too_stale",
        #: Trained on a version whose features (template vocabulary, standardization)
        #: are not the base's: its delta would move other columns' parameters.
        "feature_mismatch",
        "duplicate_update_id",
        "replay",
        "non_finite",
        "shape_mismatch",
        "norm_exceeded",
        "oversized",
        "distrusted",
        #: The verdict of an object could not be written after the configured attempts.
        "unrecordable",
    }
)


class FedError(Exception):
    """Base class of every error fedlib raises on purpose."""


class RejectedUpdate(FedError):
    """An update (or part of one) was refused; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class VerificationError(FedError):
    """A signed artefact (model package, bundle, config) failed verification."""


class StoreError(FedError):
    """The object store could not be reached or refused an operation."""


class ObjectExists(StoreError):
    """A write-once object already exists under that key."""
