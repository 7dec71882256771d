"""Fixtures for the stage tests: one set of tiny assets per session, invocations, stage runs."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.pythonpath import PYTHON_PATH, REPO

TINY_SPEC: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())["spec"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume with the tiny assets under ``assets/`` (as examples/tiny.yaml expects)."""
    from rlhf_stages.tiny.assets import build_tiny_assets

    root = tmp_path_factory.mktemp("volume")
    build_tiny_assets(root / "assets", seed=0)
    return root


def standin_reward_model(workspace: Path, where: str) -> None:
    """A reward model for tests about a stage's mechanics, not its learning: the tiny base model read as
    a scorer (an untrained score head, seeded), saved once at ``where`` on the session's volume."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    target = workspace / where
    if not target.is_dir():
        base = workspace / "assets" / "base-model"
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(target)
        AutoTokenizer.from_pretrained(base).save_pretrained(target)


def tiny_spec(**sections: Any) -> dict[str, Any]:
    """examples/tiny.yaml's spec with sections merged in (None deletes a key)."""
    spec = copy.deepcopy(TINY_SPEC)
    _merge(spec, sections)
    return spec


def _merge(into: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def write_invocation(workspace: Path, stage: str, run: str, spec: dict[str, Any], **extra: Any) -> Path:
    body = {
        "apiVersion": "rlhf-operator.io/v1alpha1",
        "kind": "StageInvocation",
        "stage": stage,
        "run": {"name": run},
        "workspace": str(workspace),
        "spec": spec,
        **extra,
    }
    path = workspace / "configs" / f"{run}-{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body))
    return path


def run_dir(workspace: Path, run: str) -> Path:
    return workspace / "runs" / "default" / run


def stage_env(result_file: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RLHF_ALLOW_CPU_QUANTIZATION", "RLHF_DEBUG_STEP_DELAY_S")}
    env.update(
        {
            "PYTHONPATH": PYTHON_PATH,
            "RLHF_TERMINATION_LOG": str(result_file),
            "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
    )
    env.update(extra)
    return env


def start_stage(stage: str, config: Path, result_file: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_stages", stage, "--config", str(config), *args],
        env=stage_env(result_file, **env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_stage(
    stage: str, config: Path, result_file: Path, *args: str, timeout: float = 300, **env: str
) -> tuple[int, str]:
    """Run ``python -m rlhf_stages`` as a real subprocess; returns (exit code, output)."""
    proc = start_stage(stage, config, result_file, *args, **env)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def read_result(result_file: Path) -> dict[str, Any]:
    text = result_file.read_text()
    assert len(text.encode()) <= 4096
    return json.loads(text)


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Run stages in this process (faster: no repeated imports); restores the SIGTERM handler."""
    result = tmp_path / "result.json"
    monkeypatch.setenv("RLHF_TERMINATION_LOG", str(result))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("RLHF_ALLOW_CPU_QUANTIZATION", raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    yield result
    signal.signal(signal.SIGTERM, previous)
