"""The stage's half of live progress: every progress report is also one marker line on stdout,
which the operator reads from the pod log (docs/operator.md "Live progress")."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from conftest import tiny_spec
from rlhf_api.layout import PROGRESS_LOG_MARKER, StageInvocation
from rlhf_operator.observe import Progress, parse_progress, parse_progress_log
from rlhf_stages.runtime.context import StageContext


def context(workspace: Path, rank: int = 0) -> StageContext:
    invocation = StageInvocation.model_validate(
        {
            "apiVersion": "rlhf-operator.io/v1alpha1",
            "kind": "StageInvocation",
            "stage": "sft",
            "run": {"name": "tiny"},
            "workspace": str(workspace),
            "spec": tiny_spec(),
        },
        strict=False,
    )
    ctx = StageContext.create(invocation)
    ctx.rank = rank
    return ctx


def test_each_report_is_one_flushed_marker_line_with_the_file_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = context(tmp_path)
    ctx.write_progress(3, 12, {"loss": 0.5, "lr": 1e-4}, force=True)
    ctx.write_progress(6, 12, {"loss": 0.25}, force=True)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.startswith(PROGRESS_LOG_MARKER + " {") for line in lines)
    assert out.endswith("\n")
    payload = json.loads(lines[-1].removeprefix(PROGRESS_LOG_MARKER + " "))
    assert payload == json.loads(ctx.progress_file.read_text())  # the same report as the file
    # What the operator makes of it: the last line, through the parser of the dev annotation too.
    assert parse_progress_log(out) == Progress(6, 12, {"loss": 0.25})
    assert parse_progress_log(out) == parse_progress(ctx.progress_file.read_text())


def test_the_rate_limit_applies_to_the_line_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = context(tmp_path)
    ctx.write_progress(1, 10)
    ctx.write_progress(2, 10)  # within 2 s of the last report: neither file nor line
    assert [line.split('"step":')[1][:1] for line in capsys.readouterr().out.splitlines()] == ["1"]


def test_only_rank_zero_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    context(tmp_path, rank=1).write_progress(1, 10, force=True)
    assert capsys.readouterr().out == ""


def test_a_closed_stdout_does_not_stop_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr("sys.stdout", closed)
    ctx = context(tmp_path)
    ctx.write_progress(4, 10, force=True)
    assert json.loads(ctx.progress_file.read_text())["step"] == 4


def test_an_alarm_is_reported_at_once_and_in_every_later_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The watch's findings reach the operator with the progress, while the stage trains (docs/watch.md)."""
    ctx = context(tmp_path)
    ctx.write_progress(20, 40, {"loss": 0.5}, force=True)
    finding = "rewardRiseWithCollapse at step 20: " + "x" * 400
    ctx.report_alarms([finding])  # right away, with the last step: not rate-limited, not at the next step
    ctx.report_alarms([finding])  # the same finding again (the next evaluation): nothing new to say
    ctx.write_progress(25, 40, {"loss": 0.4}, force=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    alarm = parse_progress_log(lines[1])
    assert alarm is not None and alarm.step == 20 and alarm.metrics == {"loss": 0.5}
    assert alarm.findings == (finding[:300],)  # cut: a log line, not a report
    later = parse_progress_log(lines[2])
    assert later is not None and later.step == 25 and later.findings == alarm.findings
    assert "findings" not in json.loads(lines[0].removeprefix(PROGRESS_LOG_MARKER + " "))
