"""Kueue on the real node (runtime.queueName): Kueue (tests/kueue, built from its Go module) admits the
stage Jobs, suspend and resume of a queued and of a running run do not fight Kueue (the Pod is not
restarted over and over), and Kueue's preemption by a higher-priority workload stops the stage, which
resumes from its checkpoint once re-admitted.

The runs train SFT only (the other stages disabled), 300 steps with a checkpoint every 20: long enough
to be suspended and preempted mid-stage (at step 40 or later; 260 steps are ~26 s on an idle 2-core node,
more beside the rest of the suite, while a suspend or a preemption takes effect within ~10 s), short
enough to keep the tier's added time small: every step after the last disruption is only waited for."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kueue.manager import Kueue

from .kube import NodeEnv, sft_only_run
from .queues import HIGH, QUEUE, apply_cluster_queue, apply_local_queue, delete_cluster_queue

pytestmark = [pytest.mark.node, pytest.mark.training, pytest.mark.timeout(1500)]

STAGE_MEMORY = "4Gi"  # tiny.yaml's SFT request: the ClusterQueue holds exactly one stage Pod


def sft_run(name: str, claim: str, steps: int = 300) -> dict[str, Any]:
    run = sft_only_run(name, claim, steps, queueName=QUEUE)
    assert run["spec"]["sft"]["resources"]["memory"] == STAGE_MEMORY
    return run


@pytest.fixture
def cluster_queue(env: NodeEnv, kueue: Kueue) -> Iterator[str]:
    """A ClusterQueue for this test's namespace with quota for one stage Pod; the LocalQueue pointing
    at it is the test's to create."""
    yield apply_cluster_queue(env, STAGE_MEMORY)
    env.delete_runs()
    delete_cluster_queue(env)


def stage(run: dict[str, Any], name: str = "sft") -> dict[str, Any]:
    return next((s for s in run.get("status", {}).get("stages", []) if s["name"] == name), {})


def live_pods(env: NodeEnv, run: str) -> list[dict[str, Any]]:
    pods = env.items("pods", f"rlhf-operator.io/run={run},rlhf-operator.io/stage=sft")
    return [p for p in pods if p["status"].get("phase") in ("Pending", "Running")]


def pods_created(env: NodeEnv, job: str) -> int:
    """Pods the Job controller created for this Job name (its events outlive the Pods and the Job)."""
    out = env.kubectl(
        "get", "events", "--field-selector", f"involvedObject.name={job},reason=SuccessfulCreate", "-o", "name"
    )
    return len(out.split())


def step_at_least(step: int) -> Any:
    def check(run: dict[str, Any]) -> bool:
        st = stage(run)
        return st.get("phase") == "Running" and ((st.get("progress") or {}).get("step") or 0) >= step

    return check


def queued(run: dict[str, Any]) -> bool:
    st = stage(run)
    return st.get("phase") == "Pending" and st.get("reason") == "Queued"


def suspend(env: NodeEnv, run: str, value: bool) -> None:
    env.kubectl("patch", "rlhfrun", run, "--type=merge", "-p", json.dumps({"spec": {"suspend": value}}))


def last_log(env: NodeEnv, run: str) -> str:
    pods = env.items("pods", f"rlhf-operator.io/run={run},rlhf-operator.io/stage=sft")
    newest = max(pods, key=lambda p: p["metadata"]["creationTimestamp"])
    return env.kubectl("logs", newest["metadata"]["name"])


def test_queued_admitted_running_and_suspend_resume_queued_and_running(
    env: NodeEnv, cluster_queue: str, tiny_assets: Path
) -> None:
    claim = env.workspace("ws", assets=tiny_assets)
    env.apply(sft_run("q", claim))

    # No LocalQueue yet: Kueue cannot admit the Job. The stage is Pending (Queued), nothing runs.
    run = env.wait_run("q", queued, "stage sft Queued", 120)
    assert run["status"]["phase"] == "Pending"
    assert f"LocalQueue {QUEUE}" in stage(run)["message"]
    time.sleep(5)
    job = env.get("job", "q-sft")
    assert job is not None and job["spec"]["suspend"] is True and not live_pods(env, "q")

    # Suspend and resume while queued: the Job is deleted, then created again, and queues again.
    suspend(env, "q", True)
    env.wait_phase("q", "Suspended", 60)
    env.wait_for("the queued Job deleted", lambda: env.get("job", "q-sft") is None, 60)
    assert stage(env.run("q"))["phase"] == "Suspended"
    suspend(env, "q", False)
    env.wait_run("q", queued, "queued again after resume", 60)
    assert pods_created(env, "q-sft") == 0

    # The LocalQueue appears: Kueue admits the Job, unsuspends it, and the stage runs.
    apply_local_queue(env, cluster_queue)
    env.wait_run("q", step_at_least(40), "admitted, running, past the checkpoint at step 40", 300)
    assert pods_created(env, "q-sft") == 1

    # Suspend while running: the Pod stops and stays stopped (Kueue does not start it again).
    suspend(env, "q", True)
    env.wait_phase("q", "Suspended", 60)
    env.wait_for("the stage's Pod gone", lambda: not live_pods(env, "q"), 120)
    env.wait_for("the Job deleted", lambda: env.get("job", "q-sft") is None, 60)
    time.sleep(20)  # what Kueue would do, it would do now
    assert not live_pods(env, "q") and env.get("job", "q-sft") is None
    assert pods_created(env, "q-sft") == 1, "a suspended run's Pod was started again"
    assert stage(env.run("q"))["phase"] == "Suspended"

    # Resume: a new Job queues, is admitted, and its Pod resumes from the checkpoint.
    suspend(env, "q", False)
    done = env.wait_phase("q", "Succeeded", 600)
    assert pods_created(env, "q-sft") == 2, "one Pod before the suspend, one after"
    resumed = re.search(r"resuming sft from checkpoint-(\d+)", last_log(env, "q"))
    assert resumed and int(resumed.group(1)) >= 40, "the resumed stage did not start from its checkpoint"
    assert stage(done)["phase"] == "Succeeded"


def test_preemption_by_a_higher_priority_workload_resumes_from_the_checkpoint(
    env: NodeEnv, cluster_queue: str, tiny_assets: Path
) -> None:
    claim = env.workspace("ws", assets=tiny_assets)
    apply_local_queue(env, cluster_queue)
    env.apply(sft_run("low", claim))
    env.wait_run("low", step_at_least(40), "SFT past the checkpoint at step 40", 300)

    # A higher-priority Job for the same quota (created suspended, as Kueue's webhook would make it).
    urgent = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "urgent",
            "labels": {"kueue.x-k8s.io/queue-name": QUEUE, "kueue.x-k8s.io/priority-class": HIGH},
        },
        "spec": {
            "suspend": True,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "urgent",
                            "image": env.cluster.images["stages"],
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["python", "-c", "import time; time.sleep(15)"],
                            "resources": {"requests": {"memory": STAGE_MEMORY}, "limits": {"memory": STAGE_MEMORY}},
                        }
                    ],
                }
            },
        },
    }
    env.apply(urgent)

    # Kueue preempts the run's Job: suspended by Kueue, the Pod stopped, the stage queued, not failed.
    preempted = env.wait_run("low", queued, "the stage queued again (preempted)", 120)
    assert preempted["status"]["phase"] != "Failed"
    assert "resumes from its last checkpoint" in stage(preempted)["message"]
    env.wait_for("the preempted Pod gone", lambda: not live_pods(env, "low"), 120)

    def urgent_done() -> bool:
        job = env.get("job", "urgent") or {}
        return any(
            c["type"] == "Complete" and c["status"] == "True" for c in job.get("status", {}).get("conditions", [])
        )

    env.wait_for("the urgent Job complete", urgent_done, 300)

    # Re-admitted: the stage resumes from its checkpoint and finishes.
    done = env.wait_phase("low", "Succeeded", 600)
    assert pods_created(env, "low-sft") == 2, "one Pod before the preemption, one after"
    resumed = re.search(r"resuming sft from checkpoint-(\d+)", last_log(env, "low"))
    assert resumed and int(resumed.group(1)) >= 40, "the re-admitted stage did not start from its checkpoint"
    sft_job = env.get("job", "low-sft")
    assert sft_job is not None and sft_job["status"].get("failed", 0) == 0, sft_job and sft_job["status"]
    assert stage(done)["phase"] == "Succeeded"
