"""SIGTERM *inside* a step: PPO, GRPO, RLOO and ReST abandon the step, save the last completed one,
exit 143 within seconds, and the next attempt resumes from it and finishes (real subprocesses).

Each step is made observably long on the tiny model with the debug knob that sleeps in every
forward pass of the sampling phase (``interrupt.FORWARD_DELAY_ENV``); the stage logs the phase it
enters (``<stage> step 2/3: sampling``), the test signals a second into that phase, and the stage
says afterwards which phase of which step it abandoned. The policy and reward model are stand-ins
(the untrained tiny base model, and the same weights as a scorer): this is about the mechanics.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    read_result,
    run_dir,
    run_stage,
    standin_reward_model,
    start_stage,
    tiny_spec,
    write_invocation,
)
from rlhf_stages.runtime.interrupt import FORWARD_DELAY_ENV

pytestmark = pytest.mark.training

TOTAL = 3
SLOW = {FORWARD_DELAY_ENV: "0.5"}  # x >= 16 forward passes: a sampling phase of 8 s or more
# SIGTERM -> checkpoint saved and result written: at most one (slowed) forward pass and a tiny save.
STOP_WITHIN_S = 3.0
REWARD_MODEL = "assets-sigterm/reward-model"
DATASET = {"format": "jsonl", "path": "assets/data/prompts.jsonl", "maxSamples": 32, "evalFraction": 0.0}
OFF = {"enabled": False}

# Small steps, no scheduled checkpoint before the end (saveFreq 10): the checkpoint of step 1 can
# only come from the SIGTERM path. Responses of exactly 16 tokens, so every sampling phase is long.
SPECS: dict[str, dict[str, Any]] = {
    "ppo": {
        "method": "PPO",
        "ppo": {
            "dataset": DATASET,
            "batchSize": 8,
            "miniBatchSize": 4,
            "ppoEpochs": 1,
            "totalSteps": TOTAL,
            "saveFreq": 10,
            "responseLength": {"min": 16, "max": 16},
            "rewardModel": {"path": REWARD_MODEL},
        },
    },
    **{
        stage: {
            "method": stage.upper(),
            stage: {
                "dataset": DATASET,
                "promptTemplate": "{prompt}",
                "lora": {"enabled": False},
                "numGenerations": 4,
                "batchSize": 2,
                "totalSteps": TOTAL,
                "saveFreq": 10,
                "responseLength": {"min": 16, "max": 16},
                "rewardModel": {"path": REWARD_MODEL},
            },
        }
        for stage in ("grpo", "rloo")
    },
    # Two Grow steps of one Improve step each: SIGTERM lands in Grow 1 (step 2), after Improve 1.
    "rest": {
        "method": "ReST",
        "rest": {
            "dataset": {**DATASET, "maxSamples": 16},
            "promptTemplate": "{prompt}",
            "growSteps": 2,
            "samplesPerPrompt": 2,
            "thresholds": [0.5],
            "lora": {"enabled": False},
            "training": {"learningRate": 1.0e-3, "numTrainEpochs": 1, "perDeviceTrainBatchSize": 4, "maxLength": 64},
            "responseLength": {"min": 2, "max": 16},
            "rewardModel": {"path": REWARD_MODEL},
        },
    },
}
TOTALS = {"ppo": TOTAL, "grpo": TOTAL, "rloo": TOTAL, "rest": 2}
RESUMED_LINE = {
    "ppo": "resuming ppo from checkpoint-1",
    "grpo": "resuming grpo from checkpoint-1",
    "rloo": "resuming rloo from checkpoint-1",
    "rest": "resuming rest after improve step 1",
}


@pytest.fixture(scope="module")
def volume(workspace: Path) -> Path:
    """The session's tiny assets plus a stand-in reward model (the base model read as a scorer)."""
    standin_reward_model(workspace, REWARD_MODEL)
    return workspace


def _spec(stage: str) -> dict[str, Any]:
    changes = SPECS[stage]
    spec = tiny_spec(sft=OFF, reward=OFF, method=changes["method"])
    if stage != "ppo":
        del spec["ppo"]
    spec[stage] = {**spec.get(stage, {}), **changes[stage]}
    if stage != "ppo":
        spec[stage].setdefault("resources", {"gpus": 0, "memory": "4Gi"})
    return spec


class Lines:
    """Collects a process's merged output with the time each line arrived."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(line for _, line in self.lines)

    def wait_for(self, needle: str, timeout: float = 300) -> float:
        """When a line containing ``needle`` arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for at, line in list(self.lines):
                if needle in line:
                    return at
            if self.proc.poll() is not None:
                raise AssertionError(f"stage exited ({self.proc.returncode}) before {needle!r}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no {needle!r} within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.05)


def _prepare(workspace: Path, run: str) -> None:
    shutil.rmtree(run_dir(workspace, run), ignore_errors=True)


@pytest.mark.parametrize(
    ("stage", "nproc"),
    # PPO on 2 processes too: each rank leaves its sampling on its own signal, and they must agree
    # to abandon the step before any collective (the resumed attempt runs in 1 process).
    [("ppo", 1), ("ppo", 2), ("grpo", 1), ("rloo", 1), ("rest", 1)],
)
def test_sigterm_mid_step_saves_the_last_completed_step_and_resumes(
    volume: Path, tmp_path: Path, stage: str, nproc: int
) -> None:
    run, total = f"sigterm-{stage}-p{nproc}", TOTALS[stage]
    _prepare(volume, run)
    config = write_invocation(volume, stage, run, _spec(stage))
    checkpoints = run_dir(volume, run) / f"{stage}.checkpoints"

    proc = start_stage(stage, config, tmp_path / "a.json", "--nproc", str(nproc), **SLOW)
    out = Lines(proc)
    first = out.wait_for(f"{stage} step 1/{total}: ")
    second = out.wait_for(f"{stage} step 2/{total}: ")  # step 1 is complete, step 2 is sampling
    time.sleep(1.0)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    gone = time.monotonic() - signalled
    text = out.text()
    assert code == 143, text[-3000:]
    stopped = out.wait_for("stopped by SIGTERM at step 1") - signalled  # saved, result written
    step_seconds = second - first  # step 1 took this long with the same slow sampling
    print(f"{stage}: saved and stopped {stopped:.2f} s, exited {gone:.2f} s after SIGTERM; a step {step_seconds:.1f} s")
    assert stopped < STOP_WITHIN_S and stopped < step_seconds / 4, (stopped, step_seconds, text[-3000:])
    # The interpreter's own exit (freeing torch & co.) comes on top: seconds on a loaded 2-core machine.
    assert gone < step_seconds, (gone, step_seconds)
    # It was inside step 2, in its sampling phase, and threw that step away.
    assert text.count("SIGTERM during sampling") >= nproc and " of step 2 " in text, text[-3000:]
    result = read_result(tmp_path / "a.json")
    assert result["exitCode"] == 143 and result["step"] == 1 and "SIGTERM" in result["message"], result
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not list(checkpoints.glob(".tmp-*")) and not list(checkpoints.glob(".incoming-*"))
    assert not list(checkpoints.glob(".incoming/checkpoint-*"))  # every staged checkpoint was published
    assert not (run_dir(volume, run) / stage).exists()  # no output before the stage is complete

    code, text = run_stage(stage, config, tmp_path / "b.json")
    assert code == 0, text[-3000:]
    assert RESUMED_LINE[stage] in text, text[-3000:]
    manifest = json.loads((run_dir(volume, run) / stage / "manifest.json").read_text())
    assert manifest["step"] == total and manifest["details"]["resumedFromStep"] == 1
    details = manifest["details"]
    # The same step counter: every step exactly once, none skipped, none repeated.
    if stage == "ppo":
        assert [h["step"] for h in details["history"]] == list(range(1, total + 1))
    elif stage == "rest":
        assert [h["improve"] for h in details["history"] if "improve" in h] == [1, 2]
        assert [h["grow"] for h in details["history"] if "reward_mean" in h] == [0, 1]
    else:  # the resumed Trainer logs steps 2..total (it logs every step here)
        assert sorted({h["step"] for h in details["logHistory"] if "reward" in h}) == list(range(2, total + 1))


def test_ppo_resumed_after_a_mid_step_sigterm_equals_an_uninterrupted_run(volume: Path, tmp_path: Path) -> None:
    """The abandoned step's RNG draws are put back before the save: the restart samples exactly the
    step the interrupted process would have, so the whole run is the uninterrupted one, bit for bit."""
    interrupted = run_dir(volume, "sigterm-ppo-p1") / "ppo" / "manifest.json"
    if not interrupted.is_file():
        test_sigterm_mid_step_saves_the_last_completed_step_and_resumes(volume, tmp_path, "ppo", 1)
    run = "sigterm-ppo-straight"
    _prepare(volume, run)
    code, text = run_stage("ppo", write_invocation(volume, "ppo", run, _spec("ppo")), tmp_path / "s.json")
    assert code == 0, text[-3000:]
    straight = json.loads((run_dir(volume, run) / "ppo" / "manifest.json").read_text())
    resumed = json.loads(interrupted.read_text())
    assert [h["reward_mean"] for h in resumed["details"]["history"]] == [
        h["reward_mean"] for h in straight["details"]["history"]
    ]
    from safetensors.torch import load_file

    a = load_file(run_dir(volume, run) / "ppo" / "adapter" / "adapter_model.safetensors")
    b = load_file(interrupted.parent / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(bool((a[k] == b[k]).all()) for k in a)


def test_ppo_sigterm_during_the_update_finishes_the_step_then_saves_it(
    volume: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process: the signal arrives as the optimisation epochs start (after sampling). PPO finishes
    every update of the step (none cut off half-way), counts the step and saves it."""
    import logging
    import threading

    import torch
    from accelerate import Accelerator

    from rlhf_api.stages import PPOStage
    from rlhf_stages.methods.ppo.checkpoint import checkpoint_dir
    from rlhf_stages.methods.ppo.models import load_models
    from rlhf_stages.methods.ppo.trainer import PPOTrainer
    from rlhf_stages.runtime.interrupt import StepGuard
    from rlhf_stages.runtime.models import ModelLocation, load_tokenizer

    cfg = PPOStage.model_validate(_spec("ppo")["ppo"] | {"ppoEpochs": 2})
    base = ModelLocation(str(volume / "assets" / "base-model"), "assets/base-model")
    tokenizer = load_tokenizer(base)
    torch.manual_seed(0)
    loaded = load_models(
        base, ModelLocation(str(volume / REWARD_MODEL), REWARD_MODEL), tokenizer, cfg, device=torch.device("cpu")
    )
    stop = threading.Event()
    guard = StepGuard(stop, (loaded.policy, loaded.value, loaded.reward.model), stage="ppo", total=cfg.total_steps)
    prompts = [tokenizer(f"Question: how is the lake {i}?\n\nAnswer:")["input_ids"] for i in range(16)]

    class SignalledAtTheUpdate(PPOTrainer):
        def optimise(self, batch: Any, data: Any) -> dict[str, float]:
            stop.set()  # what the entrypoint's SIGTERM handler does
            return super().optimise(batch, data)

    trainer = SignalledAtTheUpdate(
        cfg,
        loaded,
        tokenizer,
        prompts,
        accelerator=Accelerator(cpu=True),
        checkpoints=checkpoint_dir(tmp_path),
        guard=guard,
    )
    with caplog.at_level(logging.WARNING, logger="rlhf_stages.methods.ppo.trainer"):
        assert trainer.train(stop.is_set) is False  # stopped early
    guard.close()
    updates = cfg.ppo_epochs * cfg.batch_size // cfg.mini_batch_size  # 2 x 8 / 4
    assert "SIGTERM during the optimisation of step 1: finishing its 4 remaining updates" in caplog.text
    assert trainer.step == 1 and [h["step"] for h in trainer.history] == [1]
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {updates}  # every update of the step was applied, none after it
    assert (tmp_path / "checkpoint-1" / "state.json").is_file()
