"""A stage that does not train, for tests of the real entrypoint (reuse, stale outputs, checkpoints,
the interruption bound) in milliseconds.

Registered in place of every stage's module (``entrypoint.STAGES``), in-process by the tests, or by
running this file as the stage command (``python tests/stages/fake_stage.py <stage> --config F``).
Its "training" is ``FAKE_STEPS`` (default 4) steps, each leaving a complete
``checkpoint-<step>`` under ``ctx.checkpoints_dir``; it resumes from the newest one, and stops on
SIGTERM as a real stage does (checkpoint, exit 143). ``<volume>/fake-stage.json`` may set
``{"<stage>": {"steps": N, "stepSeconds": S}}`` for stage processes whose environment a test cannot
set (the local kubelet's). Environment:

* ``FAKE_STOP_AT=N``: behave as if SIGTERM came at step N: save, raise StageInterrupted (exit 143);
* ``FAKE_CRASH=1``: raise an ordinary error (exit 1, what the Job counts against backoffLimit);
* ``FAKE_KILL=1``: SIGKILL itself mid-training (no recorded end, as after an OOM kill);
* ``FAKE_INPUT_MISSING=1``: ``validate`` raises StageInputMissing (exit 3).

Every start that reaches ``run`` appends ``<stage> <resume step>`` to ``<run>/fake-starts.log``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for root in (REPO, REPO / "operator", REPO / "stages"):
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

from rlhf_stages.runtime.context import StageContext, StageInputMissing, StageInterrupted, StageOutcome  # noqa: E402

MODULE = "tests.stages.fake_stage"


def validate(ctx: StageContext) -> None:
    if os.environ.get("FAKE_INPUT_MISSING"):
        raise StageInputMissing(f"{ctx.stage}: fake missing input")


def _latest(ctx: StageContext) -> int:
    if not ctx.checkpoints_dir.is_dir():
        return 0
    steps = [int(p.name.split("-")[1]) for p in ctx.checkpoints_dir.glob("checkpoint-*") if p.is_dir()]
    return max(steps, default=0)


def run(ctx: StageContext) -> StageOutcome:
    settings_file = ctx.workspace / "fake-stage.json"
    settings = json.loads(settings_file.read_text()).get(ctx.stage, {}) if settings_file.exists() else {}
    total = int(os.environ.get("FAKE_STEPS", settings.get("steps", 4)))
    step_seconds = float(settings.get("stepSeconds", 0))
    start = _latest(ctx)
    with (ctx.run_dir / "fake-starts.log").open("a") as log:
        log.write(f"{ctx.stage} {start}\n")
    stop_at = int(os.environ.get("FAKE_STOP_AT", "-1"))
    for step in range(start + 1, total + 1):
        if os.environ.get("FAKE_CRASH"):
            raise RuntimeError("fake crash")
        if os.environ.get("FAKE_KILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint = ctx.checkpoints_dir / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True, exist_ok=True)
        (checkpoint / "state.json").write_text(json.dumps({"step": step}))
        ctx.write_progress(step, total)
        if step == stop_at or ctx.stop_requested.is_set():
            raise StageInterrupted(step, checkpoint.name)
        time.sleep(step_seconds)
    (ctx.staging_dir / "model.json").write_text(json.dumps(ctx.config.to_wire(), sort_keys=True))
    return StageOutcome(
        metrics={"loss": 1.0 / total}, step=total, total_steps=total, details={"resumedFromStep": start}
    )


def register() -> None:
    """Make the real entrypoint run this module for every stage."""
    from rlhf_stages.runtime import entrypoint

    for stage in entrypoint.STAGES:
        entrypoint.STAGES[stage] = MODULE


if __name__ == "__main__":
    from rlhf_stages.runtime.entrypoint import main

    register()
    sys.exit(main(sys.argv[1:]))
