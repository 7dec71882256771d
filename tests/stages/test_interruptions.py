"""The bound on interruptions (spec.runtime.maxInterruptions): the stage's record of its starts.

The real entrypoint with a stage that does not train (fake_stage.py); the last test runs it as
separate processes, killed for real, as a Pod would be.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import test_stale_outputs as stale
from test_stale_outputs import RUN, invocation, start, starts

from conftest import REPO, read_result, run_dir, stage_env, tiny_spec

fake = stale.fake  # the fixture: every stage runs fake_stage in this process
FAKE = str(REPO / "tests" / "stages" / "fake_stage.py")


def bounded(limit: int) -> dict[str, Any]:
    return tiny_spec(runtime={"maxInterruptions": limit})


def record(workspace: Path) -> dict[str, Any]:
    return json.loads((run_dir(workspace, RUN) / "sft.attempts.json").read_text())


def test_fails_on_the_start_after_more_than_max_interruptions(tmp_path: Path, fake: Path, monkeypatch) -> None:
    spec = bounded(2)
    for n in (1, 2, 3):  # three starts, each stopped by SIGTERM one step later: 2 restarts are allowed
        monkeypatch.setenv("FAKE_STOP_AT", str(n))
        assert start(tmp_path, fake, "sft", spec)["exitCode"] == 143
    assert record(tmp_path)["interruptions"] == 2  # the third is counted when the next start sees it
    monkeypatch.delenv("FAKE_STOP_AT")
    refused = start(tmp_path, fake, "sft", spec)
    assert refused["exitCode"] == 2 and not refused["succeeded"]  # 2: the Job's podFailurePolicy fails at once
    message = refused["message"]
    assert "this start follows 3 interrupted attempts, more than spec.runtime.maxInterruptions (2)" in message
    assert "retry the run" in message and "raise spec.runtime.maxInterruptions" in message
    assert starts(tmp_path) == ["sft 0", "sft 1", "sft 2"]  # the refused start did not train
    assert (run_dir(tmp_path, RUN) / "sft.checkpoints" / "checkpoint-3").is_dir()  # kept for a retry
    rec = record(tmp_path)
    assert rec["starts"] == 4 and rec["interruptions"] == 3
    assert [a.get("exitCode") for a in rec["attempts"]] == [143, 143, 143, 2]
    assert rec["attempts"][-1]["refused"] == "too many interruptions"

    # A retry of the failed run is a new Job: the count starts again, and it resumes from step 3.
    done = start(tmp_path, fake, "sft", spec)
    assert done["succeeded"] and starts(tmp_path)[-1] == "sft 3"
    assert record(tmp_path)["interruptions"] == 0


def test_zero_allows_no_restart_after_an_interruption(tmp_path: Path, fake: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_STOP_AT", "1")
    assert start(tmp_path, fake, "sft", bounded(0))["exitCode"] == 143
    monkeypatch.delenv("FAKE_STOP_AT")
    assert start(tmp_path, fake, "sft", bounded(0))["exitCode"] == 2


def test_crashes_are_left_to_backoff_limit(tmp_path: Path, fake: Path, monkeypatch) -> None:
    """Exit 1 is what the Job counts against backoffLimit: not counted a second time."""
    monkeypatch.setenv("FAKE_CRASH", "1")
    for _ in range(3):
        assert start(tmp_path, fake, "sft", bounded(0))["exitCode"] == 1
    monkeypatch.delenv("FAKE_CRASH")
    assert start(tmp_path, fake, "sft", bounded(0))["succeeded"]
    assert record(tmp_path)["interruptions"] == 0


def test_new_run_or_new_settings_start_the_count_again(tmp_path: Path, fake: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_STOP_AT", "1")
    assert start(tmp_path, fake, "sft", bounded(0))["exitCode"] == 143
    # The run re-created with the same name (a new uid): its own count; it resumes the checkpoint.
    monkeypatch.setenv("FAKE_STOP_AT", "2")
    assert start(tmp_path, fake, "sft", bounded(0), uid="uid-2")["exitCode"] == 143
    assert record(tmp_path)["runUid"] == "uid-2" and record(tmp_path)["interruptions"] == 0
    # Other settings: the old checkpoints are set aside (it starts at 0) and the count starts again.
    edited = tiny_spec(runtime={"maxInterruptions": 0}, sft={"training": {"learningRate": 1.0e-3}})
    monkeypatch.setenv("FAKE_STOP_AT", "1")
    assert start(tmp_path, fake, "sft", edited, uid="uid-2")["exitCode"] == 143
    assert starts(tmp_path) == ["sft 0", "sft 1", "sft 0"] and record(tmp_path)["starts"] == 1
    monkeypatch.delenv("FAKE_STOP_AT")
    assert start(tmp_path, fake, "sft", edited, uid="uid-2")["exitCode"] == 2


def test_reused_output_needs_no_start(tmp_path: Path, fake: Path, monkeypatch) -> None:
    """A complete output of the same settings is reused even after many interruptions."""
    monkeypatch.setenv("FAKE_STOP_AT", "1")
    assert start(tmp_path, fake, "sft", bounded(0))["exitCode"] == 143
    monkeypatch.delenv("FAKE_STOP_AT")
    assert start(tmp_path, fake, "sft", bounded(0))["exitCode"] == 2
    assert start(tmp_path, fake, "sft", bounded(0))["succeeded"]  # the retry trains
    assert start(tmp_path, fake, "sft", bounded(0))["message"].startswith("already done: reused")


def _process(workspace: Path, spec: dict[str, Any], result: Path, **env: str) -> int:
    config = invocation(workspace, "sft", spec)
    proc = subprocess.run(
        [sys.executable, FAKE, "sft", "--config", str(config)],
        env=stage_env(result, **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode


def test_killed_attempts_count_and_the_exit_codes_are_real(tmp_path: Path) -> None:
    """SIGKILL leaves no end in the record (as an OOM kill or the end of the grace period): counted."""
    result = tmp_path / "result.json"
    spec = bounded(1)
    assert _process(tmp_path, spec, result, FAKE_KILL="1") == -9
    assert "exitCode" not in record(tmp_path)["attempts"][-1]
    assert _process(tmp_path, spec, result, FAKE_STOP_AT="2") == 143
    assert record(tmp_path)["attempts"][0]["countedAs"] == "killed (no recorded end)"
    assert _process(tmp_path, spec, result) == 2
    body = read_result(result)
    assert body["exitCode"] == 2 and "more than spec.runtime.maxInterruptions (1)" in body["message"]
    assert record(tmp_path)["interruptions"] == 2


@pytest.mark.parametrize("limit", [-1, 1001])
def test_bad_max_interruptions_is_a_config_error(tmp_path: Path, fake: Path, limit: int) -> None:
    body = start(tmp_path, fake, "sft", bounded(limit))
    assert body["exitCode"] == 2 and "spec.runtime.maxInterruptions" in body["message"]
