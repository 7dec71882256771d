"""No stale reuse: an output or checkpoint is reused only when made from the same settings and inputs.

The real entrypoint runs a stage that does not train (fake_stage.py), so each case takes
milliseconds; tests/cli/test_run_local_stale.py does the same through ``rlhfctl run-local`` and
test_stale_training.py with a real stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.stages import fake_stage

from conftest import read_result, run_dir, tiny_spec
from rlhf_stages.runtime.entrypoint import main

RUN = "stale"
FAKE_ENV = ("FAKE_STEPS", "FAKE_STOP_AT", "FAKE_CRASH", "FAKE_KILL", "FAKE_INPUT_MISSING")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, in_process: Path) -> Path:
    """Every stage runs fake_stage in this process; returns the result file."""
    from rlhf_stages.runtime import entrypoint

    for stage in list(entrypoint.STAGES):
        monkeypatch.setitem(entrypoint.STAGES, stage, fake_stage.MODULE)
    for name in FAKE_ENV:
        monkeypatch.delenv(name, raising=False)
    return in_process


def invocation(workspace: Path, stage: str, spec: dict[str, Any], uid: str | None = "uid-1") -> Path:
    body = {
        "apiVersion": "rlhf-operator.io/v1alpha1",
        "kind": "StageInvocation",
        "stage": stage,
        "run": {"name": RUN, "uid": uid},
        "workspace": str(workspace),
        "spec": spec,
    }
    path = workspace / "configs" / f"{stage}-{uid}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body))
    return path


def start(workspace: Path, result: Path, stage: str, spec: dict[str, Any], uid: str | None = "uid-1") -> dict:
    code = main([stage, "--config", str(invocation(workspace, stage, spec, uid))])
    body = read_result(result)
    assert body["exitCode"] == code
    return body


def manifest(workspace: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir(workspace, RUN) / stage / "manifest.json").read_text())


def starts(workspace: Path) -> list[str]:
    log = run_dir(workspace, RUN) / "fake-starts.log"
    return log.read_text().splitlines() if log.exists() else []


def superseded(workspace: Path) -> list[str]:
    root = run_dir(workspace, RUN) / "superseded"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


SPEC = tiny_spec()
EDITED = tiny_spec(sft={"training": {"learningRate": 1.0e-3}})


def test_same_settings_reused_saying_whose_output(tmp_path: Path, fake: Path) -> None:
    first = start(tmp_path, fake, "sft", SPEC)
    assert first["succeeded"] and first["message"] == "done"
    written = manifest(tmp_path, "sft")
    assert written["writtenBy"] == {"runUid": "uid-1", "attempt": 1, "pod": written["writtenBy"]["pod"]}
    assert written["config"]["section"]["training"]["learningRate"] == 6.0e-3

    # A retried Pod of the same run (the Job's next attempt) with the same settings: reused, said so.
    again = start(tmp_path, fake, "sft", SPEC)
    assert again["succeeded"] and again["metrics"] == first["metrics"]
    assert again["message"].startswith("already done: reused runs/default/stale/sft, written by this run, attempt 1")
    assert written["finishedAt"] in again["message"] and written["configHash"][:12] in again["message"]
    assert starts(tmp_path) == ["sft 0"]  # not trained again
    assert manifest(tmp_path, "sft") == written


def test_recreated_run_reuses_identical_and_retrains_changed(tmp_path: Path, fake: Path) -> None:
    """A run deleted and created again with the same name (a new uid) on the existing claim."""
    start(tmp_path, fake, "sft", SPEC, uid="old-uid")
    old = manifest(tmp_path, "sft")

    same = start(tmp_path, fake, "sft", SPEC, uid="new-uid")
    assert same["succeeded"]
    assert "written by an earlier run named stale (uid old-uid), attempt 1" in same["message"]
    assert starts(tmp_path) == ["sft 0"]

    changed = start(tmp_path, fake, "sft", EDITED, uid="new-uid")
    assert changed["succeeded"] and starts(tmp_path) == ["sft 0", "sft 0"]
    assert changed["message"].startswith("done; warning: trained again: the previous sft output")
    assert "spec.sft.training.learningRate: 0.006 -> 0.001" in changed["message"]
    (aside,) = superseded(tmp_path)
    assert aside.startswith("sft-") and f"runs/default/stale/superseded/{aside}" in changed["message"]
    # The old output is kept whole, under a name no stage reads; the new one says what it replaced.
    assert json.loads((run_dir(tmp_path, RUN) / "superseded" / aside / "manifest.json").read_text()) == old
    new = manifest(tmp_path, "sft")
    assert new["writtenBy"]["runUid"] == "new-uid" and new["configHash"] != old["configHash"]
    assert new["config"]["section"]["training"]["learningRate"] == 1.0e-3
    assert "trained again" in new["details"]["notices"][0]


def test_edited_setting_in_the_same_run_retrains(tmp_path: Path, fake: Path) -> None:
    """The issue's reproduction, at the entrypoint: PPO's KL setting edited, same run."""
    for stage in ("sft", "reward", "ppo"):
        assert start(tmp_path, fake, stage, SPEC)["succeeded"]
    kl = tiny_spec(ppo={"initKlCoef": 0.1})
    # Earlier stages are unaffected by a PPO setting: reused.
    assert start(tmp_path, fake, "reward", kl)["message"].startswith("already done: reused")
    result = start(tmp_path, fake, "ppo", kl)
    assert "warning: trained again" in result["message"] and "spec.ppo.initKlCoef: 0.3 -> 0.1" in result["message"]
    assert starts(tmp_path)[-1] == "ppo 0"
    assert [p.split("-")[0] for p in superseded(tmp_path)] == ["ppo"]


def test_retrained_upstream_makes_later_outputs_stale(tmp_path: Path, fake: Path) -> None:
    """The hash covers the earlier outputs a stage read: a new SFT output invalidates reward and PPO."""
    for stage in ("sft", "reward"):
        start(tmp_path, fake, stage, SPEC)
    reward_before = manifest(tmp_path, "reward")
    assert reward_before["config"]["upstream"] == {"sft": manifest(tmp_path, "sft")["outputId"]}

    start(tmp_path, fake, "sft", EDITED)  # SFT trains again...
    result = start(tmp_path, fake, "reward", EDITED)  # ...so reward, whose own section did not change, too
    assert "the sft stage's output it was made from was replaced: trained again" in result["message"]
    assert starts(tmp_path) == ["sft 0", "reward 0", "sft 0", "reward 0"]
    assert manifest(tmp_path, "reward")["config"]["upstream"]["sft"] == manifest(tmp_path, "sft")["outputId"]

    # Even with the same settings, a new SFT output (e.g. deleted and trained again) is a new input.
    assert start(tmp_path, fake, "reward", EDITED)["message"].startswith("already done: reused")
    assert len(starts(tmp_path)) == 4  # nothing changed since
    (run_dir(tmp_path, RUN) / "sft").rename(tmp_path / "sft-deleted")
    start(tmp_path, fake, "sft", EDITED)
    assert "was replaced" in start(tmp_path, fake, "reward", EDITED)["message"]


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path: Path, fake: Path, monkeypatch) -> None:
    checkpoints = run_dir(tmp_path, RUN) / "sft.checkpoints"
    monkeypatch.setenv("FAKE_STOP_AT", "2")
    stopped = start(tmp_path, fake, "sft", SPEC)
    assert stopped["exitCode"] == 143 and (checkpoints / "checkpoint-2").is_dir()
    owner = json.loads((checkpoints / "config-hash.json").read_text())
    assert owner["runUid"] == "uid-1" and owner["attempt"] == 1

    # Settings edited before the next start: the checkpoint is set aside, training starts at 0.
    monkeypatch.delenv("FAKE_STOP_AT")
    result = start(tmp_path, fake, "sft", EDITED)
    assert result["succeeded"] and starts(tmp_path) == ["sft 0", "sft 0"]
    assert (
        "warning: not resumed: the checkpoints in runs/default/stale/sft.checkpoints were written under"
        in (result["message"])
    )
    assert manifest(tmp_path, "sft")["details"]["resumedFromStep"] == 0
    (aside,) = superseded(tmp_path)
    assert aside.startswith("sft.checkpoints-")
    assert (run_dir(tmp_path, RUN) / "superseded" / aside / "checkpoint-2" / "state.json").is_file()


def test_checkpoint_of_same_settings_is_resumed(tmp_path: Path, fake: Path, monkeypatch) -> None:
    """A Job retry (same run, same settings) resumes; so does a re-created run with the same settings."""
    monkeypatch.setenv("FAKE_STOP_AT", "2")
    assert start(tmp_path, fake, "sft", SPEC)["exitCode"] == 143
    monkeypatch.setenv("FAKE_STOP_AT", "3")
    assert start(tmp_path, fake, "sft", SPEC, uid="uid-2")["exitCode"] == 143
    monkeypatch.delenv("FAKE_STOP_AT")
    result = start(tmp_path, fake, "sft", SPEC)
    assert result["succeeded"] and result["message"] == "done"
    assert starts(tmp_path) == ["sft 0", "sft 2", "sft 3"] and superseded(tmp_path) == []
    assert manifest(tmp_path, "sft")["details"]["resumedFromStep"] == 3


def test_checkpoints_of_unknown_origin_are_not_resumed(tmp_path: Path, fake: Path) -> None:
    """Checkpoints without config-hash.json (an older version wrote them) cannot be trusted."""
    legacy = run_dir(tmp_path, RUN) / "sft.checkpoints" / "checkpoint-3"
    legacy.mkdir(parents=True)
    result = start(tmp_path, fake, "sft", SPEC)
    assert "were written under unknown settings" in result["message"]
    assert starts(tmp_path) == ["sft 0"]


def test_stale_output_stays_in_place_when_the_stage_cannot_start(tmp_path: Path, fake: Path, monkeypatch) -> None:
    """Nothing is moved for a start that fails its checks (exit 2 or 3)."""
    start(tmp_path, fake, "sft", SPEC)
    before = manifest(tmp_path, "sft")
    monkeypatch.setenv("FAKE_INPUT_MISSING", "1")
    assert start(tmp_path, fake, "sft", EDITED)["exitCode"] == 3
    assert manifest(tmp_path, "sft") == before and superseded(tmp_path) == []


def test_manifest_of_an_older_version_is_not_reused(tmp_path: Path, fake: Path) -> None:
    start(tmp_path, fake, "sft", SPEC)
    path = run_dir(tmp_path, RUN) / "sft" / "manifest.json"
    old = json.loads(path.read_text())
    del old["config"]
    old["configHash"] = "0" * 64
    path.write_text(json.dumps(old))
    result = start(tmp_path, fake, "sft", SPEC)
    assert "its manifest records no settings to compare" in result["message"]
    assert starts(tmp_path) == ["sft 0", "sft 0"]
