"""Live progress from the stage's log: the pure parser, which pods are read, the per-pod rate limit,
the requeue decision, the log read's failure handling and the work queue's one-timer-per-run rule.

No API server: the log read is checked against a stub client (a real kubelet is needed for a real
log; docs/operator.md "Live progress")."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import urllib3
from kubernetes.client.rest import ApiException

from rlhf_api.layout import PROGRESS_LOG_MARKER, progress_log_line
from rlhf_api.names import CONTROLLER_UID_LABEL, PROGRESS_ANNOTATION
from rlhf_api.run import RLHFRunStatus, StageStatus
from rlhf_operator.kube import Cluster
from rlhf_operator.observe import (
    Progress,
    log_readable,
    observe_job,
    parse_progress,
    parse_progress_log,
)
from rlhf_operator.progress import LogReads, poll_after
from rlhf_operator.workqueue import WorkQueue


def line(step: int, total: int | None = 10, **metrics: float) -> str:
    return progress_log_line({"stage": "ppo", "step": step, "totalSteps": total, "metrics": metrics})


# --- the parser ----------------------------------------------------------------------------------
def test_the_line_format_is_the_marker_then_one_line_of_json() -> None:
    text = line(3, 10, loss=0.5)
    assert text.startswith(PROGRESS_LOG_MARKER + " {") and "\n" not in text
    assert json.loads(text.split(" ", 1)[1])["step"] == 3
    assert "\n" not in progress_log_line({"step": 1, "note": "two\nlines"})  # JSON escapes newlines


def test_the_last_marker_line_wins_among_other_log_lines() -> None:
    log = "\n".join(
        [
            "loading model ...",
            line(1, loss=2.0),
            "step 1 took 3.2s",
            line(2, loss=1.5),
            "WARNING something unrelated mentioning rlhf-progress in prose",
            "{'loss': 1.2}",
        ]
    )
    assert parse_progress_log(log) == Progress(2, 10, {"loss": 1.5})


def test_a_garbled_or_cut_last_line_falls_back_to_the_one_before() -> None:
    good = line(4, loss=1.0)
    for bad in (good[:-7], f"{PROGRESS_LOG_MARKER} not json", f"{PROGRESS_LOG_MARKER} ", PROGRESS_LOG_MARKER):
        assert parse_progress_log(f"{line(3)}\n{good}\n{bad}") == Progress(4, 10, {"loss": 1.0}), bad


def test_a_prefix_before_the_marker_is_allowed() -> None:
    """torchrun may prefix a rank's lines; another writer may have left its line unfinished."""
    assert parse_progress_log(f"[rank0]: {line(5)}") == Progress(5, 10)
    assert parse_progress_log(f"Map:  40%|####      | 4/10{line(6)}\r\n") == Progress(6, 10)


@pytest.mark.parametrize("log", [None, "", "no progress here\nnor here", "\n\n", f"x{PROGRESS_LOG_MARKER}{{}}"])
def test_no_marker_line_is_no_progress(log: str | None) -> None:
    assert parse_progress_log(log) is None


def test_one_parse_function_for_both_transports() -> None:
    """The local kubelet's annotation holds the progress file; the log line holds the same JSON."""
    body = {"stage": "ppo", "step": 7, "totalSteps": 20, "metrics": {"reward_mean": 0.25, "note": "x"}}
    assert parse_progress(json.dumps(body, indent=2)) == parse_progress_log(progress_log_line(body))
    assert parse_progress_log(progress_log_line(body)) == Progress(7, 20, {"reward_mean": 0.25})


def test_non_finite_metrics_are_dropped() -> None:
    """NaN would make the status write invalid JSON for the API server."""
    text = f'{PROGRESS_LOG_MARKER} {{"step": 2, "totalSteps": 4, "metrics": {{"loss": NaN, "kl": Infinity, "r": 1}}}}'
    assert parse_progress_log(text) == Progress(2, 4, {"r": 1.0})


# --- which pods, and what the observation takes ---------------------------------------------------
def pod(name: str = "tiny-ppo-abcde", phase: str = "Running", node: str | None = "gpu-1", **state: Any) -> dict:
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": "2026-01-01T11:50:00Z",
            "labels": {CONTROLLER_UID_LABEL: "job-ppo"},
        },
        "spec": {"nodeName": node} if node else {},
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": "stage", "state": state or {"running": {"startedAt": "x"}}}],
        },
    }


def test_only_a_running_stage_container_on_a_node_has_a_log_to_read() -> None:
    assert log_readable(pod())
    assert not log_readable(pod(node=None))  # not scheduled (or the local kubelet: no real node)
    assert not log_readable(pod(phase="Pending", waiting={"reason": "ContainerCreating"}))
    assert not log_readable(pod(waiting={"reason": "CrashLoopBackOff"}))
    assert not log_readable(pod(phase="Succeeded", terminated={"exitCode": 0}))
    deleting = pod()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    assert not log_readable(deleting)


def test_log_progress_wins_over_the_dev_annotation() -> None:
    job = {"metadata": {"name": "tiny-ppo", "uid": "job-ppo", "labels": {}}, "status": {"active": 1}}
    annotated = pod()
    annotated["metadata"]["annotations"] = {PROGRESS_ANNOTATION: json.dumps({"step": 1, "totalSteps": 10})}
    assert observe_job(job, [annotated]).progress == Progress(1, 10)
    assert observe_job(job, [annotated], {"tiny-ppo-abcde": Progress(3, 10)}).progress == Progress(3, 10)
    assert observe_job(job, [pod()], {"another-pod": Progress(3, 10)}).progress is None


# --- the rate limit and the requeue decision -------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


RUN = ("ns", "tiny")


def test_a_pod_log_is_read_at_most_once_per_interval() -> None:
    clock = Clock()
    reads = LogReads(10.0, clock)
    assert reads.due(RUN, ["p"]) == ["p"]
    reads.record(RUN, "p", Progress(1, 10))
    clock.now += 4
    assert reads.due(RUN, ["p"]) == []  # an event-driven pass in between reads nothing ...
    assert reads.progress(RUN) == {"p": Progress(1, 10)}  # ... and keeps the progress read last
    assert reads.next_read_in(RUN) == pytest.approx(6.0)
    clock.now += 6
    assert reads.due(RUN, ["p"]) == ["p"]


def test_a_failed_or_empty_read_keeps_the_last_progress_and_still_counts() -> None:
    clock = Clock()
    reads = LogReads(10.0, clock)
    reads.record(RUN, "p", Progress(2, 10))
    clock.now += 10
    reads.record(RUN, "p", None)  # 403, node unreachable, or no marker in the tail
    assert reads.progress(RUN) == {"p": Progress(2, 10)}
    assert reads.due(RUN, ["p"]) == []  # a failing log is not hammered


def test_pods_that_stopped_running_and_deleted_runs_are_forgotten() -> None:
    reads = LogReads(10.0, Clock())
    reads.record(RUN, "old", Progress(5, 10))
    reads.record(("ns", "other"), "q", Progress(1, 2))
    assert reads.due(RUN, ["new"]) == ["new"]  # a retry's new pod
    assert reads.progress(RUN) == {}
    assert reads.next_read_in(RUN) is None
    assert reads.progress(("ns", "other")) == {"q": Progress(1, 2)}  # other runs untouched
    reads.forget(("ns", "other"))
    assert reads.progress(("ns", "other")) == {}


def test_interval_zero_reads_no_logs() -> None:
    reads = LogReads(0, Clock())
    assert reads.due(RUN, ["p"]) == [] and reads.next_read_in(RUN) is None


def status(phase: str, *stages: str) -> RLHFRunStatus:
    return RLHFRunStatus(
        phase=phase,  # type: ignore[arg-type]
        stages=[StageStatus(name=f"s{i}", phase=p) for i, p in enumerate(stages)],  # type: ignore[arg-type]
    )


def test_a_run_is_polled_only_while_a_stage_runs_and_its_log_is_read() -> None:
    assert poll_after(status("Running", "Succeeded", "Running"), 9.5) == 9.5
    assert poll_after(status("Running", "Succeeded", "Running"), 0.0) == 1.0  # never a busy loop
    assert poll_after(status("Running", "Succeeded", "Running"), None) is None  # no readable pod yet
    assert poll_after(status("Running", "Succeeded", "Pending"), 5.0) is None
    assert poll_after(status("Suspended", "Suspended"), 5.0) is None
    assert poll_after(status("Succeeded", "Succeeded", "Succeeded"), 5.0) is None
    assert poll_after(status("Failed", "Succeeded", "Failed"), 5.0) is None


# --- the log read: never fails a reconcile ---------------------------------------------------------
class Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data


class StubCore:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.calls: list[tuple[tuple, dict]] = []

    def read_namespaced_pod_log(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def cluster_with(outcome: Any) -> tuple[Cluster, StubCore]:
    cluster = Cluster.__new__(Cluster)  # no ApiClient: only the core API is used here
    cluster.core = StubCore(outcome)  # type: ignore[assignment]
    return cluster, cluster.core  # type: ignore[return-value]


def test_the_log_tail_of_the_stage_container_is_read() -> None:
    cluster, core = cluster_with(Raw(f"hello\n{line(8)}\n".encode()))
    text = cluster.pod_log_tail("ns", "tiny-ppo-abcde")
    assert parse_progress_log(text) == Progress(8, 10)
    args, kwargs = core.calls[0]
    assert args == ("tiny-ppo-abcde", "ns")
    assert kwargs["container"] == "stage" and kwargs["tail_lines"] > 0 and kwargs["_request_timeout"]


@pytest.mark.parametrize(
    "error",
    [
        ApiException(status=403, reason="Forbidden"),
        ApiException(status=404, reason="Not Found"),
        ApiException(status=400, reason="Bad Request"),  # container not started yet
        ApiException(status=500, reason="Internal Server Error"),  # the node's kubelet unreachable
        urllib3.exceptions.ReadTimeoutError(None, "/log", "read timed out"),  # type: ignore[arg-type]
        ConnectionResetError(),
    ],
)
def test_a_log_that_cannot_be_read_is_no_progress_not_an_error(error: Exception) -> None:
    cluster, _ = cluster_with(error)
    assert cluster.pod_log_tail("ns", "tiny-ppo-abcde") is None


# --- the work queue: one delayed pass per run ------------------------------------------------------
def test_delayed_adds_keep_one_timer_per_key_the_earliest() -> None:
    async def scenario() -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []

        async def process(key: tuple[str, str]) -> None:
            seen.append(key)

        queue = WorkQueue(process, workers=1)
        queue.start()
        key = ("ns", "tiny")
        for _ in range(5):  # five event-driven passes each asking for a poll: one timer
            queue.add(key, 0.2)
        queue.add(key, 0.05)  # an earlier one (a retry) replaces it
        queue.add(key, 5.0)  # a later one does not
        await asyncio.sleep(0.4)
        await queue.stop()
        return seen

    assert asyncio.run(scenario()) == [("ns", "tiny")]


# --- one reconcile pass, against a fake cluster ---------------------------------------------------
class FakeCluster:
    """The reads a pass makes (the watch cache's part), from dicts; the writes recorded. Only the log
    read is counted."""

    def __init__(self, run: dict[str, Any], jobs: list[dict], pods: list[dict], log: str | None) -> None:
        self.run, self.jobs, self.pods, self.log = run, jobs, pods, log
        self.log_reads = 0

    def get_run(self, namespace: str, name: str) -> dict[str, Any]:
        return self.run

    def children(self, namespace: str, run: str, want_pvc: bool) -> tuple[list[dict], list[dict], bool]:
        return self.jobs, self.pods, True

    def pod_log_tail(self, namespace: str, pod: str) -> str | None:
        self.log_reads += 1
        return self.log

    def perform(self, run: dict[str, Any], action: Any) -> None:
        pass

    def write_status(self, run: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        self.run = {**run, "status": new}
        return self.run

    def writing_status(self, before: dict[str, Any], status: dict[str, Any]) -> None:
        pass

    def wrote_run(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        pass  # write_status already holds it

    def creating(self, plural: str, body: dict[str, Any], sent: bool) -> None:
        pass

    def created(self, plural: str, body: dict[str, Any]) -> None:
        pass


def running_world(log: str | None) -> FakeCluster:
    from .harness import tiny_run

    run = tiny_run()
    run["metadata"].update(namespace="ns", uid="uid-1", generation=1, resourceVersion="1")
    run["status"] = {"phase": "Running", "stages": [{"name": "sft", "phase": "Running", "jobName": "tiny-sft"}]}
    owner = {"uid": "uid-1", "controller": True}
    job = {
        "metadata": {
            "name": "tiny-sft",
            "uid": "job-sft",
            "labels": {"rlhf-operator.io/stage": "sft"},
            "ownerReferences": [owner],
        },
        "status": {"active": 1, "startTime": "2026-01-01T11:50:00Z"},
    }
    stage_pod = pod("tiny-sft-abcde")
    stage_pod["metadata"]["labels"][CONTROLLER_UID_LABEL] = "job-sft"
    return FakeCluster(run, [job], [stage_pod], log)


def reconciler(cluster: FakeCluster, clock: Clock) -> Any:
    from rlhf_operator.metrics import Metrics
    from rlhf_operator.reconcile import Reconciler

    rec = Reconciler(cluster, cluster, Metrics(), progress_interval=10.0)  # type: ignore[arg-type]
    rec.log_reads = LogReads(10.0, clock)
    return rec


def test_a_pass_reads_the_running_stage_log_and_asks_to_pass_again() -> None:
    clock = Clock()
    cluster = running_world(f"epoch 0\n{line(30, 120, loss=0.7)}\n")
    rec = reconciler(cluster, clock)
    assert rec.reconcile("ns", "tiny") == pytest.approx(10.0)
    sft = cluster.run["status"]["stages"][0]
    assert sft["progress"]["step"] == 30 and sft["progress"]["percent"] == 25 and sft["metrics"] == {"loss": 0.7}
    assert cluster.run["status"]["progress"] == "0/4 sft 25%"

    clock.now += 3  # a watch event: no log read, progress kept, the next read still 7 s away
    cluster.log = line(99, 120)
    assert rec.reconcile("ns", "tiny") == pytest.approx(7.0)
    assert cluster.log_reads == 1 and cluster.run["status"]["stages"][0]["progress"]["step"] == 30

    clock.now += 7
    rec.reconcile("ns", "tiny")
    assert cluster.log_reads == 2 and cluster.run["status"]["stages"][0]["progress"]["step"] == 99


def test_a_pass_whose_log_read_fails_keeps_the_progress_and_succeeds() -> None:
    cluster = running_world(None)
    cluster.run["status"]["stages"][0]["progress"] = {"step": 5, "totalSteps": 120, "percent": 4}
    assert reconciler(cluster, Clock()).reconcile("ns", "tiny") == pytest.approx(10.0)
    assert cluster.run["status"]["stages"][0]["progress"]["step"] == 5


def test_no_poll_without_a_readable_pod_nor_for_a_finished_run() -> None:
    cluster = running_world(line(1))
    cluster.pods[0]["spec"] = {}  # not on a node (the local kubelet's pods): events carry progress
    assert reconciler(cluster, Clock()).reconcile("ns", "tiny") is None
    assert cluster.log_reads == 0
    gone = running_world(line(1))
    gone.run["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    assert reconciler(gone, Clock()).reconcile("ns", "tiny") is None
