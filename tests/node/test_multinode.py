"""A stage on two Pods (``resources.nodes: 2``) on the real node: an Indexed Job and its rendezvous
Service, torchrun across the two Pods over the real Pod network (gloo, 1 process per Pod), Kueue
admitting the two Pods as one Workload or not at all, and one Pod killed restarting the whole gang
from its checkpoint.

The run's SFT trains 160 steps with a checkpoint every 20: long enough to kill a Pod past the first
checkpoint, short enough to keep the tier's added time small. Then the reward model and PPO train on
two Pods each too, briefly (10 and 4 steps): every multi-node stage kind with a loop of its own
(Trainer-based, and PPO's) rendezvouses over the Pod network and reports once. That two-Pod runs
reach the losses of a one-process run with the same global batch is shown by tests/stages (two
launchers on one machine, no Pod network), which is cheaper than second runs here."""

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
from .queues import QUEUE, apply_cluster_queue, apply_local_queue, delete_cluster_queue

pytestmark = [pytest.mark.node, pytest.mark.training, pytest.mark.timeout(1800)]

STAGE_MEMORY_MI = 4096  # tiny.yaml's SFT request, per Pod
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


@pytest.fixture
def one_pod_of_quota(env: NodeEnv, kueue: Kueue) -> Iterator[str]:
    """A ClusterQueue with quota for one stage Pod only, and the LocalQueue in the test's namespace."""
    name = apply_cluster_queue(env, f"{STAGE_MEMORY_MI}Mi")
    apply_local_queue(env, name)
    yield name
    env.delete_runs()
    delete_cluster_queue(env)


def stage(run: dict[str, Any]) -> dict[str, Any]:
    return next((s for s in run.get("status", {}).get("stages", []) if s["name"] == "sft"), {})


def gang_pods(env: NodeEnv, run: str) -> list[dict[str, Any]]:
    return env.items("pods", f"rlhf-operator.io/run={run},rlhf-operator.io/stage=sft")


def running_by_index(env: NodeEnv, run: str) -> dict[str, dict[str, Any]]:
    pods = [p for p in gang_pods(env, run) if p["status"].get("phase") == "Running"]
    return {p["metadata"]["labels"].get(INDEX_LABEL, "?"): p for p in pods}


def step_at_least(step: int) -> Any:
    def check(run: dict[str, Any]) -> bool:
        st = stage(run)
        return st.get("phase") == "Running" and ((st.get("progress") or {}).get("step") or 0) >= step

    return check


def test_two_pods_train_as_one_gang_admitted_together_and_restarted_together(
    env: NodeEnv, one_pod_of_quota: str, tiny_assets: Path
) -> None:
    claim = env.workspace("ws", assets=tiny_assets)
    run = sft_only_run("mn", claim, 160, queueName=QUEUE, backoffLimit=2)
    spec = run["spec"]
    for name in ("sft", "reward", "ppo"):
        assert spec[name]["resources"]["memory"] == f"{STAGE_MEMORY_MI // 1024}Gi"
        spec[name]["resources"]["nodes"] = 2
    spec["reward"]["enabled"] = True
    spec["reward"]["training"].update(maxSteps=10, saveSteps=10)
    spec["ppo"].update(enabled=True, totalSteps=4, saveFreq=2)
    env.apply(run)

    # An Indexed Job for two Pods and the Service that finds index 0.
    job = env.wait_for("the stage's Job", lambda: env.get("job", "mn-sft"), 60)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    service = env.get("service", "mn-sft-rdzv")
    assert service is not None and service["spec"]["selector"].get(INDEX_LABEL) == "0", service

    # All or nothing: the quota holds one Pod and the gang needs two, so Kueue admits neither.
    env.wait_run("mn", lambda r: stage(r).get("reason") == "Queued", "stage sft Queued", 120)
    workloads = json.loads(env.kubectl("get", "workloads.kueue.x-k8s.io", "-o", "json"))["items"]
    assert [[ps["count"] for ps in w["spec"]["podSets"]] for w in workloads] == [[2]], "one Workload of two Pods"
    time.sleep(10)
    assert not gang_pods(env, "mn"), "a Pod of the gang started without the quota for the whole gang"

    # Quota for two: admitted as one, both Pods start and train together over the Pod network.
    apply_cluster_queue(env, f"{2 * STAGE_MEMORY_MI}Mi")
    env.wait_run("mn", step_at_least(40), "both Pods training, past the checkpoint at step 40", 400)
    pods = running_by_index(env, "mn")
    assert sorted(pods) == ["0", "1"], sorted(pods)
    assert pods["0"]["status"]["podIP"] != pods["1"]["status"]["podIP"]
    follower_log = env.kubectl("logs", pods["1"]["metadata"]["name"])
    assert service["spec"]["clusterIP"] in follower_log, "node 1 did not reach node 0 through the Service"
    first = {p["metadata"]["name"] for p in pods.values()}

    # Kill one Pod of the gang: the whole gang starts again, from the checkpoint.
    env.kubectl("delete", "pod", pods["1"]["metadata"]["name"], "--grace-period=5", "--wait=false")
    done = env.wait_phase("mn", "Succeeded", 1200)
    assert stage(done)["attempts"] >= 2, stage(done)
    last = [p for p in gang_pods(env, "mn") if p["metadata"]["name"] not in first]
    assert sorted(p["metadata"]["labels"].get(INDEX_LABEL) for p in last) == ["0", "1"], "not the whole gang again"
    leader = next(p for p in last if p["metadata"]["labels"].get(INDEX_LABEL) == "0")
    resumed = re.search(r"resuming sft from checkpoint-(\d+)", env.kubectl("logs", leader["metadata"]["name"]))
    assert resumed and int(resumed.group(1)) >= 40, "the restarted gang did not start from its checkpoint"

    # The reward model and PPO trained as gangs of two too: both indexes ran to completion, and the
    # stage's result (node 0's termination message) reached status once.
    for name in ("reward", "ppo"):
        done_stage = next(s for s in done["status"]["stages"] if s["name"] == name)
        assert done_stage["phase"] == "Succeeded" and done_stage["metrics"], done_stage
        pods = env.items("pods", f"rlhf-operator.io/run=mn,rlhf-operator.io/stage={name}")
        assert sorted(p["metadata"]["labels"].get(INDEX_LABEL) for p in pods) == ["0", "1"], name
        assert all(p["status"].get("phase") == "Succeeded" for p in pods), [p["status"].get("phase") for p in pods]
