"""A run deleted and created again with the same name on an existing claim (issue 12, item 5).

The real API server, operator, local kubelet and stage entrypoint; only the stages' training is fake
(tests/stages/fake_stage.py, registered in every stage process by a ``sitecustomize`` module). The
second run (a new uid) reuses each output and says whose it is in its status; the third, with PPO's
KL setting edited, trains PPO and merge again and says where the old outputs went.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pythonpath import REPO

from . import harness
from .harness import Env, tiny_run

pytestmark = pytest.mark.controlplane

CLAIM = "shared-models"


@pytest.fixture
def real_entrypoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local kubelet's stage processes run the real rlhf_stages entrypoint with fake_stage's run()."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom tests.stages import fake_stage\nfake_stage.register()\n"
    )
    monkeypatch.setattr(harness, "FAKE_STAGES", site)


def _manifest(kl: float) -> dict:
    manifest = tiny_run(storage={"existingClaim": CLAIM})
    manifest["spec"]["ppo"]["initKlCoef"] = kl
    return manifest


def _messages(env: Env) -> tuple[str, dict[str, str | None]]:
    run = env.wait_phase("tiny", "Succeeded", timeout=120)
    return run["metadata"]["uid"], {s["name"]: s.get("message") for s in run["status"]["stages"]}


def _recreate(env: Env, kl: float) -> None:
    env.kubectl("delete", "rlhfrun", "tiny", "--wait=true", "--timeout=60s")
    env.wait_for("the old Jobs to go", lambda: not env.items("jobs", "rlhf-operator.io/run=tiny"), timeout=90)
    env.apply(_manifest(kl))


def test_recreated_run_reuses_identical_outputs_and_retrains_changed_ones(env: Env, real_entrypoint: None) -> None:
    env.start_kubelet()
    env.start_operator()
    env.apply(_manifest(0.3))
    first_uid, first = _messages(env)
    assert first == {"sft": None, "reward": None, "ppo": None, "merge": None}  # trained: a plain "done"
    ppo_manifest = json.loads((env.run_dir("tiny") / "ppo" / "manifest.json").read_text())
    assert ppo_manifest["writtenBy"]["runUid"] == first_uid

    # Same name, same settings, new uid: every stage reuses, and says whose output it is.
    _recreate(env, 0.3)
    second_uid, second = _messages(env)
    assert second_uid != first_uid
    for stage, message in second.items():
        assert message is not None and message.startswith(f"already done: reused runs/{env.namespace}/tiny/{stage}")
        assert f"written by an earlier run named tiny (uid {first_uid}), attempt 1" in message
    assert len(env.starts("tiny")) == 4

    # Same name, PPO's KL setting edited: PPO and merge train again, and the status says so.
    _recreate(env, 0.1)
    _, third = _messages(env)
    assert third["sft"] is not None and third["sft"].startswith("already done: reused")
    assert third["reward"] is not None and third["reward"].startswith("already done: reused")
    assert third["ppo"] is not None and "warning: trained again" in third["ppo"]
    assert "spec.ppo.initKlCoef: 0.3 -> 0.1" in third["ppo"]
    assert third["merge"] is not None and "the ppo stage's output it was made from was replaced" in third["merge"]
    assert env.starts("tiny")[4:] == ["ppo 0", "merge 0"]
    aside = sorted(p.name.split("-")[0] for p in (env.run_dir("tiny") / "superseded").iterdir())
    assert aside == ["merge", "ppo"]

    def retrained_told() -> bool:  # events are posted from their own queue, moments after the status
        events = [
            e for e in env.items("events") if e["involvedObject"]["name"] == "tiny" and e["reason"] == "StageSucceeded"
        ]
        return any("spec.ppo.initKlCoef: 0.3 -> 0.1" in e["message"] for e in events)

    env.wait_for("the StageSucceeded event naming the changed setting", retrained_told, 30)
