"""Timestamps as Kubernetes writes them: RFC 3339 in UTC, ``2024-05-01T12:00:00Z``.

The one place that formats and parses them, for the run's status, Job and Pod times, the stages'
manifests and records, and the leader Lease (whose MicroTime adds microseconds). In the API package
because the stages write these timestamps too and may import only the API.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
"""metav1.Time: whole seconds (status times, Job and Pod times)."""
MICRO_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"
"""metav1.MicroTime: microseconds (a Lease's acquireTime and renewTime)."""


def _utc(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(UTC)
    # A naive datetime is taken as UTC already (the clock the operator passes around is UTC).
    return at if at.tzinfo is None else at.astimezone(UTC)


def format_timestamp(at: datetime | None = None) -> str:
    """``at`` (now when None) to the second."""
    return _utc(at).strftime(FORMAT)


def format_micro_timestamp(at: datetime | None = None) -> str:
    """``at`` (now when None) to the microsecond, as a MicroTime."""
    return _utc(at).strftime(MICRO_FORMAT)


def parse_timestamp(ts: str | None) -> datetime | None:
    """A timestamp in either format as an aware UTC datetime; None when missing or not one of them."""
    if not ts:
        return None
    for fmt in (FORMAT, MICRO_FORMAT):
        try:
            return datetime.strptime(ts, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None
