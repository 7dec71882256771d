"""Disruptions on a real node: the operator's Pod deleted mid-stage (the new one adopts the run),
the stage Pod deleted mid-PPO and a stage Pod evicted through the Eviction API (the stage resumes
from its last complete checkpoint), suspend and resume through the real Job controller, and a
running run deleted (real garbage collection removes every child and stops the container)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from .kube import NodeEnv, sft_only_run, tiny_run

pytestmark = [pytest.mark.node, pytest.mark.training, pytest.mark.timeout(1800)]


def short_run(name: str, claim: str, ppo_steps: int = 80) -> dict[str, Any]:
    """tiny.yaml with SFT and reward cut short (these tests are about what happens to a stage, not how
    well it learns) and PPO long enough to be disrupted several times, with a checkpoint every 5 steps.
    The disruptions come at step 10 and within seconds of a Pod (re)starting: at ~0.4 s a step on an
    idle 2-core node, the 70 steps after step 10 still leave about 28 s, and beside the rest of the
    suite a step takes ~2.5 s. Every step after the last disruption is only waited for: 200 steps
    made the two disruption tests last 580 s and 450 s in make test."""
    run = tiny_run(name, claim)
    spec = run["spec"]
    spec["sft"]["training"]["maxSteps"] = 40
    spec["reward"]["training"]["maxSteps"] = 40
    spec["ppo"].update(totalSteps=ppo_steps, saveFreq=5)
    spec["runtime"] = {"backoffLimit": 2}
    return run


def stage_of(run: dict[str, Any], name: str) -> dict[str, Any]:
    return next((s for s in run.get("status", {}).get("stages", []) if s["name"] == name), {})


def running_pod(env: NodeEnv, run: str, stage: str) -> dict[str, Any] | None:
    pods = env.items("pods", f"rlhf-operator.io/run={run},rlhf-operator.io/stage={stage}")
    live = [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    return live[0] if live else None


def ppo_step_at_least(env: NodeEnv, run: str, step: int) -> Any:
    def check(r: dict[str, Any]) -> bool:
        progress = stage_of(r, "ppo").get("progress") or {}
        return (progress.get("step") or 0) >= step and running_pod(env, run, "ppo") is not None

    return check


def evict(env: NodeEnv, pod: str) -> None:
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": env.namespace}}
    env.cluster.kubectl(
        "create", "--raw", f"/api/v1/namespaces/{env.namespace}/pods/{pod}/eviction", "-f", "-", input=json.dumps(body)
    )


def test_operator_restart_pod_deletion_and_eviction(env: NodeEnv, tiny_assets: Path) -> None:
    claim = env.workspace("ws", assets=tiny_assets)
    env.apply(short_run("disrupt", claim))

    # The operator's Pod deleted while SFT trains: the Deployment's new Pod takes the Lease over and
    # adopts the run (no second SFT Job, the run goes on).
    env.wait_for("sft running", lambda: running_pod(env, "disrupt", "sft"), 300)
    (old_operator,) = env.operator_pods()
    env.cluster.kubectl("-n", env.operator_namespace, "delete", "pod", old_operator["metadata"]["name"], "--wait=false")

    def new_operator_ready() -> bool:
        pods = [p for p in env.operator_pods() if p["metadata"]["name"] != old_operator["metadata"]["name"]]
        return any(
            c["type"] == "Ready" and c["status"] == "True" for p in pods for c in p["status"].get("conditions", [])
        )

    env.wait_for("a new operator Pod ready", new_operator_ready, 180)

    # The PPO stage's Pod deleted after a checkpoint (saveFreq 2): the Job controller starts another
    # Pod, which resumes.
    env.wait_run("disrupt", ppo_step_at_least(env, "disrupt", 10), "PPO past step 10", 900)
    first = running_pod(env, "disrupt", "ppo")
    assert first is not None
    env.kubectl("delete", "pod", first["metadata"]["name"], "--wait=false")

    # ... then that new Pod evicted through the Eviction API, as a drain or preemption would.
    def replacement() -> dict[str, Any] | None:
        pod = running_pod(env, "disrupt", "ppo")
        return pod if pod is not None and pod["metadata"]["name"] != first["metadata"]["name"] else None

    second = env.wait_for("a replacement PPO Pod", replacement, 300)
    env.wait_for(
        "the replacement resumed",
        lambda: "resuming ppo from checkpoint" in env.kubectl("logs", second["metadata"]["name"], check=False),
        300,
    )
    time.sleep(5)
    still = running_pod(env, "disrupt", "ppo")
    assert still is not None and still["metadata"]["name"] == second["metadata"]["name"], "PPO ended too soon"
    evict(env, second["metadata"]["name"])
    # The Eviction API marks the Pod as disrupted before deleting it: that is what the Job's
    # podFailurePolicy reads to not count it.
    evicted = env.get("pod", second["metadata"]["name"])
    conditions = {c["type"] for c in ((evicted or {}).get("status") or {}).get("conditions", [])}
    assert evicted is None or "DisruptionTarget" in conditions, evicted

    done = env.wait_phase("disrupt", "Succeeded", 1200)
    jobs = env.items("jobs", "rlhf-operator.io/run=disrupt")
    assert sorted(j["metadata"]["name"] for j in jobs) == [f"disrupt-{s}" for s in ("merge", "ppo", "reward", "sft")]
    ppo_job = next(j for j in jobs if j["metadata"]["name"] == "disrupt-ppo")
    # Three Pods ran PPO; the deleted one counts as a failure, the evicted one does not.
    created = env.kubectl(
        "get", "events", "--field-selector", "involvedObject.name=disrupt-ppo,reason=SuccessfulCreate", "-o", "name"
    )
    assert len(created.split()) == 3, f"{created}\n{env.describe()}"
    assert ppo_job["status"].get("failed", 0) == 1, ppo_job["status"]
    (last,) = env.items("pods", "rlhf-operator.io/run=disrupt,rlhf-operator.io/stage=ppo")  # the others are gone
    resumed = re.search(r"resuming ppo from checkpoint-(\d+)", env.kubectl("logs", last["metadata"]["name"]))
    assert resumed and int(resumed.group(1)) >= 10, "the last PPO Pod did not resume from a checkpoint"
    assert stage_of(done, "ppo")["phase"] == "Succeeded"
    sft_pods = env.items("pods", "rlhf-operator.io/run=disrupt,rlhf-operator.io/stage=sft")
    assert len(sft_pods) == 1, "the operator restart must not restart SFT"


def test_suspend_and_resume_through_the_job_controller(env: NodeEnv, tiny_assets: Path) -> None:
    # One stage is enough to suspend mid-way (SFT with a checkpoint every 20 steps): the Job
    # controller's part is the same for every stage, and PPO's own resume from a checkpoint on the
    # node is the test above. Three more stages would only be waited for (257 s in make test).
    claim = env.workspace("ws", assets=tiny_assets)
    env.apply(sft_only_run("pause", claim, steps=300))

    def sft_past_checkpoint(run: dict[str, Any]) -> bool:
        progress = stage_of(run, "sft").get("progress") or {}
        return (progress.get("step") or 0) >= 40 and running_pod(env, "pause", "sft") is not None

    env.wait_run("pause", sft_past_checkpoint, "SFT past its checkpoint at step 40", 300)
    env.kubectl("patch", "rlhfrun", "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    env.wait_phase("pause", "Suspended", 120)
    env.wait_for("no SFT Pod running", lambda: running_pod(env, "pause", "sft") is None, 120)
    job = env.get("job", "pause-sft")
    assert job is not None and job["spec"]["suspend"] is True
    assert stage_of(env.run("pause"), "sft")["phase"] == "Suspended"
    env.kubectl("patch", "rlhfrun", "pause", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    done = env.wait_phase("pause", "Succeeded", 900)
    assert stage_of(done, "sft")["phase"] == "Succeeded"
    pods = env.items("pods", "rlhf-operator.io/run=pause,rlhf-operator.io/stage=sft")
    logs = env.kubectl("logs", sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])[-1]["metadata"]["name"])
    resumed = re.search(r"resuming sft from checkpoint-(\d+)", logs)
    assert resumed and int(resumed.group(1)) >= 40, "the resumed stage did not start from its checkpoint"


def test_deleting_a_running_run_removes_its_children(env: NodeEnv, tiny_assets: Path) -> None:
    claim = env.workspace("ws", assets=tiny_assets)
    env.apply(short_run("gone", claim))
    pod = env.wait_for("sft running", lambda: running_pod(env, "gone", "sft"), 300)
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://")[-1]
    env.kubectl("delete", "rlhfrun", "gone", "--wait=false")

    def children_gone() -> bool:
        left = env.kubectl("get", "jobs,configmaps,pods", "-l", "rlhf-operator.io/run=gone", "-o", "name")
        return not left.strip()

    env.wait_for("every child of the deleted run gone", children_gone, 120)
    env.wait_for(
        "the stage's container stopped",
        lambda: container_id not in env.cluster.ctr("tasks", "ls", "-q", check=False),
        60,
    )
    # The claim was the user's (existingClaim): it stays.
    assert env.get("pvc", claim) is not None
