"""No stale reuse with a real stage: SFT trained, reused, then trained again after an edit, its old model kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import read_result, run_dir, run_stage, tiny_spec, write_invocation
from rlhf_stages.runtime.entrypoint import main

pytestmark = pytest.mark.training

RUN = "stale-real"


def _spec(learning_rate: float) -> dict:
    training = {"maxSteps": 4, "saveSteps": 2, "loggingSteps": 2, "learningRate": learning_rate}
    return tiny_spec(sft={"training": training})


def test_sft_edited_learning_rate_trains_again(workspace: Path, in_process: Path) -> None:
    out = run_dir(workspace, RUN) / "sft"
    config = write_invocation(workspace, "sft", RUN, _spec(6.0e-3))
    assert main(["sft", "--config", str(config)]) == 0
    first = json.loads((out / "manifest.json").read_text())
    weights = sorted(p.name for p in (out / "model").iterdir())
    assert any(name.endswith(".safetensors") for name in weights)

    assert main(["sft", "--config", str(config)]) == 0
    assert read_result(in_process)["message"].startswith("already done: reused runs/default/stale-real/sft")
    assert json.loads((out / "manifest.json").read_text()) == first

    config = write_invocation(workspace, "sft", RUN, _spec(1.0e-3))
    assert main(["sft", "--config", str(config)]) == 0
    result = read_result(in_process)
    assert "warning: trained again" in result["message"]
    assert "spec.sft.training.learningRate: 0.006 -> 0.001" in result["message"]
    second = json.loads((out / "manifest.json").read_text())
    assert second["outputId"] != first["outputId"] and second["step"] == 4
    assert second["metrics"] != first["metrics"]  # another learning rate, another model
    (aside,) = (run_dir(workspace, RUN) / "superseded").iterdir()
    assert json.loads((aside / "manifest.json").read_text()) == first
    assert sorted(p.name for p in (aside / "model").iterdir()) == weights  # the old model, whole

    # Two processes (--nproc 2): the process the Pod started sets the output aside and records the
    # start once; rank 0 writes the output and a result that carries the same warning.
    config = write_invocation(workspace, "sft", RUN, _spec(2.0e-3))
    code, output = run_stage("sft", config, in_process.with_name("ddp.json"), "--nproc", "2")
    assert code == 0, output[-3000:]
    result = read_result(in_process.with_name("ddp.json"))
    assert "spec.sft.training.learningRate: 0.001 -> 0.002" in result["message"]
    assert output.count("WARNING: sft: trained again") == 1
    assert len(list((run_dir(workspace, RUN) / "superseded").iterdir())) == 2
    record = json.loads((run_dir(workspace, RUN) / "sft.attempts.json").read_text())
    assert [(a["number"], a["exitCode"]) for a in record["attempts"]] == [(1, 0)]
    assert "trained again" in record["attempts"][0]["notices"][0]
