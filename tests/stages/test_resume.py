"""Resume after SIGKILL, checkpoint on SIGTERM, complete-only checkpoints (real subprocesses)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import read_result, run_dir, run_stage, start_stage, tiny_spec, write_invocation

pytestmark = pytest.mark.training

RUN = "interrupted"
SPEC = tiny_spec(sft={"training": {"maxSteps": 12, "saveSteps": 4, "loggingSteps": 2, "saveTotalLimit": 5}})
SLOW = {"RLHF_DEBUG_STEP_DELAY_S": "0.4"}


def _wait_for(predicate, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"stage exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the stage")
        time.sleep(0.1)


def _progress_step(workspace: Path) -> int:
    try:
        return json.loads((run_dir(workspace, RUN) / "sft.progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def test_kill_resume_sigterm_resume(workspace: Path, tmp_path: Path) -> None:
    config = write_invocation(workspace, "sft", RUN, SPEC)
    checkpoints = run_dir(workspace, RUN) / "sft.checkpoints"

    # 1. SIGKILL right after the first complete checkpoint: no output, the checkpoint survives.
    proc = start_stage("sft", config, tmp_path / "a.json", **SLOW)
    _wait_for((checkpoints / "checkpoint-4").is_dir, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert not (run_dir(workspace, RUN) / "sft").exists()
    seen = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert seen and seen[-1] < 12
    # A partial checkpoint (as a kill mid-save leaves) must be ignored.
    junk = checkpoints / ".incoming" / "checkpoint-11"
    junk.mkdir(parents=True, exist_ok=True)
    (junk / "model.safetensors").write_bytes(b"partial")

    # 2. The next attempt resumes from that step, not 0; SIGTERM makes it save and exit 143.
    proc = start_stage("sft", config, tmp_path / "b.json", **SLOW)
    _wait_for(lambda: _progress_step(workspace) >= seen[-1] + 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert f"resuming sft from checkpoint-{seen[-1]}" in out
    result = read_result(tmp_path / "b.json")
    assert not result["succeeded"] and "SIGTERM" in result["message"] and result["exitCode"] == 143
    stopped_at = result["step"]
    assert seen[-1] < stopped_at < 12
    assert (checkpoints / f"checkpoint-{stopped_at}" / "trainer_state.json").is_file()
    assert not junk.exists()

    # 3. The last attempt resumes from the SIGTERM checkpoint and finishes.
    code, out = run_stage("sft", config, tmp_path / "c.json")
    assert code == 0, out[-3000:]
    assert f"resuming sft from checkpoint-{stopped_at}" in out
    manifest = json.loads((run_dir(workspace, RUN) / "sft" / "manifest.json").read_text())
    assert manifest["details"]["resumedFromStep"] == stopped_at and manifest["step"] == 12
    assert read_result(tmp_path / "c.json")["succeeded"]
