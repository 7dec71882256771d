"""Multi-node stages (resources.nodes > 1): what the operator reads from a gang's Pods, and how the
planner restarts a gang whose Pod failed, counted against runtime.backoffLimit (docs/operator.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from rlhf_api.run import RLHFRunSpec, RLHFRunStatus, StageStatus
from rlhf_api.runtime import Storage
from rlhf_operator.actions import CreateJob, DeleteJob, PostEvent
from rlhf_operator.observe import JobObservation, Observed, log_readable, observe_job
from rlhf_operator.planner import RunView, plan

from .harness import Env, tiny_run

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
RWX = Storage(access_modes=["ReadWriteMany"])
JOB_UID = "job-sft"


# --- the gang's Pods, as the watch cache holds them --------------------------------------------------
def pod(index: int, phase: str, **container: Any) -> dict[str, Any]:
    labels = {"batch.kubernetes.io/controller-uid": JOB_UID, "batch.kubernetes.io/job-completion-index": str(index)}
    status: dict[str, Any] = {"phase": phase, "containerStatuses": [{"name": "stage", "state": container}]}
    return {
        "metadata": {"name": f"tiny-sft-{index}-x", "labels": labels, "creationTimestamp": "2026-01-01T11:00:00Z"},
        "spec": {"nodeName": "node-a"},
        "status": status,
    }


def ended(index: int, exit_code: int, message: str, at: str) -> dict[str, Any]:
    terminated = {"exitCode": exit_code, "message": message, "finishedAt": at}
    return pod(index, "Failed" if exit_code else "Succeeded", terminated=terminated)


def gang_job(nodes: int = 3, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "tiny-sft", "uid": JOB_UID, "labels": {"rlhf-operator.io/stage": "sft"}},
        "spec": {"completions": nodes, "suspend": False},
        "status": status,
    }


def test_the_first_pod_to_fail_names_the_gang_failure() -> None:
    pods = [
        ended(0, 1, "node 0: rendezvous peer lost", "2026-01-01T11:20:05Z"),
        ended(1, 1, "CUDA error: an illegal memory access", "2026-01-01T11:20:00Z"),
        pod(2, "Running", running={"startedAt": "2026-01-01T11:01:00Z"}),
    ]
    obs = observe_job(gang_job(failed=2), pods)
    assert obs.completions == 3
    assert obs.failed_pod == "tiny-sft-1-x (node 1 of 3)"
    assert obs.result is not None and "illegal memory access" in obs.result.message
    assert obs.exit_code == 1


def test_node_0_speaks_for_a_gang_that_succeeded() -> None:
    result = {"stage": "sft", "succeeded": True, "metrics": {"loss": 0.5}, "artifactPath": "runs/ns/tiny/sft"}
    pods = [
        ended(1, 0, "node 1 of 3 exited 0", "2026-01-01T11:30:01Z"),
        ended(0, 0, json.dumps(result), "2026-01-01T11:30:00Z"),
        ended(2, 0, "node 2 of 3 exited 0", "2026-01-01T11:30:02Z"),
    ]
    obs = observe_job(gang_job(succeeded=3), pods)
    assert obs.failed_pod is None
    assert obs.result is not None and obs.result.metrics == {"loss": 0.5}


def test_a_gang_waits_on_its_stuck_pod_and_reads_progress_from_node_0_only() -> None:
    zero = pod(0, "Running", running={"startedAt": "2026-01-01T11:01:00Z"})
    zero["metadata"]["annotations"] = {"rlhf-operator.io/progress": json.dumps({"step": 7, "totalSteps": 10})}
    one = pod(1, "Pending", waiting={"reason": "ContainerCreating"})
    two = pod(2, "Pending")
    two["spec"] = {}
    two["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/4 nodes: 4 Insufficient"}
    ]
    obs = observe_job(gang_job(active=3), [zero, one, two])
    # Stuck beats starting: the Pod that no node fits is why the gang cannot run.
    assert obs.waiting is not None and obs.waiting.reason == "Unschedulable"
    assert obs.waiting.message == "Pod tiny-sft-2-x (node 2 of 3): 0/4 nodes: 4 Insufficient"
    assert obs.progress is not None and obs.progress.step == 7
    # Only node 0 prints progress: the other nodes' logs are never read.
    running_one = pod(1, "Running", running={"startedAt": "2026-01-01T11:01:00Z"})
    assert log_readable(zero) and not log_readable(running_one)


# --- the planner ----------------------------------------------------------------------------------
def gang_view(status: RLHFRunStatus | None, backoff_limit: int = 1, suspend: bool = False) -> RunView:
    doc = tiny_run(runtime={"backoffLimit": backoff_limit}, suspend=suspend)
    doc["spec"]["sft"]["resources"] = {"nodes": 2, "gpus": 1}
    spec = RLHFRunSpec.model_validate(doc["spec"], strict=False)
    return RunView("tiny", "ns", "uid-1", 1, spec, status)


def running_status(attempts: int) -> RLHFRunStatus:
    return RLHFRunStatus(phase="Running", stages=[StageStatus(name="sft", phase="Running", attempts=attempts)])


def gang(**kw: Any) -> Observed:
    fields: dict[str, Any] = {"name": "tiny-sft", "stage": "sft", "uid": JOB_UID, "completions": 2, "pods": 2}
    return Observed({"sft": JobObservation(**{**fields, **kw})})


def failed_gang(reason: str = "BackoffLimitExceeded", exit_code: int = 1, **kw: Any) -> Observed:
    return gang(
        failed_condition=True,
        failed=2,
        reason=reason,
        exit_code=exit_code,
        failed_pod="tiny-sft-1-x (node 1 of 2)",
        **kw,
    )


def test_a_failed_pod_restarts_the_whole_gang_until_the_backoff_limit_then_the_stage_fails() -> None:
    first = plan(gang_view(running_status(1)), failed_gang(), NOW)
    deletes = [a for a in first.actions if isinstance(a, DeleteJob)]
    assert deletes == [DeleteJob("tiny-sft", wait_for_pods=True)]  # foreground: its Pods gone first
    events = [a for a in first.actions if isinstance(a, PostEvent) and a.reason == "GangRestart"]
    assert len(events) == 1 and "tiny-sft-1-x (node 1 of 2)" in events[0].message
    assert "gang restart 1 of 1" in events[0].message
    sft = first.status.stages[0]
    assert (sft.attempts, sft.reason, first.status.phase) == (2, "GangRestart", "Running")

    # While the old Job's Pods stop: nothing more to do (a fixed point).
    deleting = plan(gang_view(first.status), failed_gang(deleting=True), NOW)
    assert [a for a in deleting.actions if not isinstance(a, PostEvent)] == []
    assert deleting.status.stages[0].attempts == 2

    # Gone: created again, with its rendezvous Service first.
    again = plan(gang_view(deleting.status), Observed({}), NOW)
    creates = [a for a in again.actions if isinstance(a, CreateJob)]
    assert len(creates) == 1 and creates[0].service is not None
    assert creates[0].job["spec"]["completions"] == 2

    # The restarted gang fails too: the limit (1) is spent, the stage fails with the failed Pod's reason.
    last = plan(gang_view(again.status), failed_gang(), NOW)
    assert not any(isinstance(a, DeleteJob) for a in last.actions)
    sft = last.status.stages[0]
    assert sft.phase == "Failed" and last.status.phase == "Failed"
    assert sft.message is not None and "tiny-sft-1-x (node 1 of 2) failed first" in sft.message
    assert "after 1 gang restart" in sft.message


def test_a_config_error_fails_the_gang_at_once() -> None:
    out = plan(gang_view(running_status(1), backoff_limit=3), failed_gang(reason="PodFailurePolicy", exit_code=2), NOW)
    assert not any(isinstance(a, DeleteJob) for a in out.actions)
    assert out.status.stages[0].phase == "Failed"
    failed = next(c for c in out.status.conditions if c.type == "Failed")
    assert failed.reason == "ConfigError"


def test_a_gangs_pods_are_one_attempt() -> None:
    out = plan(gang_view(running_status(1)), gang(active=2, start_time="2026-01-01T11:50:00Z"), NOW)
    assert out.status.stages[0].attempts == 1 and out.status.stages[0].phase == "Running"


def test_a_gang_on_a_read_write_once_workspace_is_warned_of_once() -> None:
    rwo = plan(gang_view(None), Observed({}), NOW)
    warnings = [a for a in rwo.actions if isinstance(a, PostEvent) and a.reason == "OneNodeVolume"]
    assert len(warnings) == 1 and "ReadWriteMany" in warnings[0].message
    # Not again while the Job is created (the stage already names its Job).
    again = plan(gang_view(rwo.status), Observed({}), NOW)
    assert not [a for a in again.actions if isinstance(a, PostEvent) and a.reason == "OneNodeVolume"]
    rwx = gang_view(None)
    rwx = RunView(rwx.name, rwx.namespace, rwx.uid, 1, rwx.spec.model_copy(update={"storage": RWX}), None)
    assert not [a for a in plan(rwx, Observed({}), NOW).actions if getattr(a, "reason", "") == "OneNodeVolume"]


# --- against the real API server ----------------------------------------------------------------------
@pytest.mark.controlplane
def test_the_operator_creates_the_rendezvous_service_before_the_job_owned_by_the_run(env: Env) -> None:
    """As the operator's own identity (deploy/rbac.yaml: services create, nothing more); no kubelet.
    Owned by the run (controller), the Service goes with it: the garbage collector's part, not waited
    for here (this control plane's collector takes ~40 s to get to it)."""
    manifest = tiny_run()
    manifest["spec"]["sft"]["resources"] = {"nodes": 2, "gpus": 0, "memory": "1Gi"}
    env.start_operator()
    env.apply(manifest)
    job = env.wait_for("the sft Job", lambda: env.get("job", "tiny-sft"), timeout=60)
    service = env.get("service", "tiny-sft-rdzv")
    assert service is not None  # created before the Job
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["backoffLimit"]) == ("Indexed", 2, 0)
    run_uid = env.run("tiny")["metadata"]["uid"]
    assert [(o["uid"], o["controller"]) for o in service["metadata"]["ownerReferences"]] == [(run_uid, True)]
    assert service["spec"]["selector"]["batch.kubernetes.io/job-completion-index"] == "0"
    assert service["spec"]["clusterIP"] and service["spec"]["publishNotReadyAddresses"] is True


def test_the_dev_job_controller_fails_a_gang_at_its_first_failed_pod_and_the_operator_restarts_it(env: Env) -> None:
    """`rlhfctl dev`'s Job controller with a gang (fake stages): node 1 fails at once, so the Job fails,
    node 0 is stopped instead of training on alone, and the operator restarts the whole gang until
    runtime.backoffLimit; the stage's failure names the Pod that failed first."""
    env.fake_behaviour({"sft": {"steps": 200, "stepSeconds": 0.25, "failIndex": 1}})
    manifest = tiny_run("gang")
    manifest["spec"]["sft"]["resources"] = {"nodes": 2, "gpus": 0, "memory": "1Gi"}
    manifest["spec"]["runtime"] = {"backoffLimit": 1}
    env.start_kubelet()
    env.start_operator()
    env.apply(manifest)
    run = env.wait_phase("gang", "Failed", timeout=120)
    sft = next(s for s in run["status"]["stages"] if s["name"] == "sft")
    assert sft["phase"] == "Failed" and sft["attempts"] == 2, sft
    assert "node 1 of 2" in sft["message"] and "lost its peers" in sft["message"], sft["message"]
    starts = env.starts("gang")  # "<stage> <resume step>" per Pod start: two Pods, twice
    # (The resume steps are not compared: the fake's node 0 writes a checkpoint every step, so a node 1
    # started a moment after it may already see one; the real stages' resume is tested in tests/stages.)
    assert len(starts) == 4 and starts[0] == "sft 0", starts
    # Node 0 was stopped long before its 50 s of training: no output, and its Pods are gone.
    assert not (env.run_dir("gang") / "sft" / "manifest.json").exists()
    assert not [p for p in env.items("pods", "rlhf-operator.io/stage=sft") if p["status"].get("phase") == "Running"]
