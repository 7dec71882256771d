"""observe.pod_waiting: why a live stage Pod has not started, from the Pod as the kubelet and the
scheduler report it (shapes taken from the real node tier's Pods)."""

from __future__ import annotations

from typing import Any

from rlhf_operator.observe import observe_job, pod_waiting

CREATED = "2026-01-01T11:00:00Z"


def pod(phase: str = "Pending", node: str | None = "rlhf-node", **status: Any) -> dict[str, Any]:
    spec = {"nodeName": node} if node else {}
    return {
        "metadata": {"name": "p", "creationTimestamp": CREATED, "labels": {"batch.kubernetes.io/controller-uid": "u"}},
        "spec": spec,
        "status": {"phase": phase, **status},
    }


def waiting_container(reason: str, message: str = "") -> dict[str, Any]:
    return {"containerStatuses": [{"name": "stage", "state": {"waiting": {"reason": reason, "message": message}}}]}


def test_image_pull_error() -> None:
    w = pod_waiting(pod(**waiting_container("ErrImagePull", 'failed to pull "x:1": not found')))
    assert w is not None and (w.reason, w.since) == ("ErrImagePull", CREATED) and "not found" in w.message


def test_missing_secret() -> None:
    w = pod_waiting(pod(**waiting_container("CreateContainerConfigError", 'secret "hf" not found')))
    assert w is not None and w.reason == "CreateContainerConfigError"


def test_unschedulable() -> None:
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}
    w = pod_waiting(pod(node=None, conditions=[condition]))
    assert w is not None and (w.reason, w.message) == ("Unschedulable", "0/1 nodes")


def test_not_yet_scheduled_and_creating() -> None:
    assert pod_waiting(pod(node=None)).reason == "Scheduling"  # type: ignore[union-attr]
    assert pod_waiting(pod()).reason == "ContainerCreating"  # type: ignore[union-attr]


def test_running_and_finished_pods_are_not_waiting() -> None:
    assert pod_waiting(pod("Running")) is None
    assert pod_waiting(pod("Failed")) is None


def test_the_job_reports_its_newest_pod() -> None:
    job = {"metadata": {"name": "j", "uid": "u", "labels": {}}, "status": {"active": 1}}
    obs = observe_job(job, [pod(**waiting_container("ImagePullBackOff"))])
    assert obs.waiting is not None and obs.waiting.reason == "ImagePullBackOff"
