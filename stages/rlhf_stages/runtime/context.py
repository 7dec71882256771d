"""What a stage's ``run`` receives (:class:`StageContext`) and what it returns (:class:`StageOutcome`).

Kept free of torch and friends: the entrypoint builds a context and calls the stage's cheap
``validate`` before anything heavy is imported.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_api import layout
from rlhf_api.layout import StageInvocation
from rlhf_api.timestamps import format_timestamp
from rlhf_api.watch import EvaluationRow
from rlhf_stages.runtime.atomic import write_json_atomic

EXIT_INTERRUPTED = 128 + signal.SIGTERM  # 143, what a shell reports for a SIGTERM'd process


class StageError(Exception):
    """An error with a meaning for the Job's podFailurePolicy (see layout's exit codes)."""

    exit_code = 1


class StageConfigError(StageError):
    """The configuration cannot work (retrying will not help): exit 2."""

    exit_code = layout.EXIT_CONFIG_ERROR


class StageInputMissing(StageError):
    """A dataset, model or earlier stage's output is not there: exit 3."""

    exit_code = layout.EXIT_INPUT_MISSING


class StageInterrupted(StageError):
    """SIGTERM: a checkpoint was saved (when training had started) and the stage stopped: exit 143."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, step: int, checkpoint: str | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (training had not started)"
        super().__init__(f"stopped by SIGTERM at step {step}; {where}")
        self.step = step


@dataclass
class StageOutcome:
    """What a stage's ``run`` returns; the entrypoint turns it into the manifest and the StageResult."""

    metrics: dict[str, float] = field(default_factory=dict)
    """Headline numbers (a few), e.g. ``eval_loss`` or ``eval_accuracy``."""
    step: int = 0
    """Last completed optimisation step."""
    total_steps: int | None = None
    """Planned steps."""
    inputs: dict[str, Any] = field(default_factory=dict)
    """What the stage read (volume-relative paths, hub ids, row counts): recorded in the manifest."""
    details: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping in the manifest (metric history, resume point, ...)."""
    message: str | None = None
    """Summary for humans."""
    findings: list[str] = field(default_factory=list)
    """Reward-hacking alarms (``watch``), for the StageResult and the operator's condition."""
    selected_step: int | None = None
    """The evaluated checkpoint whose weights are the output, when the stage chose one."""
    selection: str | None = None
    """Why that checkpoint."""
    evaluations: list[EvaluationRow] = field(default_factory=list)
    """The watch's evaluations for status (``layout.StageResult.evaluations``)."""
    published: list[str] = field(default_factory=list)
    """Where the result was uploaded (the publish stage's URIs); kept in the manifest as ``details.published``."""
    resolved: list[dict[str, Any]] = field(default_factory=list)
    """The inputs stage: each input's field, source and revision (``layout.StageResult.inputs``)."""
    output_id: str | None = None
    """The manifest's ``outputId``; None: a new random one. A stage whose output is a pure function of
    what it read (inputs) sets it, so that running it again does not make later stages' outputs stale."""


@dataclass
class StageContext:
    """Paths and settings of one stage attempt. All paths are absolute on this machine."""

    invocation: StageInvocation
    workspace: Path
    run_dir: Path
    output_dir: Path
    staging_dir: Path
    checkpoints_dir: Path
    progress_file: Path
    rank: int = 0
    world_size: int = 1
    stop_requested: threading.Event = field(default_factory=threading.Event)
    attempt: dict[str, Any] | None = None
    """This start's entry in ``<stage>.attempts.json`` (number, Pod, notices); see attempts.py."""
    _last_progress: float = 0.0
    _progress_origin: tuple[int, float] | None = None  # (step, time) of the first report, for the ETA
    _last_report: tuple[int, int | None, dict[str, float]] | None = None  # (step, total, metrics)
    alarms: list[str] = field(default_factory=list)
    """The watch's findings so far (docs/watch.md): every progress report carries them, so the operator
    sets RewardHackingSuspected while the stage still trains, not only from its final result."""

    @classmethod
    def create(cls, invocation: StageInvocation) -> StageContext:
        workspace = Path(invocation.workspace)
        run = invocation.run_dir
        stage = invocation.stage
        return cls(
            invocation=invocation,
            workspace=workspace,
            run_dir=workspace / run,
            output_dir=workspace / layout.stage_output(run, stage),
            # In the run directory, so the final rename stays on one filesystem (atomic).
            staging_dir=workspace / run / f".{stage}.partial",
            checkpoints_dir=workspace / layout.stage_checkpoints(run, stage),
            progress_file=workspace / layout.stage_progress_file(run, stage),
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )

    @property
    def stage(self) -> str:
        return self.invocation.stage

    @property
    def spec(self) -> Any:
        return self.invocation.spec

    @property
    def config(self) -> Any:
        """This stage's section of the spec (e.g. an ``SFTStage``)."""
        return self.spec.stage(self.stage)

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes outputs, manifests, progress and results."""
        return self.rank == 0

    def volume_path(self, relative: str | os.PathLike[str]) -> Path:
        """A spec path (relative to the volume root) on this machine."""
        return self.workspace / relative

    def relative(self, path: Path) -> str:
        """A path on this machine as the volume-relative form the operator reports."""
        try:
            return str(path.relative_to(self.workspace))
        except ValueError:
            return str(path)

    def stage_output_of(self, stage: str) -> Path:
        return self.workspace / layout.stage_output(self.invocation.run_dir, stage)

    def write_progress(
        self, step: int, total: int | None, metrics: dict[str, float] | None = None, *, force: bool = False
    ) -> None:
        """Report progress (rank 0 only, at most every 2 s unless forced).

        Twice, with the same JSON: the progress file on the volume (for people and tools that look
        at the volume), and one marker line on stdout, which is what the operator reads, through the
        API server's pod log endpoint (``layout.progress_log_line``; docs/operator.md).
        """
        now = time.monotonic()
        if not self.is_main or (not force and now - self._last_progress < 2.0):
            return
        self._last_progress = now
        self._last_report = (step, total, dict(metrics or {}))
        percent = min(100, int(100 * step / total)) if total else None
        if self._progress_origin is None:
            self._progress_origin = (step, now)  # a resumed run starts at its checkpoint's step
        first_step, first_time = self._progress_origin
        eta = None
        if total and step > first_step:
            eta = int((now - first_time) / (step - first_step) * max(0, total - step))
        body = {
            "stage": self.stage,
            "step": step,
            "totalSteps": total,
            "percent": percent,
            "etaSeconds": eta,
            "metrics": {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)},
            "updatedAt": format_timestamp(),
        }
        if self.alarms:
            body["findings"] = [f[: layout.MAX_FINDING_CHARS] for f in self.alarms[: layout.MAX_PROGRESS_FINDINGS]]
        write_json_atomic(self.progress_file, body)
        print_progress_line(body)

    def report_alarms(self, findings: list[str]) -> None:
        """New findings of the watch: reported now, with the last progress, not at the next step."""
        new = [f for f in findings if f not in self.alarms]
        if not new:
            return
        self.alarms.extend(new)
        step, total, metrics = self._last_report or (0, None, {})
        self.write_progress(step, total, metrics, force=True)


def print_progress_line(body: dict[str, Any]) -> None:
    """One marker line on stdout, flushed now (stdout is block-buffered in a container). Best effort:
    a closed or broken stdout must not stop training."""
    try:
        sys.stdout.write(layout.progress_log_line(body) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):  # ValueError: stdout closed
        pass
