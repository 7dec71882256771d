"""spec.runtime.maxInterruptions end to end: a stage suspended and resumed more often than allowed fails
the run with ConfigError and a message naming the field and the fix (issue 12, item 4).

The real API server, operator, local kubelet and stage entrypoint; the stage's training is fake
(tests/stages/fake_stage.py, slow enough to be stopped). The run's own suspend stops the Pod with
SIGTERM as an eviction or a preemption does (the stage cannot tell them apart), so it counts.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from .harness import Env, tiny_run
from .test_recreated_run import real_entrypoint  # noqa: F401  (a fixture)

pytestmark = pytest.mark.controlplane


def _record(env: Env) -> dict[str, Any]:
    try:
        return json.loads((env.run_dir("tiny") / "sft.attempts.json").read_text())
    except (OSError, ValueError):
        return {}


def _suspend(env: Env, value: bool) -> None:
    env.kubectl("patch", "rlhfrun", "tiny", "--type=merge", "-p", json.dumps({"spec": {"suspend": value}}))


def test_suspended_more_than_max_interruptions_fails_the_run(env: Env, real_entrypoint: None) -> None:  # noqa: F811
    env.volume.mkdir(parents=True, exist_ok=True)
    (env.volume / "fake-stage.json").write_text(json.dumps({"sft": {"steps": 400, "stepSeconds": 0.2}}))
    env.start_kubelet()
    env.start_operator()
    manifest = tiny_run()
    manifest["spec"]["runtime"]["maxInterruptions"] = 1
    env.apply(manifest)
    for start in (1, 2):  # two interruptions: the first restart is allowed, the second is not
        env.wait_for(
            f"start {start} of sft to train",
            lambda start=start: (
                _record(env).get("starts") == start
                and "exitCode" not in _record(env)["attempts"][-1]
                and (env.run_dir("tiny") / "sft.checkpoints" / "checkpoint-1").is_dir()
            ),
            timeout=90,
        )
        _suspend(env, True)
        env.wait_for("sft to stop", lambda: _record(env)["attempts"][-1].get("exitCode") == 143, timeout=60)
        env.wait_phase("tiny", "Suspended", timeout=30)
        _suspend(env, False)

    run = env.wait_phase("tiny", "Failed", timeout=90)
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ConfigError", failed
    assert (
        "this start follows 2 interrupted attempts, more than spec.runtime.maxInterruptions (1)" in (failed["message"])
    )
    record = _record(env)
    assert record["starts"] == 3 and record["interruptions"] == 2
    assert [a.get("exitCode") for a in record["attempts"]] == [143, 143, 2]
    assert env.get("job", "tiny-reward") is None  # the pipeline stopped at sft
