"""The operator against the real API server, with the local kubelet and fast fake stages.

Each test owns a namespace, a local volume, a local kubelet and its operator(s), all real processes.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from .harness import Env, http_get, tiny_run

pytestmark = pytest.mark.controlplane


def test_pipeline_succeeds_and_reapply_changes_nothing(env: Env) -> None:
    env.start_kubelet()
    operator, port = env.start_operator()
    manifest = tiny_run()
    env.apply(manifest)
    run = env.wait_phase("tiny", "Succeeded", timeout=90)
    status = run["status"]
    assert [s["phase"] for s in status["stages"]] == ["Succeeded"] * 4
    assert status["outputModel"] == f"runs/{env.namespace}/tiny/merge/model"
    assert (env.volume / status["outputModel"] / "weights.txt").exists()
    assert status["reward"] == 0.75 and status["progress"] == "4/4"
    assert env.stage(run, "ppo")["metrics"]["reward_mean"] == 0.75
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions == {
        "Running": ("False", "RunFinished"),
        "Suspended": ("False", "NotSuspended"),
        "Succeeded": ("True", "PipelineCompleted"),
        "Failed": ("False", "NoFailure"),
    }
    assert env.starts("tiny") == ["sft 0", "reward 0", "ppo 0", "merge 0"]
    events = env.wait_events("tiny", "StageSucceeded", "StageSucceeded", "StageSucceeded", "RunSucceeded")
    # Fast stages may skip Running (no StageStarted); the last stage's success is told by RunSucceeded.
    assert events.count("StageSucceeded") == 3 and events.count("RunSucceeded") == 1

    # GitOps: re-applying the same manifest changes nothing, not even the resourceVersion.
    version = run["metadata"]["resourceVersion"]
    env.apply(manifest)
    time.sleep(5)  # two resync periods
    assert env.run("tiny")["metadata"]["resourceVersion"] == version
    assert sorted(j["metadata"]["name"] for j in env.items("jobs")) == [
        "tiny-merge",
        "tiny-ppo",
        "tiny-reward",
        "tiny-sft",
    ]

    # Prometheus metrics and probes.
    code, text = http_get(port, "/metrics")
    assert code == 200
    assert 'rlhf_runs{phase="Succeeded"} 1.0' in text
    assert 'rlhf_stage_duration_seconds_count{result="Succeeded",stage="ppo"} 1.0' in text
    assert "rlhf_reconcile_errors_total" in text and "rlhf_reconcile_total" in text
    assert http_get(port, "/healthz")[0] == 200
    assert http_get(port, "/readyz")[0] == 200

    # Passes read the watch caches: the operator's own requests are writes (and log reads) only,
    # never a GET or LIST of a run, a Job, a Pod or a PVC, however many passes ran.
    requests = api_requests(text)
    assert {r for r in requests if r.startswith("GET") and r != "GET pods/log"} == set(), requests
    assert "GET rlhfruns" not in requests and "GET jobs" not in requests
    # Per stage transition: its Job (which carries the stage's config: no ConfigMap), one status
    # write and at most one event; the status is written again only when what it reports changes
    # (the Pod running, progress, finished: at most 6 per stage here), and never from a stale
    # cached version (a Conflict): a pass that follows our own write reads what the write returned.
    assert requests["POST jobs"] == 4 and not [r for r in requests if "configmaps" in r], requests
    assert requests["POST events"] <= 2 * 4, requests  # a stage started and ended (the last: the run's end)
    assert requests["PUT rlhfruns/status"] <= 6 * 4 + 1, requests
    assert 'rlhf_reconcile_errors_total{error="Conflict"}' not in text

    # A restart adopts the finished run from its caches: no request at all, so no status rewrite.
    operator.stop()
    _, port = env.start_operator()
    # The harness's default wait: this checks what a restart writes, not how fast it starts (on a CI
    # machine busy building images the new process spent 27 s importing, and the wait used to be 30 s).
    env.wait_for("the restarted operator to be ready", lambda: http_get(port, "/readyz")[0] == 200)
    time.sleep(5)  # two resync periods
    assert env.run("tiny")["metadata"]["resourceVersion"] == version
    text = http_get(port, "/metrics")[1]
    assert api_requests(text) == {}
    assert 'rlhf_runs{phase="Succeeded"} 1.0' in text  # counted from the cache, though not reconciled


def api_requests(exposition: str) -> dict[str, float]:
    """rlhf_api_requests_total by request ("PUT rlhfruns/status"), from the /metrics text."""
    prefix = 'rlhf_api_requests_total{request="'
    out = {}
    for row in exposition.splitlines():
        if row.startswith(prefix):
            name, _, value = row[len(prefix) :].partition('"} ')
            out[name] = float(value)
    return out


def test_failing_stage_exhausts_retries_then_retry_resumes(env: Env) -> None:
    env.fake_behaviour({"reward": {"fail": "retryable"}})
    env.start_kubelet()
    env.start_operator()
    env.apply(tiny_run())  # runtime.backoffLimit: 1 -> two attempts
    run = env.wait_phase("tiny", "Failed", timeout=90)
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    assert "stage reward" in failed["message"] and "corrupt" in failed["message"]
    assert run["status"]["currentStage"] == "reward"
    assert env.stage(run, "reward")["phase"] == "Failed" and env.stage(run, "reward")["attempts"] == 2
    assert env.starts("tiny") == ["sft 0", "reward 0", "reward 0"]
    assert "RunFailed" in env.wait_events("tiny", "RunFailed")
    time.sleep(3)  # a failed run stays failed: nothing is retried on its own
    assert env.starts("tiny") == ["sft 0", "reward 0", "reward 0"]

    # Retry from the failed stage once the cause is fixed.
    env.fake_behaviour({})
    env.kubectl("annotate", "rlhfrun", "tiny", "rlhf-operator.io/retry=1")
    # The run is still Failed until the operator acts on the annotation; only then can it succeed.
    env.wait_for("retry taken up", lambda: (env.run("tiny").get("status") or {}).get("retryToken") == "1", 60)
    run = env.wait_phase("tiny", "Succeeded", timeout=90)
    assert env.starts("tiny") == ["sft 0", "reward 0", "reward 0", "reward 0", "ppo 0", "merge 0"]
    assert run["status"]["retryToken"] == "1"
    assert "RetryRequested" in env.wait_events("tiny", "RetryRequested")


def test_config_error_fails_fast(env: Env) -> None:
    env.fake_behaviour({"sft": {"fail": "config"}})
    env.start_kubelet()
    env.start_operator()
    env.apply(tiny_run(runtime={"backoffLimit": 3}))
    run = env.wait_phase("tiny", "Failed", timeout=60)
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ConfigError", failed
    assert env.starts("tiny") == ["sft 0"]  # podFailurePolicy: exit 2 is never retried


def _ppo_step(env: Env) -> int:
    stage = env.stage(env.run("tiny"), "ppo")
    return int((stage.get("progress") or {}).get("step") or 0)


def test_suspend_and_resume_mid_stage(env: Env) -> None:
    env.fake_behaviour({"ppo": {"steps": 40, "stepSeconds": 0.25}})
    env.start_kubelet()
    env.start_operator()
    env.apply(tiny_run())
    env.wait_for("ppo progress", lambda: _ppo_step(env) >= 3, timeout=90)
    env.kubectl("patch", "rlhfrun", "tiny", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    run = env.wait_phase("tiny", "Suspended", timeout=30)
    assert env.stage(run, "ppo")["phase"] == "Suspended"
    assert env.get("job", "tiny-ppo")["spec"]["suspend"] is True
    env.wait_for(
        "the Job to be suspended",
        lambda: any(
            c["type"] == "Suspended" and c["status"] == "True"
            for c in (env.get("job", "tiny-ppo").get("status") or {}).get("conditions") or []
        ),
    )
    assert not env.items("pods", "job-name=tiny-ppo")  # the active pod is deleted on suspension
    time.sleep(2)
    assert env.get("job", "tiny-merge") is None  # progression stopped
    env.kubectl("patch", "rlhfrun", "tiny", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    run = env.wait_phase("tiny", "Succeeded", timeout=90)
    ppo_starts = [s for s in env.starts("tiny") if s.startswith("ppo")]
    assert len(ppo_starts) == 2 and ppo_starts[0] == "ppo 0" and int(ppo_starts[1].split()[1]) >= 3
    assert env.stage(run, "ppo")["attempts"] == 1  # a suspension is not an attempt (as for the Job)
    events = env.wait_events("tiny", "StageSuspended", "StageResumed")
    assert "StageSuspended" in events and "StageResumed" in events, " ".join(
        events
    )  # they tell the suspend and the resume


def test_deletion_mid_run_cleans_up(env: Env) -> None:
    env.fake_behaviour({"ppo": {"steps": 100, "stepSeconds": 0.2}})
    env.start_kubelet()
    env.start_operator()
    env.apply(tiny_run())
    env.wait_for("ppo progress", lambda: _ppo_step(env) >= 2, timeout=90)
    assert env.get("pvc", "tiny-workspace") is not None and env.get("job", "tiny-ppo") is not None
    env.kubectl("delete", "rlhfrun", "tiny", "--wait=true", "--timeout=30s")
    # The garbage collector deletes what the run owns; the local kubelet then stops the process.
    env.wait_for(
        "children to be collected",
        lambda: not any(env.items(kind, "rlhf-operator.io/run=tiny") for kind in ("jobs", "pvc", "pods")),
        timeout=90,
    )
    # On SIGTERM the stage writes its progress one last time; after that the step must stay put
    # (a process still training at 0.2 s a step would never hold still for 2 s).
    progress = env.run_dir("tiny") / "ppo.progress.json"

    def stopped() -> bool:
        step = json.loads(progress.read_text())["step"]
        time.sleep(2)
        return bool(json.loads(progress.read_text())["step"] == step)

    env.wait_for("the stage process to stop", stopped, timeout=30)


INVALID = [
    ("no sections for PPO", {"ppo": None}, "needs sections"),
    ("online W&B without key", {"wandb": {"project": "p"}}, "wandbApiKey"),
    ("negative GPUs", {"merge": {"resources": {"gpus": -1}}}, "gpus"),
    ("unknown field", {"bogus": 1}, "bogus"),
]


@pytest.mark.parametrize(("case", "change", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_specs_are_refused(env: Env, case: str, change: dict, message: str) -> None:
    manifest = tiny_run(name="bad")
    for key, value in change.items():
        if value is None:
            manifest["spec"].pop(key)
        else:
            manifest["spec"][key] = value
    with pytest.raises(subprocess.CalledProcessError) as err:
        env.apply(manifest)
    assert message in err.value.stderr, err.value.stderr
    assert env.get("rlhfrun", "bad") is None
