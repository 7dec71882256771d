"""``rlhfctl run-local`` after an edit: the issue's reproduction (PPO's KL setting edited, then run-local
again) trains PPO and merge again, keeps their old outputs aside and says so; unchanged stages are
reused, saying whose output they reuse.

The real CLI and the real stage entrypoint; the stages themselves do not train (``--python`` runs
tests/stages/fake_stage.py, which registers a stage that writes its settings as its "model").
tests/stages/test_stale_training.py does it with real training.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.pythonpath import REPO, python_env

FAKE_STAGE = REPO / "tests" / "stages" / "fake_stage.py"


def _python(tmp_path: Path) -> Path:
    """An interpreter for ``--python``: called as ``python -m rlhf_stages <stage> --config F``."""
    script = tmp_path / "fake-python"
    script.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {FAKE_STAGE} "$@"\n')
    script.chmod(0o755)
    return script


def _run_local(tmp_path: Path, manifest: Path) -> str:
    work, python = str(tmp_path / "work"), str(_python(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_operator.cli", "run-local", str(manifest), "--workdir", work, "--python", python],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=python_env(),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_edited_setting_retrains_and_keeps_the_old_output_aside(tmp_path: Path) -> None:
    run = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(yaml.safe_dump(run))
    run_dir = tmp_path / "work" / "volume" / "runs" / "default" / "tiny"

    first = _run_local(tmp_path, manifest)
    assert "already done" not in first and "warning" not in first
    uid = json.loads((run_dir / "ppo" / "manifest.json").read_text())["writtenBy"]["runUid"]
    assert uid.startswith("local-")

    # The same file again: nothing trains, and every stage says whose output it reuses.
    again = _run_local(tmp_path, manifest)
    for stage in ("sft", "reward", "ppo", "merge"):
        assert f"already done: reused runs/default/tiny/{stage}, written by an earlier run named tiny (uid {uid})" in (
            again
        )
    assert len((run_dir / "fake-starts.log").read_text().splitlines()) == 4

    # The issue: edit PPO's KL setting and run again.
    run["spec"]["ppo"]["initKlCoef"] = 0.1
    manifest.write_text(yaml.safe_dump(run))
    edited = _run_local(tmp_path, manifest)
    lines = edited.splitlines()
    assert (
        "already done: reused runs/default/tiny/sft" in edited
        and "already done: reused runs/default/tiny/reward" in edited
    )
    ppo_warning = next(line for line in lines if "warning: trained again: the previous ppo output" in line)
    assert "spec.ppo.initKlCoef: 0.3 -> 0.1" in ppo_warning
    merge_warning = next(line for line in lines if "warning: trained again: the previous merge output" in line)
    assert "the ppo stage's output it was made from was replaced" in merge_warning
    assert (run_dir / "fake-starts.log").read_text().splitlines()[4:] == ["ppo 0", "merge 0"]

    aside = {p.name.split("-")[0]: p for p in (run_dir / "superseded").iterdir()}
    assert sorted(aside) == ["merge", "ppo"]
    assert f"runs/default/tiny/superseded/{aside['ppo'].name}" in ppo_warning
    assert json.loads((aside["ppo"] / "model.json").read_text())["initKlCoef"] == 0.3  # the old one, kept
    assert json.loads((run_dir / "ppo" / "model.json").read_text())["initKlCoef"] == 0.1
    assert "trained again" in json.loads((run_dir / "ppo" / "manifest.json").read_text())["details"]["notices"][0]
