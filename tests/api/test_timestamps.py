"""api.timestamps: the one format and parse of the RFC 3339 times in status, Jobs, Leases and stage records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from rlhf_api.timestamps import format_micro_timestamp, format_timestamp, parse_timestamp


def test_formats_in_utc_whatever_the_zone_of_the_clock() -> None:
    at = datetime(2026, 1, 1, 13, 30, 5, 123456, tzinfo=timezone(timedelta(hours=1, minutes=30)))
    assert format_timestamp(at) == "2026-01-01T12:00:05Z"
    assert format_micro_timestamp(at) == "2026-01-01T12:00:05.123456Z"


def test_parses_both_formats_to_aware_utc_and_refuses_anything_else() -> None:
    assert parse_timestamp("2026-01-01T12:00:05Z") == datetime(2026, 1, 1, 12, 0, 5, tzinfo=UTC)
    assert parse_timestamp("2026-01-01T12:00:05.000250Z") == datetime(2026, 1, 1, 12, 0, 5, 250, tzinfo=UTC)
    for bad in (None, "", "2026-01-01 12:00:05", "2026-01-01T12:00:05+01:00", "yesterday"):
        assert parse_timestamp(bad) is None, bad


def test_now_round_trips_to_the_second() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    parsed = parse_timestamp(format_timestamp())
    assert parsed is not None and before <= parsed <= datetime.now(UTC)
