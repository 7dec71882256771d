"""rlhfctl commands that need neither a cluster nor training: validate, render, status rendering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_operator.cli import main
from rlhf_operator.cli.cluster import render_status
from tests.pythonpath import python_env

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny.yaml"


def rlhfctl(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs the CLI as a user would, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "rlhf_operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=python_env(),
    )


def test_rlhfctl_needs_no_pythonpath_from_the_caller(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Plain ``pytest`` exports no PYTHONPATH (only the Makefile does)."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    proc = rlhfctl("validate", str(TINY))
    assert proc.returncode == 0, proc.stderr
    # Nor may one that points at another clone win.
    other = tmp_path / "other-clone" / "operator" / "rlhf_operator"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise ImportError('imported from the other clone')\n")
    monkeypatch.setenv("PYTHONPATH", str(other.parent))
    proc = rlhfctl("validate", str(TINY))
    assert proc.returncode == 0, proc.stderr


def test_validate_accepts_every_example():
    proc = rlhfctl("validate", *map(str, sorted((REPO / "examples").glob("*.yaml"))))
    assert proc.returncode == 0, proc.stderr
    assert "tiny is valid: PPO: sft -> reward -> ppo -> merge" in proc.stdout


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("kind: RLHFRun\nspec: {baseModel: {path: /abs}}\n", "spec.baseModel.path: must be a path relative"),
        ("kind: RLHFRun\nmetadata: {name: x}\nspec: {baseModel: {name: a/b}}\n", "spec.method: method PPO runs"),
        ("kind: Job\n", "kind is 'Job', expected RLHFRun"),
        ("spec: [unclosed\n", "not valid YAML"),
        ("", "no document found"),
        (
            "kind: RLHFRun\nspec: {baseModel: {name: a/b}, sft: {dataset: {name: a/b}, lr: 1}}\n",
            "spec.sft.lr: unknown field",
        ),
    ],
)
def test_validate_names_the_problem_and_fails(tmp_path, content, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    proc = rlhfctl("validate", str(bad))
    assert proc.returncode == 1
    assert expected in proc.stderr


def test_validate_missing_file(tmp_path):
    proc = rlhfctl("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 1 and "cannot read" in proc.stderr


def test_render_emits_a_job_per_enabled_stage(capsys):
    assert main(["render", str(TINY)]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert ("PersistentVolumeClaim", "tiny-workspace") in kinds
    jobs = [name for kind, name in kinds if kind == "Job"]
    assert jobs == ["tiny-sft", "tiny-reward", "tiny-ppo", "tiny-merge"]


def test_render_requests_gpus(tmp_path, capsys):
    doc = yaml.safe_load((REPO / "examples" / "seed-opt-1.3b.yaml").read_text())
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["render", str(path), "--stage", "ppo"]) == 0
    job = next(d for d in yaml.safe_load_all(capsys.readouterr().out) if d["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")


def test_render_unknown_stage_fails(capsys):
    assert main(["render", str(TINY), "--stage", "dpo"]) == 1
    assert "no enabled stage named 'dpo'" in capsys.readouterr().err


def test_status_table_shows_each_stage():
    obj = {
        "spec": {"method": "PPO"},
        "status": {
            "phase": "Running",
            "currentStage": "ppo",
            "progress": "2/4 ppo 40%",
            "stages": [
                {
                    "name": "sft",
                    "phase": "Succeeded",
                    "attempts": 1,
                    "startTime": "2026-01-01T00:00:00Z",
                    "completionTime": "2026-01-01T00:01:05Z",
                    "metrics": {"eval_loss": 1.5},
                },
                {"name": "ppo", "phase": "Failed", "attempts": 3, "message": "exit 1: out of memory"},
            ],
            "conditions": [
                {
                    "type": "Running",
                    "status": "True",
                    "reason": "StageRunning",
                    "message": "ppo",
                    "lastTransitionTime": "2026-01-01T00:01:05Z",
                }
            ],
        },
    }
    text = render_status("tiny", obj)
    assert "phase Running" in text and "progress 2/4 ppo 40%" in text
    assert any(
        line.startswith("sft") and "Succeeded" in line and "1m05s" in line and "eval_loss=1.5" in line
        for line in text.splitlines()
    )
    assert "exit 1: out of memory" in text
    assert "Running=True StageRunning" in text
