"""The watch caches (cache.py), the client's rate limit, and a pass's writes: no cluster needed.

The integration side (a real API server: no read per pass, a restart writes nothing) is in
test_cache_requests.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from rlhf_api.names import CONTROLLER_UID_LABEL, LABEL_MANAGED_BY, LABEL_RUN, LABEL_STAGE, MANAGER, PROGRESS_ANNOTATION
from rlhf_operator.cache import (
    JOBS,
    NOT_A_CHILD,
    OWN_WRITE,
    PODS,
    PVCS,
    RUNS,
    UNCHANGED,
    WatchCache,
    tap_watch_streams,
    trim_job,
    trim_pod,
    trim_run,
)
from rlhf_operator.kube import Deferred, EventPoster, TokenBucket, limit_client, request_name, spare_capacity
from rlhf_operator.metrics import Metrics
from rlhf_operator.observe import log_readable, observe
from rlhf_operator.reconcile import Reconciler

from .harness import tiny_run

RESULT = {"stage": "sft", "succeeded": True, "artifactPath": "/runs/ns/tiny/sft", "metrics": {"loss": 0.5}}
MANAGED_FIELDS = [{"manager": "kube-controller-manager", "fieldsV1": {"f:status": {"f:active": {}}}}] * 20


def full_job(name: str = "tiny-sft", uid: str = "job-1", **status: Any) -> dict[str, Any]:
    """A Job as the API server serves it (the shapes that matter, plus the bulk the cache drops)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": uid,
            "resourceVersion": "10",
            "labels": {LABEL_RUN: "tiny", LABEL_STAGE: "sft", LABEL_MANAGED_BY: MANAGER,
                       "app.kubernetes.io/name": "rlhf-stage"},
            "ownerReferences": [{"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFRun", "name": "tiny",
                                 "uid": "run-1", "controller": True, "blockOwnerDeletion": True}],
            "managedFields": MANAGED_FIELDS,
        },
        "spec": {"suspend": False, "backoffLimit": 2, "template": {"spec": {"containers": [{"name": "stage",
                 "image": "x", "args": ["--long"] * 50, "env": [{"name": f"E{i}"} for i in range(40)]}]}}},
        "status": {
            "active": 0, "succeeded": 1, "startTime": "2026-01-01T11:00:00Z",
            "completionTime": "2026-01-01T11:05:00Z",
            "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": "x", "lastTransitionTime": "y"}],
            **status,
        },
    }  # fmt: skip


def full_pod(name: str, phase: str, job_uid: str = "job-1", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"pod-{name}",
            "resourceVersion": "11",
            "creationTimestamp": "2026-01-01T11:00:01Z",
            "labels": {
                LABEL_RUN: "tiny",
                LABEL_MANAGED_BY: MANAGER,
                CONTROLLER_UID_LABEL: job_uid,
                "job-name": "tiny-sft",
            },
            "annotations": {PROGRESS_ANNOTATION: json.dumps({"step": 3, "totalSteps": 10}), "other": "x" * 500},
            "managedFields": MANAGED_FIELDS,
        },
        "spec": {"nodeName": "node-1", "containers": [{"name": "stage", "image": "x", "args": ["a"] * 100}]},
        "status": {"phase": phase, "podIP": "10.0.0.1", **status},
    }


def terminated(message: str, code: int = 0) -> dict[str, Any]:
    state = {"terminated": {"exitCode": code, "message": message, "reason": "Completed", "startedAt": "a"}}
    return {"containerStatuses": [{"name": "stage", "image": "x", "imageID": "sha", "state": state, "ready": False}]}


WORLDS = {
    "succeeded": ([full_job()], [full_pod("p1", "Succeeded", **terminated(json.dumps(RESULT)))]),
    "failed": (
        [full_job(succeeded=0, failed=3, conditions=[{"type": "Failed", "status": "True",
                  "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}])],
        [full_pod("p1", "Failed", **terminated("Traceback ... boom", 1)),
         full_pod("p2", "Failed", **terminated("exit 2", 2))],
    ),
    "running": ([full_job(succeeded=0, active=1, conditions=[])],
                [full_pod("p1", "Running", containerStatuses=[{"name": "stage", "state": {"running": {}},
                 "lastState": {"terminated": {"exitCode": 1, "message": "earlier"}}}])]),
    "waiting": ([full_job(succeeded=0, active=1, conditions=[])],
                [full_pod("p1", "Pending", conditions=[{"type": "PodScheduled", "status": "False",
                 "reason": "Unschedulable", "message": "0/3 nodes"}, {"type": "Initialized", "status": "True"}],
                 initContainerStatuses=[{"name": "fetch", "state": {"waiting": {"reason": "PodInitializing"}}}])]),
    "image": ([full_job(succeeded=0, active=1, conditions=[])],
              [full_pod("p1", "Pending", containerStatuses=[{"name": "sidecar", "state": {"running": {}}},
               {"name": "stage", "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}])]),
}  # fmt: skip


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_the_trimmed_objects_observe_the_same_and_are_small(world: str) -> None:
    jobs, pods = WORLDS[world]
    trimmed_jobs, trimmed_pods = [trim_job(j) for j in jobs], [trim_pod(p) for p in pods]
    assert observe("run-1", trimmed_jobs, trimmed_pods) == observe("run-1", jobs, pods)
    assert observe("run-1", jobs, pods).jobs  # the world is adopted: the comparison compares something
    assert [log_readable(p) for p in trimmed_pods] == [log_readable(p) for p in pods]
    assert len(json.dumps(trimmed_jobs + trimmed_pods)) * 5 < len(json.dumps(jobs + pods))


def test_a_run_keeps_what_the_reconciler_reads_without_kubectls_copies() -> None:
    run = tiny_run()
    run["metadata"].update(namespace="ns", uid="u", resourceVersion="5", generation=2, managedFields=MANAGED_FIELDS)
    run["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": json.dumps(run),
        "rlhf-operator.io/retry": "1",
    }
    trimmed = trim_run(run)
    assert trimmed["spec"] == run["spec"] and trimmed["metadata"]["generation"] == 2
    assert trimmed["metadata"]["annotations"] == {"rlhf-operator.io/retry": "1"}
    assert "managedFields" not in trimmed["metadata"]


def test_the_cache_indexes_children_by_run_and_follows_deletes() -> None:
    cache = WatchCache()
    job, pod = full_job(), full_pod("p1", "Running")
    assert cache.apply(JOBS, None, job).run == ("ns", "tiny")
    assert cache.apply(JOBS, "MODIFIED", job) == (None, OWN_WRITE)  # same resourceVersion: nothing changed
    cache.apply(PODS, "ADDED", pod)
    cache.apply(PODS, "ADDED", {"metadata": {"name": "stray", "namespace": "ns", "uid": "s"}})  # no run label
    cache.apply(PVCS, "ADDED", {"metadata": {"name": "tiny-workspace", "namespace": "ns"}})
    jobs, pods, pvc = cache.children("ns", "tiny", want_pvc=True)
    assert [j["metadata"]["name"] for j in jobs] == ["tiny-sft"] and len(pods) == 1 and pvc
    assert cache.children("other", "tiny", want_pvc=True) == ([], [], False)
    cache.apply(PODS, "DELETED", pod)
    cache.apply(PVCS, "DELETED", {"metadata": {"name": "tiny-workspace", "namespace": "ns"}})
    assert cache.children("ns", "tiny", want_pvc=True) == (jobs, [], False)
    assert len(cache) == 1


def _version(body: dict[str, Any], version: int, status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    """``body`` as a later watch event brings it: another resourceVersion, its status and metadata changed."""
    out = copy.deepcopy(body)
    out["metadata"].update(resourceVersion=str(version), **meta)
    out["status"].update(status or {})
    return out


def test_watch_events_that_change_nothing_a_pass_reads_cause_no_pass() -> None:
    """A stage's Job and Pod under the real Job controller and a kubelet: of their ~10 updates, the
    ones that change nothing a pass reads, and our own writes coming back, are told apart from the
    ones a pass must see (issue 14: each used to cost a pass)."""
    cache, key = WatchCache(), ("ns", "tiny")
    run = stored_run()
    assert cache.apply(RUNS, "ADDED", run) == (key, None)
    written = {**run, "metadata": {**run["metadata"], "resourceVersion": "2"}, "status": {"phase": "Pending"}}
    cache.wrote_run(run, written)
    assert cache.apply(RUNS, "MODIFIED", written) == (None, OWN_WRITE), "our status write coming back"
    retried = copy.deepcopy(written)
    retried["metadata"].update(resourceVersion="3", annotations={"rlhf-operator.io/retry": "1"})
    assert cache.apply(RUNS, "MODIFIED", retried) == (key, None), "a user's annotation: a pass reads it"

    job = full_job()
    job["status"] = {}
    cache.created(JOBS, job)  # what our create returned
    job_events = [
        ("ADDED", job, OWN_WRITE),
        ("MODIFIED", _version(job, 11, {"active": 1, "startTime": "t"}), None),
        ("MODIFIED", _version(job, 12, {"active": 1, "startTime": "t", "ready": 1}), UNCHANGED),
        ("MODIFIED", _version(job, 13, {"active": 1, "startTime": "t", "ready": 1,
                                        "conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}), UNCHANGED),
        ("MODIFIED", _version(job, 14, {"active": 0, "succeeded": 1, "startTime": "t", "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}), None),
        ("DELETED", _version(job, 15), None),
    ]  # fmt: skip
    pod = full_pod("p1", "Pending")
    pod["spec"].pop("nodeName")
    pod["metadata"]["finalizers"] = ["batch.kubernetes.io/job-tracking"]
    running = {"phase": "Running", "containerStatuses": [{"name": "stage", "state": {"running": {"startedAt": "t"}}}]}
    pod_events = [
        ("ADDED", pod, None),
        ("MODIFIED", _version(pod, 21, {"conditions": [{"type": "PodScheduled", "status": "True"}]}), None),
        ("MODIFIED", _version(pod, 22, {"conditions": [{"type": "PodScheduled", "status": "True"},
                                                       {"type": "Initialized", "status": "True"}]}), UNCHANGED),
        ("MODIFIED", _version(pod, 23, {"hostIP": "10.0.0.2", **running, "conditions": [
            {"type": "PodScheduled", "status": "True"}]}), None),
        ("MODIFIED", _version(pod, 24, {"hostIP": "10.0.0.2", **running, "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}), UNCHANGED),
        ("MODIFIED", _version(pod, 25, {"phase": "Succeeded", **terminated(json.dumps(RESULT))}), None),
        ("MODIFIED", _version(pod, 26, {"phase": "Succeeded", **terminated(json.dumps(RESULT))}, finalizers=[]),
         UNCHANGED),
    ]  # fmt: skip
    for plural, events in ((JOBS, job_events), (PODS, pod_events)):
        for kind, body, cause in events:
            assert cache.apply(plural, kind, body) == ((None, cause) if cause else (key, None)), (plural, body)
    stray = {"metadata": {"name": "stray", "namespace": "ns", "uid": "s", "resourceVersion": "1"}}
    assert cache.apply(PODS, "ADDED", stray) == (None, NOT_A_CHILD)
    # The run's label copied onto someone else's Job: neither a pass nor a child the planner reads.
    lookalike = full_job("tiny-lookalike", uid="job-x")
    del lookalike["metadata"]["labels"][LABEL_MANAGED_BY]
    assert cache.apply(JOBS, "ADDED", lookalike) == (None, NOT_A_CHILD)

    pvc = {
        "metadata": {
            "name": "tiny-workspace",
            "namespace": "ns",
            "labels": {LABEL_RUN: "tiny", LABEL_MANAGED_BY: MANAGER},
        }
    }
    cache.created(PVCS, pvc)  # the pass that made sure of it
    assert cache.apply(PVCS, "ADDED", pvc) == (None, OWN_WRITE)
    assert cache.apply(PVCS, "MODIFIED", pvc) == (None, UNCHANGED), "bound, resized: a pass reads only that it exists"
    assert cache.apply(PVCS, "DELETED", pvc) == (key, None)
    assert cache.children("ns", "tiny", want_pvc=True) == ([], [trim_pod(pod_events[-1][1])], False)


def test_the_tap_fills_the_cache_hides_the_listing_and_a_relisting_finds_what_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kopf._cogs.clients import watching
    from kopf._cogs.structs import references

    run = tiny_run()
    run["metadata"].update(namespace="ns", uid="run-1", resourceVersion="1")
    other = copy.deepcopy(run)
    other["metadata"].update(name="other", uid="run-2")
    edited = {**run, "metadata": {**run["metadata"], "resourceVersion": "2"}, "spec": {**run["spec"], "suspend": True}}
    # A new version that changes nothing a pass reads (only kubectl's bookkeeping): not passed on.
    touched = {**edited, "metadata": {**edited["metadata"], "resourceVersion": "3", "managedFields": MANAGED_FIELDS}}
    rounds = [
        [{"type": None, "object": run}, {"type": None, "object": other}, watching.Bookmark.LISTED,
         {"type": "MODIFIED", "object": edited}, {"type": "MODIFIED", "object": touched}],
        # A re-listing (410 Gone): "other" was deleted meanwhile, "tiny" did not change.
        [{"type": None, "object": touched}, watching.Bookmark.LISTED],
    ]  # fmt: skip

    async def fake_watch(**_: Any) -> AsyncIterator[Any]:
        for event in rounds.pop(0):
            yield event

    monkeypatch.setattr(watching, "continuous_watch", fake_watch)
    cache, listed, changed, ignored = WatchCache(), [], [], []
    urgent = lambda plural, body: body["spec"].get("suspend", False)  # noqa: E731  (edited: urgent)
    tap_watch_streams(cache, 1, listed.append, lambda *c: changed.append(c), lambda *why: ignored.append(why), urgent)
    resource = references.Resource(group="rlhf-operator.io", version="v1alpha1", plural=RUNS)

    async def consume() -> list[Any]:
        seen = [e async for e in watching.continuous_watch(resource=resource, namespace="ns")]
        assert cache.synced.is_set() and len(cache.runs()) == 2
        return seen + [e async for e in watching.continuous_watch(resource=resource, namespace="ns")]

    passed_on = asyncio.run(consume())
    # kopf sees only the markers: the edit enqueued its run from the tap (urgent), the re-listing the
    # deleted one (not urgent); kopf never holds a memory of a cached object (tap_watch_streams).
    assert passed_on == [watching.Bookmark.LISTED, watching.Bookmark.LISTED]
    assert [r["metadata"]["name"] for r in cache.runs()] == ["tiny"]
    assert cache.get_run("ns", "tiny")["metadata"]["resourceVersion"] == "3"  # type: ignore[index]
    assert changed == [(("ns", "tiny"), True), (("ns", "other"), False)] and len(listed) == 2
    assert ignored == [(RUNS, "unchanged")]


def test_the_tap_passes_kopfs_own_watches_on_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cluster-wide, kopf watches Namespaces to find where to watch: none of its events may be taken
    for a change that needs no pass (they name no run)."""
    from kopf._cogs.clients import watching
    from kopf._cogs.structs import references

    events = [watching.Bookmark.LISTED, {"type": "ADDED", "object": {"metadata": {"name": "team-a"}}},
              {"type": "MODIFIED", "object": {"metadata": {"name": "team-a"}}}]  # fmt: skip

    async def fake_watch(**_: Any) -> AsyncIterator[Any]:
        for event in events:
            yield event

    monkeypatch.setattr(watching, "continuous_watch", fake_watch)
    ignored: list[Any] = []
    tap_watch_streams(WatchCache(), 1, lambda _: None, lambda *_: None, lambda *why: ignored.append(why))
    resource = references.Resource(group="", version="v1", plural="namespaces")

    async def consume() -> list[Any]:
        return [e async for e in watching.continuous_watch(resource=resource, namespace=None)]

    assert asyncio.run(consume()) == events and ignored == []


def test_a_failed_watch_request_ends_the_stream_for_kopf_to_list_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf would let a 503 (an API server still starting) end the stream's task for good."""
    from kopf._cogs.clients import errors, watching
    from kopf._cogs.structs import references

    async def failing_watch(**_: Any) -> AsyncIterator[Any]:
        yield watching.Bookmark.LISTED
        raise errors.APIServerError({"message": "not ready", "code": 503}, status=503, headers={})

    slept: list[float] = []

    async def no_wait(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(watching, "continuous_watch", failing_watch)
    monkeypatch.setattr(asyncio, "sleep", no_wait)
    tap_watch_streams(WatchCache(), 1, lambda _: None, lambda *_: None)
    resource = references.Resource(group="batch", version="v1", plural=JOBS)

    async def consume() -> list[Any]:
        return [e async for e in watching.continuous_watch(resource=resource, namespace="ns")]

    assert asyncio.run(consume()) == [watching.Bookmark.LISTED]
    assert len(slept) == 1 and 0 < slept[0] <= 0.5  # backed off (a listing had succeeded: the first delay)


def test_the_token_bucket_allows_a_burst_then_paces() -> None:
    now = [0.0]
    bucket = TokenBucket(qps=10, burst=3, clock=lambda: now[0])
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve() == pytest.approx(0.1) and bucket.reserve() == pytest.approx(0.2)
    now[0] += 10  # refilled, but never above the burst
    assert [bucket.reserve() for _ in range(4)][-1] == pytest.approx(0.1)


def test_requests_are_named_by_method_and_resource() -> None:
    base = "https://h:6443/apis/rlhf-operator.io/v1alpha1/namespaces/ns/rlhfruns"
    assert request_name("put", f"{base}/tiny/status") == "PUT rlhfruns/status"
    assert request_name("GET", "https://h/api/v1/namespaces/ns/pods/p/log?tailLines=3") == "GET pods/log"
    assert request_name("GET", base) == "GET rlhfruns"


# --- a pass's writes ------------------------------------------------------------------------------
class Recorder:
    """The cache's reads from dicts; every write recorded (a status write bumps the resourceVersion)."""

    def __init__(self, run: dict[str, Any]) -> None:
        self.run = run
        self.writes: list[str] = []
        self.conflict = False

    def get_run(self, namespace: str, name: str) -> dict[str, Any]:
        return self.run

    def children(self, namespace: str, run: str, want_pvc: bool) -> tuple[list[dict], list[dict], bool]:
        return [], [], True

    def perform(self, run: dict[str, Any], action: Any) -> None:
        self.writes.append(type(action).__name__ + ":" + str(getattr(action, "reason", "")))

    def write_status(self, run: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        if self.conflict:
            raise ApiException(status=409, reason="Conflict")
        self.writes.append("status")
        version = str(int(run["metadata"]["resourceVersion"]) + 1)
        return {**run, "metadata": {**run["metadata"], "resourceVersion": version}, "status": status}

    def writing_status(self, before: dict[str, Any], status: dict[str, Any]) -> None:
        pass

    def wrote_run(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        self.run = after

    def creating(self, plural: str, body: dict[str, Any], sent: bool) -> None:
        pass

    def created(self, plural: str, body: dict[str, Any]) -> None:
        pass


def stored_run(**spec: Any) -> dict[str, Any]:
    run = tiny_run(**spec)
    run["metadata"].update(namespace="ns", uid="run-1", generation=1, resourceVersion="1")
    return run


def test_an_invalid_stored_spec_is_reported_once_and_an_edit_is_tried_again() -> None:
    world = Recorder(stored_run(method="no-such-method"))
    metrics = Metrics()
    rec = Reconciler(world, world, metrics)  # type: ignore[arg-type]
    assert rec.reconcile("ns", "tiny") is None  # no raise: nothing for the work queue's backoff to retry
    assert world.writes == ["status", "PostEvent:InvalidSpec"]
    status = world.run["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert status["phase"] == "Failed" and failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("spec.method: ") and "kubectl edit rlhfrun tiny -n ns" in failed["message"]
    for _ in range(3):  # later passes (a resync, a Job event) change nothing
        rec.reconcile("ns", "tiny")
    assert world.writes == ["status", "PostEvent:InvalidSpec"]

    fixed = stored_run()  # the edit: a valid spec, a new generation
    fixed["metadata"].update(generation=2, resourceVersion=world.run["metadata"]["resourceVersion"])
    world.run = {**fixed, "status": status}
    rec.reconcile("ns", "tiny")
    assert world.run["status"]["phase"] == "Pending" and world.run["status"]["observedGeneration"] == 2
    failed = next(c for c in world.run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "False" and world.run["status"]["stages"]  # the planner took it over


def test_a_conflict_waits_for_the_newer_versions_event_instead_of_backing_off() -> None:
    world = Recorder(stored_run())
    world.conflict = True
    metrics = Metrics()
    assert Reconciler(world, world, metrics).reconcile("ns", "tiny") is None  # type: ignore[arg-type]
    assert metrics.reconcile_errors.labels("Conflict")._value.get() == 1


class Hands:
    """The API server's side of a pass's writes: what a create and a status write return."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.returned: dict[str, dict[str, Any]] = {}

    def perform(self, run: dict[str, Any], action: Any) -> dict[str, Any] | None:
        self.writes.append(type(action).__name__)
        if type(action).__name__ == "EnsurePVC":
            self.returned["pvc"] = action.manifest
        if type(action).__name__ != "CreateJob":
            return None
        job = copy.deepcopy(action.job)
        job["metadata"].update(uid="job-1", resourceVersion="5")
        self.returned["job"] = {**job, "status": {}}
        return self.returned["job"]

    def write_status(self, run: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("status")
        self.returned["run"] = {**run, "metadata": {**run["metadata"], "resourceVersion": "2"}, "status": status}
        return self.returned["run"]


def test_a_passs_own_writes_coming_back_cause_no_pass_and_passes_count_whether_they_wrote() -> None:
    cache, hands, metrics = WatchCache(), Hands(), Metrics()
    cache.apply(RUNS, "ADDED", stored_run())
    rec = Reconciler(hands, cache, metrics)  # type: ignore[arg-type]
    rec.reconcile("ns", "tiny")
    assert hands.writes == ["EnsurePVC", "CreateJob", "status"]
    assert cache.apply(RUNS, "MODIFIED", hands.returned["run"]) == (None, OWN_WRITE)
    assert cache.apply(JOBS, "ADDED", hands.returned["job"]) == (None, OWN_WRITE)
    assert cache.apply(PVCS, "ADDED", hands.returned["pvc"]) == (None, OWN_WRITE)
    rec.reconcile("ns", "tiny")  # as if one of them had been passed on: nothing to do
    assert hands.writes == ["EnsurePVC", "CreateJob", "status"]
    count = "rlhf_reconcile_duration_seconds_count"
    passes = {w: metrics.registry.get_sample_value(count, {"wrote": w}) for w in ("yes", "no")}
    assert passes == {"yes": 1, "no": 1}


def _pass_writes(metrics: Metrics, created: str) -> tuple[float | None, float | None]:
    """(passes, writes) of rlhf_reconcile_writes for one label."""
    get = metrics.registry.get_sample_value
    labels = {"created": created}
    return get("rlhf_reconcile_writes_count", labels), get("rlhf_reconcile_writes_sum", labels)


def test_each_writing_pass_counts_its_writes_at_most_three_for_a_transition() -> None:
    """Issue 14's goal, counted by the pass itself: the run's start (claim, Job, status), the stage's Pod
    seen Running (status, event) and the transition to the next stage (Job, status, event)."""
    cache, hands, metrics = WatchCache(), Hands(), Metrics()
    cache.apply(RUNS, "ADDED", stored_run())
    rec = Reconciler(hands, cache, metrics)  # type: ignore[arg-type]
    rec.reconcile("ns", "tiny")
    assert _pass_writes(metrics, "start") == (1, 3)
    for plural, body in ((RUNS, hands.returned["run"]), (PVCS, hands.returned["pvc"])):
        cache.apply(plural, "MODIFIED" if plural == RUNS else "ADDED", body)
    for phase, (jobs, pods) in (("running", WORLDS["running"]), ("succeeded", WORLDS["succeeded"])):
        for job in jobs:
            cache.apply(JOBS, "MODIFIED", job)
        for pod in pods:
            cache.apply(PODS, "ADDED", pod)
        hands.writes.clear()
        rec.reconcile("ns", "tiny")
        cache.apply(RUNS, "MODIFIED", hands.returned["run"])
        if phase == "running":
            assert hands.writes == ["status", "PostEvent"] and _pass_writes(metrics, "none") == (1, 2)
    assert hands.writes == ["CreateJob", "status", "PostEvent"], hands.writes
    assert _pass_writes(metrics, "job") == (1, 3)
    cache.apply(JOBS, "ADDED", hands.returned["job"])
    rec.reconcile("ns", "tiny")  # nothing changed: no observation
    assert metrics.registry.get_sample_value("rlhf_reconcile_writes_count", {"created": "job"}) == 1


def test_a_status_writes_event_read_before_its_answer_is_still_known_as_our_own() -> None:
    cache = WatchCache()
    cache.apply(RUNS, "ADDED", stored_run())
    seen: list[Any] = []

    class EventFirst(Hands):
        def write_status(self, run: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
            after = super().write_status(run, status)
            seen.append(cache.apply(RUNS, "MODIFIED", after))  # the watch event, taken in before the answer
            return after

    hands = EventFirst()
    Reconciler(hands, cache, Metrics()).reconcile("ns", "tiny")  # type: ignore[arg-type]
    assert seen == [(None, OWN_WRITE)]
    other = copy.deepcopy(hands.returned["run"])
    other["metadata"]["resourceVersion"] = "3"
    other["status"]["phase"] = "Failed"  # not ours: another writer's status
    assert cache.apply(RUNS, "MODIFIED", other) == (("ns", "tiny"), None)


def test_a_job_creates_event_read_before_its_answer_is_still_known_as_our_own() -> None:
    """Under load the ADDED event of a Job we create can reach the cache before the create's answer
    (~10 % of creates at 1,000 runs): it is ours, and costs no pass. A create that failed leaves
    nothing behind: a Job of that name added later is somebody's news."""
    cache = WatchCache()
    cache.apply(RUNS, "ADDED", stored_run())
    seen: list[Any] = []

    class EventFirst(Hands):
        def perform(self, run: dict[str, Any], action: Any) -> dict[str, Any] | None:
            created = super().perform(run, action)
            if type(action).__name__ == "CreateJob":
                seen.append(cache.apply(JOBS, "ADDED", created))  # the watch event, before the answer
            return created

    Reconciler(EventFirst(), cache, Metrics()).reconcile("ns", "tiny")  # type: ignore[arg-type]
    assert seen == [(None, OWN_WRITE)]
    assert len(cache.children("ns", "tiny", want_pvc=False)[0]) == 1, "held once, not twice"

    class Refused(Hands):
        def perform(self, run: dict[str, Any], action: Any) -> dict[str, Any] | None:
            if type(action).__name__ == "CreateJob":
                self.returned["job"] = action.job
                raise ApiException(status=500, reason="InternalError")
            return super().perform(run, action)

    cache, hands = WatchCache(), Refused()
    cache.apply(RUNS, "ADDED", stored_run())
    with pytest.raises(ApiException):
        Reconciler(hands, cache, Metrics()).reconcile("ns", "tiny")  # type: ignore[arg-type]
    job = copy.deepcopy(hands.returned["job"])
    job["metadata"].update(uid="job-2", resourceVersion="9")
    assert cache.apply(JOBS, "ADDED", job) == (("ns", "tiny"), None)


# --- priorities under the rate limit (issue 14) ----------------------------------------------------
def test_spare_requests_never_take_the_headroom_kept_for_writes() -> None:
    now = [0.0]
    bucket = TokenBucket(qps=4, burst=4, clock=lambda: now[0])  # 0.25 s a token: exact in floats
    assert [bucket.take_spare() for _ in range(3)] == [True, True, False], "half the burst is kept"
    assert bucket.reserve() == 0.0 and bucket.reserve() == 0.0, "the kept half still serves writes at once"
    assert not bucket.take_spare() and bucket.reserve() == pytest.approx(0.25), "a write may go into debt"
    with pytest.raises(Deferred):
        bucket.wait_spare(0)
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the clock moves as the poster sleeps
        slept.append(seconds)
        now[0] += seconds

    # 4 tokens' time: the write's debt paid back, then the kept half (2) and one spare refilled.
    assert bucket.wait_spare(None, sleep) == pytest.approx(1.0) and slept == [0.25] * 4


def test_a_request_without_spare_capacity_is_deferred_unsent_and_uncounted() -> None:
    sent: list[str] = []
    counted: list[str] = []
    waits: list[tuple[str, float]] = []
    api = types.SimpleNamespace(rest_client=types.SimpleNamespace(request=lambda m, u, **kw: sent.append(m)))
    limit_client(api, qps=1, burst=2, count=counted.append, waited=lambda p, s: waits.append((p, s)))  # type: ignore[arg-type]
    url = "https://h/api/v1/namespaces/ns/pods/p/log"
    with spare_capacity(0):
        api.rest_client.request("GET", url)  # 2 tokens: one spare
        with pytest.raises(Deferred):
            api.rest_client.request("GET", url)
    api.rest_client.request("POST", "https://h/api/v1/namespaces/ns/events")  # a normal request still goes
    assert sent == ["GET", "POST"] and counted == ["GET pods/log", "POST events"]
    assert [p for p, _ in waits] == ["spare", "normal"]


def test_a_full_event_queue_drops_normal_events_before_warnings() -> None:
    """Under load the queue overflows; a Warning (a failure, suspected hacking) outlives the older
    progress events, and only a queue of nothing but Warnings drops a Warning (its oldest)."""

    def posted(limit: int, events: list[tuple[str, str]]) -> tuple[list[str], int]:
        sent: list[str] = []
        dropped: list[int] = []
        poster = EventPoster(
            lambda ns, body: sent.append(body["reason"]), limit=limit, dropped=lambda: dropped.append(1)
        )
        for reason, kind in events:  # all queued before the poster's thread runs
            poster.post("ns", {"reason": reason, "type": kind})
        expected = poster.pending()
        poster.start()
        for _ in range(500):
            if len(sent) == expected:
                break
            time.sleep(0.01)
        poster.stop()
        return sent, len(dropped)

    mixed = [("w1", "Warning"), ("n1", "Normal"), ("n2", "Normal"), ("n3", "Normal"), ("w2", "Warning")]
    assert posted(3, mixed) == (["w1", "n3", "w2"], 2)  # n1, then n2 went; the older w1 stayed
    warnings = [("w1", "Warning"), ("w2", "Warning"), ("w3", "Warning")]
    assert posted(2, warnings) == (["w2", "w3"], 1)


def test_the_event_poster_sends_in_order_drops_the_oldest_and_nothing_when_not_leading() -> None:
    sent: list[str] = []
    dropped: list[int] = []
    leading = [True]
    done = threading.Event()

    def send(namespace: str, body: dict[str, Any]) -> None:
        if body["reason"] == "b":
            sent.append("b")
            raise ConnectionRefusedError("the API server is down")  # the poster goes on
        sent.append(body["reason"])
        if body["reason"] == "last":
            done.set()

    asked: list[bool] = []

    def may_act() -> bool:
        asked.append(leading[0])
        return leading[0]

    poster = EventPoster(send, may_act, limit=2, dropped=lambda: dropped.append(1))
    for reason in ("a", "b", "c"):  # queued before the thread runs: "a" is dropped
        poster.post("ns", {"reason": reason})
    poster.start()
    poster.post("ns", {"reason": "last"})
    assert done.wait(5)
    assert sent == ["b", "c", "last"] and len(dropped) == 1
    leading[0] = False
    poster.post("ns", {"reason": "not-leading"})
    for _ in range(500):
        if len(asked) == 4:  # the poster has looked at it
            break
        time.sleep(0.01)
    poster.stop()
    assert asked == [True, True, True, False] and sent == ["b", "c", "last"]
