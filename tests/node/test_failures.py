"""What a real node does to a run that cannot run, each with a bounded time to a true status:
an image that does not exist, a Secret that does not exist, and a config error (exit 2) that the
Job's podFailurePolicy must not retry, with one process and with two in the Pod."""

from __future__ import annotations

from pathlib import Path

import pytest

from .kube import NodeEnv, tiny_run

pytestmark = [pytest.mark.node]


def stage_status(run: dict, name: str) -> dict:
    return next((s for s in run.get("status", {}).get("stages", []) if s["name"] == name), {})


def pending_with(reasons: tuple[str, ...]):
    def check(run: dict) -> bool:
        sft = stage_status(run, "sft")
        return sft.get("phase") == "Pending" and any(r in (sft.get("message") or "") for r in reasons)

    return check


def test_missing_image_shows_pending_with_the_pull_error(env: NodeEnv) -> None:
    claim = env.workspace("ws")
    run = tiny_run("noimage", claim)
    run["spec"]["runtime"] = {"image": "localhost/rlhf-stages:does-not-exist", "imagePullPolicy": "IfNotPresent"}
    env.apply(run)
    status = env.wait_run("noimage", pending_with(("ErrImagePull", "ImagePullBackOff")), "sft Pending on the pull", 90)
    assert status["status"]["phase"] != "Running", status["status"]
    # The operator posts events from a queue of their own, moments after the status it wrote.
    env.wait_for(
        "the StagePending event",
        lambda: "StagePending" in env.kubectl("get", "events", "--field-selector", "involvedObject.kind=RLHFRun"),
        30,
    )


def test_missing_secret_shows_pending_with_the_config_error(env: NodeEnv) -> None:
    claim = env.workspace("ws")
    run = tiny_run("nosecret", claim)
    run["spec"]["secrets"] = {"hfToken": {"name": "no-such-secret", "key": "token"}}
    env.apply(run)
    status = env.wait_run("nosecret", pending_with(("CreateContainerConfigError",)), "sft Pending on the Secret", 90)
    assert "no-such-secret" in stage_status(status, "sft")["message"]


@pytest.mark.training
@pytest.mark.parametrize("gpus", [0, 2], ids=["1-process", "2-processes"])
def test_config_error_fails_at_once_without_retry(env: NodeEnv, tiny_assets: Path, gpus: int) -> None:
    claim = env.workspace("ws", assets=tiny_assets)
    run = tiny_run("badcolumns", claim)
    sft = run["spec"]["sft"]
    sft["dataset"]["columns"] = {"prompt": "no_such_column"}
    sft["resources"] = {"gpus": gpus, "memory": "4Gi"}  # gpus 2: two processes in the Pod, on the CPU
    run["spec"]["runtime"] = {"backoffLimit": 3}
    env.apply(run)
    failed = env.wait_phase("badcolumns", "Failed", 300)
    sft_status = stage_status(failed, "sft")
    assert sft_status["phase"] == "Failed"
    assert "no_such_column" in sft_status["message"], sft_status
    pods = env.items("pods", "rlhf-operator.io/run=badcolumns,rlhf-operator.io/stage=sft")
    assert len(pods) == 1, "a config error must not be retried"
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2, terminated
    job = env.get("job", "badcolumns-sft")
    assert job is not None
    reasons = {c["type"]: c.get("reason") for c in job["status"]["conditions"]}
    assert reasons.get("Failed") == "PodFailurePolicy", reasons
