"""Prometheus metrics: runs by phase, stage durations, reconcile counts, errors and latency.

A registry of our own (not the process-global default) so tests can read exact values and the
exposition holds only what the operator means to publish.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rlhf_api.run import StageStatus
from rlhf_api.timestamps import parse_timestamp

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")


def _seconds(start: str | None, end: str | None) -> float | None:
    begin, finish = parse_timestamp(start), parse_timestamp(end)
    if begin is None or finish is None:
        return None
    return max(0.0, (finish - begin).total_seconds())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.runs = Gauge("rlhf_runs", "RLHFRuns known to this operator, by phase", ["phase"], registry=self.registry)
        self.stage_duration = Histogram(
            "rlhf_stage_duration_seconds",
            "Wall time of finished stages, from Job start to completion",
            ["stage", "result"],
            buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, float("inf")),
            registry=self.registry,
        )
        self.reconciles = Counter("rlhf_reconcile_total", "Reconcile passes", registry=self.registry)
        self.reconcile_errors = Counter(
            "rlhf_reconcile_errors_total", "Reconcile passes that raised", ["error"], registry=self.registry
        )
        self.reconcile_seconds = Histogram(
            "rlhf_reconcile_duration_seconds",
            "Duration of one reconcile pass, by whether it wrote anything (an action, the status, an event)",
            ["wrote"],
            registry=self.registry,
        )
        # Issue 14's goal is at most 3 writes per stage transition: each writing pass counts its own,
        # by what it created (start: the run's volume claim, its first pass; job: a stage's Job, a
        # transition; none: a status or an event only, such as a Pod seen Running). Events count when
        # queued: a full queue may drop one later (rlhf_events_dropped_total), so this is an upper bound.
        self.pass_writes = Histogram(
            "rlhf_reconcile_writes",
            "API writes one reconcile pass made (creates, patches, deletes, its status write, the events it"
            " queued), for passes that wrote, by what it created: start (the volume claim), job, none",
            ["created"],
            buckets=(1, 2, 3, 4, 5, 6, 8, float("inf")),
            registry=self.registry,
        )
        # Under load most watch events change nothing a pass reads (issue 14): not passed on, by cause.
        self.watch_events_ignored = Counter(
            "rlhf_watch_events_ignored_total",
            "Watch events that caused no pass: own-write (our own write coming back), unchanged (nothing"
            " a pass reads changed), not-a-child (no run's label), by resource",
            ["resource", "cause"],
            registry=self.registry,
        )
        self.polls_cancelled = Counter(
            "rlhf_workqueue_delayed_passes_cancelled_total",
            "Delayed passes (a progress poll, a retry) dropped because a later pass found none due",
            registry=self.registry,
        )
        self.api_requests = Counter(
            "rlhf_api_requests_total",
            "The operator's own API requests (not kopf's watches, not the Lease), by method and resource",
            ["request"],
            registry=self.registry,
        )
        # Where a transition's time goes under load (issue 14): waiting for a worker, then for the
        # client-side rate limit. Buckets from 1 ms (an idle operator) to a minute (a backlog).
        wait_buckets = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf"))
        self.queue_wait = Histogram(
            "rlhf_workqueue_wait_seconds",
            "A run's key in the work queue: added -> a worker starts its pass, by lane (urgent: a transition)",
            ["lane"],
            buckets=wait_buckets,
            registry=self.registry,
        )
        self.rate_limit_wait = Histogram(
            "rlhf_api_rate_limit_wait_seconds",
            "An API request held by the client-side rate limit before it was sent, by priority"
            " (normal: writes and reads a pass needs; spare: events, progress log reads)",
            ["priority"],
            buckets=wait_buckets,
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "rlhf_event_loop_lag_seconds",
            "How late the operator's event loop woke a sleeping task (sampled every 0.25 s)",
            buckets=wait_buckets,
            registry=self.registry,
        )
        self.events_dropped = Counter(
            "rlhf_events_dropped_total",
            "Events not posted: the queue of events waiting for spare request capacity was full",
            registry=self.registry,
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            self.runs.labels(phase).set(0)

    def run_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a run's phase (None: the run is gone) and refresh the per-phase gauge."""
        with self._lock:
            if self._phases.get((namespace, name)) == phase:
                return  # unchanged: the resync reports every finished run each round
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase
            counts = dict.fromkeys(PHASES, 0)
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
            for key, count in counts.items():
                self.runs.labels(key).set(count)

    def stage_finished(self, stage: StageStatus) -> None:
        seconds = _seconds(stage.start_time, stage.completion_time)
        if seconds is not None:
            self.stage_duration.labels(stage.name, stage.phase).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
