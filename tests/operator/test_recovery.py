"""Recovery: the operator is SIGKILLed mid-stage; a second replica, standing by, takes over.

Run repeatedly with: pytest tests/operator/test_recovery.py --count-loop (see docs/operator.md):
    for i in 1 2 3 4 5; do pytest tests/operator/test_recovery.py -q || break; done
"""

from __future__ import annotations

import time

import pytest

from .harness import Env, http_get, tiny_run

pytestmark = pytest.mark.controlplane


def _uids(env: Env) -> dict[str, str]:
    return {j["metadata"]["name"]: j["metadata"]["uid"] for j in env.items("jobs")}


def test_operator_killed_mid_stage_standby_takes_over(env: Env) -> None:
    env.fake_behaviour({"ppo": {"steps": 30, "stepSeconds": 0.2}})
    env.start_kubelet()
    leader, leader_port = env.start_operator("op-a", lease_duration=3)
    env.wait_for("op-a to lead", lambda: http_get(leader_port, "/readyz")[0] == 200, timeout=60)
    _standby, standby_port = env.start_operator("op-b", lease_duration=3)
    # The standby is up (its process imports take a while on a loaded machine) but does not lead.
    env.wait_for("op-b to be live", lambda: http_get(standby_port, "/healthz")[0] == 200, timeout=60)
    env.apply(tiny_run())
    env.wait_for(
        "ppo to run", lambda: (env.stage(env.run("tiny"), "ppo").get("progress") or {}).get("step", 0) >= 2, timeout=90
    )
    # Two replicas, one actor: the standby is live but not ready, and has reconciled nothing.
    assert http_get(standby_port, "/healthz")[0] == 200
    assert http_get(standby_port, "/readyz")[0] == 503
    assert "rlhf_reconcile_total 0.0" in http_get(standby_port, "/metrics")[1]
    before = _uids(env)
    assert set(before) == {"tiny-sft", "tiny-reward", "tiny-ppo"}

    leader.kill()  # SIGKILL: the Lease is not released; op-b must wait for it to expire
    run = env.wait_phase("tiny", "Succeeded", timeout=120)
    after = _uids(env)
    assert {k: after[k] for k in before} == before, "a Job was recreated"
    assert env.starts("tiny") == ["sft 0", "reward 0", "ppo 0", "merge 0"], "a stage ran twice or was skipped"
    assert [s["phase"] for s in run["status"]["stages"]] == ["Succeeded"] * 4
    assert http_get(standby_port, "/readyz")[0] == 200


def test_operator_restarted_with_same_identity_adopts_jobs(env: Env) -> None:
    env.fake_behaviour({"reward": {"steps": 20, "stepSeconds": 0.2}})
    env.start_kubelet()
    first, _ = env.start_operator("op-a", lease_duration=15)
    env.apply(tiny_run())
    env.wait_for("reward to run", lambda: env.stage(env.run("tiny"), "reward").get("phase") == "Running", timeout=90)
    first.kill()
    before = _uids(env)
    time.sleep(1)
    env.start_operator("op-a", lease_duration=15)  # same pod name: takes its Lease back at once
    run = env.wait_phase("tiny", "Succeeded", timeout=90)
    assert {k: _uids(env)[k] for k in before} == before
    assert env.starts("tiny") == ["sft 0", "reward 0", "ppo 0", "merge 0"]
    assert run["status"]["reward"] == 0.75
