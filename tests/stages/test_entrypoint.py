"""The entrypoint's contract without training: config errors, missing inputs, results, no heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import PYTHON_PATH, REPO, read_result, tiny_spec, write_invocation
from rlhf_api.layout import StageResult
from rlhf_api.watch import EvaluationRow
from rlhf_stages.runtime.context import StageConfigError
from rlhf_stages.runtime.entrypoint import main
from rlhf_stages.runtime.outputs import result_json

# (case id, stage, changes to the tiny spec or the invocation, text the error must contain)
BAD_CONFIGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("unknown spec key", "sft", {"spec": {"sft": {"learningRate": 0.1}}}, "spec.sft.learningRate"),
    (
        "bad learning rate",
        "sft",
        {"spec": {"sft": {"training": {"learningRate": -1}}}},
        "spec.sft.training.learningRate",
    ),
    ("bad lora rank", "sft", {"spec": {"sft": {"lora": {"enabled": True, "r": 0}}}}, "spec.sft.lora.r"),
    ("template without response", "sft", {"spec": {"sft": {"promptTemplate": "Q: {question}"}}}, "promptTemplate"),
    ("absolute dataset path", "sft", {"spec": {"sft": {"dataset": {"path": "/etc/passwd"}}}}, "spec.sft.dataset.path"),
    ("quantization without lora", "sft", {"spec": {"sft": {"quantization": {"mode": "4bit"}}}}, "quantization"),
    ("mini batch does not divide", "ppo", {"spec": {"ppo": {"miniBatchSize": 5}}}, "miniBatchSize"),
    ("unknown invocation key", "sft", {"invocation": {"extra": 1}}, "extra"),
    ("unknown stage", "judge", {}, "stage"),
    ("stage not in pipeline", "dpo", {}, "method PPO runs"),
    ("disabled stage", "sft", {"spec": {"sft": {"enabled": False}}}, "spec.sft.enabled"),
    (
        "watch check pattern that does not compile",  # admitted by the API server (no CEL for it): refused here
        "ppo",
        {"spec": {"ppo": {"watch": {"checks": [{"name": "ends", "mustMatch": "[.$"}]}}}},
        "spec.ppo.watch.checks.0.mustMatch",
    ),
    ("bad merge dtype", "merge", {"spec": {"merge": {"dtype": "int4"}}}, "spec.merge.dtype"),
]


def _config(workspace: Path, stage: str, changes: dict[str, Any]) -> Path:
    spec = tiny_spec(**changes.get("spec", {}))
    path = write_invocation(workspace, stage, "bad", spec, **changes.get("invocation", {}))
    return path


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exits_2_naming_the_field(
    tmp_path: Path, in_process: Path, capsys: pytest.CaptureFixture[str], case: tuple[str, str, dict[str, Any], str]
) -> None:
    _, stage, changes, expected = case
    config = _config(tmp_path, stage, changes)
    assert main([stage, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    result = read_result(in_process)
    assert result["exitCode"] == 2 and not result["succeeded"] and expected in result["message"]


def test_config_file_errors(tmp_path: Path, in_process: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert main(["sft", "--config", str(tmp_path / "list.yaml")]) == 2
    (tmp_path / "broken.yaml").write_text("stage: [\n")
    assert main(["sft", "--config", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_a_json_config_is_read_as_json(tmp_path: Path) -> None:
    """A config written as JSON reads back as the invocation it was made from, a learning rate of
    1e-05 included: PyYAML reads JSON's 1e-05 as a string, which validation refuses."""
    from rlhf_api.layout import RunRef
    from rlhf_api.run import RLHFRunSpec
    from rlhf_operator.children import build_invocation
    from rlhf_stages.runtime.entrypoint import load_invocation

    run = RunRef(namespace="ns", name="tiny", uid="uid-1")
    spec = RLHFRunSpec.model_validate(tiny_spec(sft={"training": {"learningRate": 1e-05}}), strict=False)
    wire = build_invocation(run, spec, "sft").to_wire()
    config = tmp_path / "invocation.yaml"
    config.write_text(json.dumps(wire, sort_keys=True, indent=2, ensure_ascii=False))
    read = load_invocation(config)
    assert read.to_wire() == wire and read.spec.sft.training.learning_rate == 1e-05
    assert yaml.safe_load(config.read_text())["spec"]["sft"]["training"]["learningRate"] == "1e-05"  # the reason
    config.write_text('{"stage": "sft", ')
    with pytest.raises(StageConfigError, match="not valid YAML/JSON"):
        load_invocation(config)


def test_config_error_imports_no_ml_library(tmp_path: Path) -> None:
    """Validation happens before torch/transformers are imported (a bad config fails in milliseconds)."""
    config = _config(tmp_path, "sft", {"spec": {"sft": {"training": {"learningRate": -1}}}})
    code = (
        "import sys; from rlhf_stages.__main__ import main\n"
        f"rc = main(['sft', '--config', {str(config)!r}])\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft') if m in sys.modules]\n"
        "assert rc == 2 and not heavy, (rc, heavy)\n"
    )
    env = {"PYTHONPATH": PYTHON_PATH, "RLHF_TERMINATION_LOG": str(tmp_path / "r.json")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=60)


def test_missing_dataset_exits_3(workspace: Path, in_process: Path) -> None:
    spec = tiny_spec(sft={"dataset": {"path": "assets/data/nope.jsonl"}})
    config = write_invocation(workspace, "sft", "missing-data", spec)
    assert main(["sft", "--config", str(config)]) == 3
    assert "assets/data/nope.jsonl" in read_result(in_process)["message"]


def test_missing_base_model_exits_3(workspace: Path, in_process: Path) -> None:
    config = write_invocation(workspace, "sft", "missing-model", tiny_spec(baseModel={"path": "assets/none"}))
    assert main(["sft", "--config", str(config)]) == 3


def test_reward_needs_complete_sft_output(workspace: Path, in_process: Path) -> None:
    config = write_invocation(workspace, "reward", "no-sft-yet", tiny_spec())
    assert main(["reward", "--config", str(config)]) == 3
    assert "SFT" in read_result(in_process)["message"]


def test_quantization_without_cuda_is_a_clear_config_error(workspace: Path, in_process: Path) -> None:
    spec = tiny_spec(sft={"lora": {"enabled": True}, "quantization": {"mode": "4bit"}})
    config = write_invocation(workspace, "sft", "qlora-no-gpu", spec)
    assert main(["sft", "--config", str(config)]) == 2
    message = read_result(in_process)["message"]
    assert "sft.quantization.mode" in message and "CUDA" in message and "RLHF_ALLOW_CPU_QUANTIZATION" in message


def test_result_json_cuts_the_watchs_middle_evaluations_first() -> None:
    rows = [
        EvaluationRow(step=s, score=1.234, kl=5.678, length=9.876, distinct2=0.5, alarm=s == 40, selected=s == 30)
        for s in range(0, 80, 10)
    ]
    big = StageResult(
        stage="ppo",
        succeeded=True,
        findings=["f" * 300] * 4,
        selection="s" * 300,
        evaluations=rows,
        metrics={f"m{i:03d}": 1.0 for i in range(40)},
        message="m" * 1500,
    )
    text = result_json(big)
    body = json.loads(text)
    steps = [r["step"] for r in body["evaluations"]]
    assert len(text.encode()) <= 4096 and 2 < len(steps) < 8
    assert steps[0] == 0 and 30 in steps and steps[-1] == 70  # baseline, output and the latest stay
    assert len(body["metrics"]) == 40 and body["message"] == "m" * 1500  # nothing else was cut
    assert "alarm" not in body["evaluations"][0] and body["evaluations"][steps.index(30)]["selected"] is True
    assert StageResult.model_validate(body, strict=False).evaluations[0] == rows[0]


def test_result_json_fits_the_termination_message_limit() -> None:
    big = StageResult(stage="sft", succeeded=False, metrics={f"m{i:04d}": 1.0 for i in range(400)}, message="x" * 9000)
    text = result_json(big)
    assert len(text.encode()) <= 4096
    assert yaml.safe_load(text)["stage"] == "sft"
