"""One reconcile pass for one run: read, plan, act, write status (once, only if changed), post events.

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
from typing import Any

from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from rlhf_api.run import RLHFRunSpec, RLHFRunStatus

from .actions import PostEvent
from .defaults import OperatorDefaults
from .kube import Cluster
from .metrics import Metrics
from .observe import Progress, log_readable, observe, parse_progress_log
from .planner import RunView, keep_started_pipeline, plan
from .progress import DEFAULT_PROGRESS_INTERVAL, LogReads, poll_after

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        cluster: Cluster,
        metrics: Metrics,
        clock: Callable[[], datetime] | None = None,
        defaults: OperatorDefaults | None = None,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
    ) -> None:
        self.cluster = cluster
        self.metrics = metrics
        self.defaults = defaults or OperatorDefaults()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.log_reads = LogReads(progress_interval)

    def reconcile(self, namespace: str, name: str) -> float | None:
        """Returns in how many seconds to reconcile the run again without an event (None: only on
        events and resyncs; always so for a run that is gone, finished, suspended or pending)."""
        started = time.monotonic()
        self.metrics.reconciles.inc()
        try:
            return self._reconcile(namespace, name)
        except ApiException as exc:
            # Conflict: the run changed since it was read; the next pass starts from the new version.
            self.metrics.reconcile_errors.labels("Conflict" if exc.status == 409 else "ApiError").inc()
            raise
        except Exception as exc:
            self.metrics.reconcile_errors.labels(type(exc).__name__).inc()
            raise
        finally:
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    def _reconcile(self, namespace: str, name: str) -> float | None:
        body = self.cluster.get_run(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            # Deleted: the garbage collector removes the children through their owner references.
            self.metrics.run_phase(namespace, name, None)
            self.log_reads.forget((namespace, name))
            return None
        view = self._view(body)
        jobs, pods, pvc = self.cluster.children(namespace, name, want_pvc=view.spec.storage.existing_claim is None)
        logged = self._read_progress(namespace, name, pods)
        result = plan(view, observe(view.uid, jobs, pods, pvc, logged), self.clock())
        events: list[PostEvent] = []
        for action in result.actions:
            if isinstance(action, PostEvent):
                events.append(action)
            else:
                log.info("%s/%s: %s", namespace, name, type(action).__name__)
                self.cluster.perform(body, action)
        new_status = result.status.to_wire()
        if new_status != (body.get("status") or {}):
            self.cluster.write_status(body, new_status)
        for event in events:
            self.cluster.perform(body, event)
        for stage in result.finished:
            self.metrics.stage_finished(stage)
        self.metrics.run_phase(namespace, name, result.status.phase)
        return poll_after(result.status, self.log_reads.next_read_in((namespace, name)))

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
        except ValidationError:
            # Admission (the CRD's schema and CEL rules) refuses invalid specs; one that still gets
            # here was stored before a stricter CRD. It is logged and counted, never acted upon.
            log.exception("%s/%s: the stored spec is invalid", meta.get("namespace"), meta.get("name"))
            raise
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
