"""One reconcile pass for one run: read, plan, act, write status (once, only if changed), post events.

Reads come from the watch caches (:mod:`.cache`), never from the API server: a pass's only
requests are its writes (and a running stage's log tail, when due).

Live progress: the pass also reads the tail of each running stage container's log (at most once
per pod per progress interval, :class:`~.progress.LogReads`) and hands the newest progress line to
the observation; it returns when to pass again so that progress moves without a watch event.

Synchronous (the Kubernetes client blocks); the handlers run it in a worker thread. Ordering
matters for crash safety: actions first (all idempotent), then the status, then events, so a crash
at any point leaves nothing a later pass cannot redo.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from rlhf_api.run import RLHFRunSpec, RLHFRunStatus
from rlhf_api.timestamps import format_timestamp

from . import conditions as cond
from .actions import Action, CreateJob, EnsurePVC, PostEvent
from .defaults import OperatorDefaults
from .kube import Cluster
from .metrics import Metrics
from .observe import Progress, log_readable, observe, parse_progress_log
from .planner import RunView, keep_started_pipeline, plan
from .progress import DEFAULT_PROGRESS_INTERVAL, LogReads, poll_after

log = logging.getLogger(__name__)


class Reads(Protocol):
    """What a pass reads, and tells about its own writes: :class:`.cache.WatchCache`."""

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def children(self, namespace: str, run: str, want_pvc: bool) -> tuple[list[dict], list[dict], bool]: ...
    def writing_status(self, before: dict[str, Any], status: dict[str, Any]) -> None: ...
    def wrote_run(self, before: dict[str, Any], after: dict[str, Any]) -> None: ...
    def creating(self, plural: str, body: dict[str, Any], sent: bool) -> None: ...
    def created(self, plural: str, body: dict[str, Any]) -> None: ...


def _created(actions: list[Action]) -> str:
    """What a pass created, for rlhf_reconcile_writes: its writes are the run's start (the volume
    claim, with the first stage's Job), a stage transition (a Job) or neither."""
    if any(isinstance(a, EnsurePVC) for a in actions):
        return "start"
    return "job" if any(isinstance(a, CreateJob) for a in actions) else "none"


class InvalidSpec(ValueError):
    """A stored spec that fails validation: permanent until the spec is edited (a new generation)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def invalid_spec(error: ValidationError) -> InvalidSpec:
    first = error.errors()[0]
    field = ".".join(["spec", *(str(part) for part in first.get("loc") or ())])
    return InvalidSpec(field, str(first.get("msg") or error))


def refused_status(body: dict[str, Any], error: InvalidSpec, now: str) -> dict[str, Any]:
    """The run's status saying once, for this generation, which field is wrong and how to fix it.

    Why not retry: nothing the operator does can make a stored spec valid, so a retry loop would
    only cost requests and log lines. Only an edit can, and an edit is a new generation, whose
    watch event brings the run back; the planner then rebuilds phase and conditions from its stages.
    """
    meta = body["metadata"]
    generation = int(meta.get("generation") or 1)
    old = body.get("status") or {}
    status = RLHFRunStatus.model_validate(old, strict=False) if old else RLHFRunStatus()
    message = (
        f"{error.field}: {error.problem}. Fix: correct {error.field} in the run's spec "
        f"(kubectl edit rlhfrun {meta['name']} -n {meta['namespace']}); the edit is tried again."
    )
    status.phase = "Failed"
    status.observed_generation = generation
    c = cond.set_condition(status.conditions, cond.FAILED, "True", cond.INVALID_SPEC, message, generation, now)
    status.conditions = cond.set_condition(c, cond.RUNNING, "False", cond.INVALID_SPEC, message, generation, now)
    return status.to_wire()


class Reconciler:
    def __init__(
        self,
        cluster: Cluster,
        reads: Reads,
        metrics: Metrics,
        clock: Callable[[], datetime] | None = None,
        defaults: OperatorDefaults | None = None,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
    ) -> None:
        self.cluster = cluster
        self.reads = reads
        self.metrics = metrics
        self.defaults = defaults or OperatorDefaults()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.log_reads = LogReads(progress_interval)

    def reconcile(self, namespace: str, name: str) -> float | None:
        """Returns in how many seconds to reconcile the run again without an event (None: only on
        events and resyncs; always so for a run that is gone, finished, suspended or pending)."""
        started = time.monotonic()
        self.metrics.reconciles.inc()
        wrote = "failed"
        try:
            again, did_write = self._reconcile(namespace, name)
            wrote = "yes" if did_write else "no"
            return again
        except ApiException as exc:
            if exc.status == 409:
                # Conflict: the cache held an older version of the run than the API server. No retry
                # with backoff: the newer version's watch event enqueues the run (again, if it came
                # during this pass), and that pass plans from the newer version.
                self.metrics.reconcile_errors.labels("Conflict").inc()
                log.info("%s/%s: the run changed during the pass; waiting for its watch event", namespace, name)
                return None
            self.metrics.reconcile_errors.labels("ApiError").inc()
            raise
        except Exception as exc:
            self.metrics.reconcile_errors.labels(type(exc).__name__).inc()
            raise
        finally:
            self.metrics.reconcile_seconds.labels(wrote).observe(time.monotonic() - started)

    def _reconcile(self, namespace: str, name: str) -> tuple[float | None, bool]:
        """(when to pass again, whether the pass wrote anything: an action, the status or an event)."""
        body = self.reads.get_run(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            # Deleted: the garbage collector removes the children through their owner references.
            self.metrics.run_phase(namespace, name, None)
            self.log_reads.forget((namespace, name))
            return None, False
        try:
            view = self._view(body)
        except InvalidSpec as exc:
            return None, self._refuse(body, exc)
        jobs, pods, pvc = self.reads.children(namespace, name, want_pvc=view.spec.storage.existing_claim is None)
        logged = self._read_progress(namespace, name, pods)
        result = plan(view, observe(view.uid, jobs, pods, pvc, logged), self.clock())
        events: list[PostEvent] = []
        writes = 0
        for action in result.actions:
            if isinstance(action, PostEvent):
                events.append(action)
                continue
            # The Job's name: the load benchmark times each transition's pass from this line.
            what = f" {action.job['metadata']['name']}" if isinstance(action, CreateJob) else ""
            log.info("%s/%s: %s%s", namespace, name, type(action).__name__, what)
            # What we make, known to the cache as ours before its watch event (which may arrive before
            # the answer), then in the cache with the answer: that event is then known as our own.
            if isinstance(action, CreateJob):
                self.reads.creating("jobs", action.job, sent=False)
            try:
                created = self.cluster.perform(body, action)
                if created is not None and isinstance(action, CreateJob):
                    self.reads.created("jobs", created)
                elif isinstance(action, EnsurePVC):
                    self.reads.created("persistentvolumeclaims", action.manifest)
            finally:
                if isinstance(action, CreateJob):
                    self.reads.creating("jobs", action.job, sent=True)
            writes += 2 if isinstance(action, CreateJob) and action.service is not None else 1
        new_status = result.status.to_wire()
        if new_status != (body.get("status") or {}):
            self.reads.writing_status(body, new_status)
            self.reads.wrote_run(body, self.cluster.write_status(body, new_status))
            writes += 1
        for event in events:
            self.cluster.perform(body, event)
        writes += len(events)
        if writes:
            self.metrics.pass_writes.labels(_created(result.actions)).observe(writes)
        for stage in result.finished:
            self.metrics.stage_finished(stage)
        self.metrics.run_phase(namespace, name, result.status.phase)
        return poll_after(result.status, self.log_reads.next_read_in((namespace, name))), writes > 0

    def _refuse(self, body: dict[str, Any], error: InvalidSpec) -> bool:
        """Status and a Warning event, once per generation: a pass over the same spec writes nothing.
        Returns whether it wrote."""
        meta = body["metadata"]
        self.metrics.reconcile_errors.labels("InvalidSpec").inc()
        status = refused_status(body, error, format_timestamp(self.clock()))
        if status == (body.get("status") or {}):
            return False
        log.warning("%s/%s: the stored spec is invalid: %s", meta["namespace"], meta["name"], error)
        self.reads.writing_status(body, status)
        self.reads.wrote_run(body, self.cluster.write_status(body, status))
        message = next(c["message"] for c in status["conditions"] if c["type"] == cond.FAILED)
        self.cluster.perform(body, PostEvent("Warning", cond.INVALID_SPEC, message))
        self.metrics.pass_writes.labels("none").observe(2)
        self.metrics.run_phase(meta["namespace"], meta["name"], "Failed")
        return True

    def _read_progress(self, namespace: str, name: str, pods: list[dict[str, Any]]) -> dict[str, Progress]:
        """Live progress from the logs of the run's running stage pods, by pod name (read when due)."""
        run = (namespace, name)
        readable = [p["metadata"]["name"] for p in pods if log_readable(p)]
        for pod in self.log_reads.due(run, readable):
            self.log_reads.record(run, pod, parse_progress_log(self.cluster.pod_log_tail(namespace, pod)))
        return self.log_reads.progress(run)

    def _view(self, body: dict[str, Any]) -> RunView:
        meta = body["metadata"]
        try:
            spec = RLHFRunSpec.model_validate(body.get("spec") or {}, strict=False)
        except ValidationError as exc:
            # Admission (the CRD's schema and CEL rules) refuses invalid specs; one that still gets
            # here was stored before a stricter CRD. Reported in the status once, never acted upon.
            raise invalid_spec(exc) from exc
        wire_status = body.get("status")
        status = RLHFRunStatus.model_validate(wire_status, strict=False) if wire_status else None
        return RunView(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=int(meta.get("generation") or 1),
            spec=keep_started_pipeline(self.defaults.apply(spec), status),
            status=status,
            annotations=dict(meta.get("annotations") or {}),
        )
