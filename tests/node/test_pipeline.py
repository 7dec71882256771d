"""examples/tiny.yaml on a real node, the way a platform team runs it: the chart installed with Helm
(the operator is a Pod under the chart's ServiceAccount and RBAC, electing a leader), the tiny
assets put on the workspace volume by a Job in the stage image, the run applied with kubectl, and
every stage a Job that the real Job controller, scheduler and kubelet run in a container.
"""

from __future__ import annotations

import json
import time

import pytest

from rlhf_operator.dev.cluster import NODE_NAME

from .kube import NodeEnv, tiny_run

# Four trainings in containers on the node's 2 cores.
pytestmark = [pytest.mark.node, pytest.mark.training, pytest.mark.timeout(1800)]


def test_tiny_example_runs_on_the_node(env: NodeEnv) -> None:
    claim = env.workspace("tiny-workspace")
    env.tiny_assets(claim)
    env.apply(tiny_run("tiny", claim))

    # Watch the run like a person with `kubectl get rlhfrun -w`: the PPO stage must show progress
    # that moves while it trains, not only at the end.
    seen: list[str] = []
    deadline = time.monotonic() + 1500
    while True:
        run = env.run("tiny")
        phase = run.get("status", {}).get("phase")
        row = env.kubectl("get", "rlhfrun", "tiny", "--no-headers")
        if not seen or seen[-1] != row:
            seen.append(row)
        if phase in ("Succeeded", "Failed") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert phase == "Succeeded", f"{phase}\n{json.dumps(run.get('status'), indent=1)}\n{env.describe()}"
    ppo_rows = [r for r in seen if " ppo " in r and "%" in r]
    percents = {int(r.split("%")[0].split()[-1]) for r in ppo_rows}
    assert any(0 < p < 100 for p in percents), f"no live PPO progress among {seen}"
    assert len(percents) >= 2, f"PPO progress never moved: {seen}"

    status = run["status"]
    assert status["progress"] == "4/4"
    assert [s["name"] for s in status["stages"]] == ["sft", "reward", "ppo", "merge"]
    for stage in status["stages"]:
        assert stage["phase"] == "Succeeded" and stage["metrics"], stage
    reward_metrics = next(s for s in status["stages"] if s["name"] == "reward")["metrics"]
    # Learning, as the status reports it: the reward model ranks held-out pairs (tiny.yaml measured
    # 0.93-0.96 on the host), and PPO's reward rose above the SFT policy's.
    assert reward_metrics.get("eval_accuracy", 0) >= 0.85, reward_metrics
    assert status["reward"] is not None

    # Each stage ran as a Job's Pod that the scheduler placed on the node, in the stage image, and
    # the kubelet captured the stage's StageResult as the container's termination message.
    for stage in ("sft", "reward", "ppo", "merge"):
        pods = env.items("pods", f"rlhf-operator.io/run=tiny,rlhf-operator.io/stage={stage}")
        assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
        pod = pods[0]
        assert pod["spec"]["nodeName"] == NODE_NAME
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "Job"
        state = pod["status"]["containerStatuses"][0]
        assert state["image"].endswith(env.cluster.images["stages"].rsplit("/", 1)[-1]), state["image"]
        message = json.loads(state["state"]["terminated"]["message"])
        assert message["succeeded"] is True and message["stage"] == stage, message

    # The merged model is on the claim: read it back through another Pod of the stage image. That
    # Pod also says whether the image carries compiled modules: its root filesystem is read-only, so
    # without them every stage start compiles the training stack again (+10 s of CPU).
    model = status["outputModel"]
    load = f"import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('/workspace/{model}')"
    compiled = (
        "import importlib.util as u, os, torch, peft, rlhf_stages; "
        "print('compiled', [os.path.exists(u.cache_from_source(x.__file__)) for x in (t, torch, peft, rlhf_stages)])"
    )
    env.tool_job("read-model", claim, ["python", "-c", f"{load}; print('params', m.num_parameters()); {compiled}"])
    logs = env.kubectl("logs", "job/read-model")
    assert "params" in logs and "compiled [True, True, True, True]" in logs, logs

    # The operator ran as the chart's Pod and held the leader Lease.
    (operator_pod,) = env.operator_pods()
    lease = json.loads(env.cluster.kubectl("-n", env.operator_namespace, "get", "lease", "-o", "json"))["items"]
    holders = {item["spec"].get("holderIdentity") for item in lease}
    assert operator_pod["metadata"]["name"] in holders, holders
