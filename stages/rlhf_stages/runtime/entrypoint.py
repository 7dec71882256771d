"""The one entrypoint every stage runs through: ``python -m rlhf_stages <stage> --config FILE``.

What it does, in order (heavy libraries are imported only from step 6 on):

1. load FILE (YAML or JSON) as a ``StageInvocation``; invalid -> field paths on stderr, exit 2;
2. check the stage: registered, in the run's pipeline, enabled (else exit 2);
3. a complete ``<stage>/manifest.json`` made from the same settings and inputs (config hash,
   ``outputs.config_inputs``) -> "already done", reused with a message saying whose it is, exit 0;
   one made from others is moved to ``<run>/superseded/`` (after step 4), with a warning, and the
   stage trains again; so are checkpoints written under another config hash. Then this start is
   recorded in ``<stage>.attempts.json``; more than ``spec.runtime.maxInterruptions`` interrupted
   attempts before it -> exit 2 (``attempts.py``);
4. the stage module's ``validate(ctx)``: cheap checks, e.g. a dataset file is missing -> exit 3,
   quantization on a pod without GPUs -> exit 2;
5. ``--nproc N`` (or ``resources.gpus`` > 1), or ``resources.nodes`` > 1: re-run itself under
   ``torch.distributed.run`` with N processes on this Pod, one per GPU, and report for them
   (``launch.py``; in a multi-node gang only node 0 does step 3's recording and setting aside);
6. ``run(ctx)``: the stage trains, writing into ``ctx.staging_dir`` (rank 0 only);
7. the output is committed atomically with its manifest, checkpoints are removed, a
   ``StageResult`` goes to ``$RLHF_TERMINATION_LOG``; SIGTERM -> checkpoint, exit 143.

How to add a stage (PPO, DPO, GRPO, RLOO, ReST, RLAIF): a module ``rlhf_stages.<name>`` with

    def validate(ctx: StageContext) -> None: ...   # optional; no torch/transformers imports
    def run(ctx: StageContext) -> StageOutcome: ... # import heavy libraries inside

listed in ``STAGES`` below. ``run`` reads its section as ``ctx.config``, writes its output into
``ctx.staging_dir`` (when ``ctx.is_main``), raises ``StageConfigError`` (exit 2) or
``StageInputMissing`` (exit 3) for errors retrying cannot fix, and for Trainer-based training uses
``training.make_trainer``/``run_trainer`` (a ``checkpoints.StageCallback``: resume, SIGTERM,
progress). A custom loop (PPO, ReST) saves through ``checkpoint_dir.CheckpointDir``: it writes
``staging(step)``, then ``publish(step)`` makes it ``checkpoint-<step>``; it resumes from ``latest()``,
checks ``ctx.stop_requested`` each step (save, then raise ``StageInterrupted``) and calls
``ctx.write_progress``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_api import layout
from rlhf_api.layout import StageInvocation, StageResult
from rlhf_api.methods import STAGE_MODULES
from rlhf_api.run import ResolvedInput
from rlhf_api.watch import EVALUATION_ROWS
from rlhf_stages.runtime import launch
from rlhf_stages.runtime.context import EXIT_INTERRUPTED, StageConfigError, StageContext, StageError, StageOutcome
from rlhf_stages.sampling.watch import status_rows

# Stage name -> module (the API's method table). Modules are imported only when their stage runs.
# A copy: tests register a fake stage in place of every module.
STAGES: dict[str, str] = dict(STAGE_MODULES)


def log(message: str) -> None:
    print(f"rlhf-stage: {message}", file=sys.stderr, flush=True)


def _format_errors(exc: Any) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_invocation(path: Path) -> StageInvocation:
    """Parse and validate the config file; every problem is a StageConfigError naming the field.

    YAML, or JSON: a document that starts with ``{`` is read as JSON, because PyYAML (YAML 1.1) reads
    ``1e-05``, JSON's form of a learning rate, as a string, which validation then refuses. Readers
    first: once stage images read JSON right, the operator may write it (a tenth of the CPU of
    rendering YAML when many stages start at once, docs/benchmarks.md).
    """
    import yaml
    from pydantic import ValidationError

    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except OSError as exc:
        raise StageConfigError(f"cannot read config file {path}: {exc}") from exc
    except (yaml.YAMLError, ValueError) as exc:
        raise StageConfigError(f"config file {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise StageConfigError(f"config file {path} must hold a StageInvocation object")
    try:
        return StageInvocation.model_validate(raw)
    except ValidationError as exc:
        raise StageConfigError(f"invalid StageInvocation in {path}:\n{_format_errors(exc)}") from exc


def check_stage(invocation: StageInvocation, requested: str) -> None:
    stage, spec = invocation.stage, invocation.spec
    if requested != stage:
        raise StageConfigError(f"stage: the command runs {requested!r} but the config is for {stage!r}")
    if stage not in STAGES:
        raise StageConfigError(f"stage: unknown stage {stage!r}; known: {', '.join(STAGES)}")
    if stage not in spec.pipeline():
        raise StageConfigError(f"stage: method {spec.method} runs {', '.join(spec.pipeline())}, not {stage}")
    section = spec.stage(stage)
    if section is None:
        raise StageConfigError(f"spec.{stage}: the run has no {stage} section")
    if not section.enabled:
        raise StageConfigError(f"spec.{stage}.enabled: the stage is disabled; the operator should skip it")


def stage_module(stage: str) -> Any:
    try:
        return importlib.import_module(STAGES[stage])
    except ModuleNotFoundError as exc:
        if exc.name == STAGES[stage]:
            raise StageConfigError(f"stage: {stage} is not implemented in this image") from exc
        raise


def _result(
    ctx: StageContext | None, stage: str, code: int, message: str, *, outcome: StageOutcome | None = None, step: int = 0
) -> StageResult:
    notices = (ctx.attempt or {}).get("notices", []) if ctx is not None else []
    if notices:
        message = "; ".join([message, *(f"warning: {n}" for n in notices)])
    return StageResult(
        stage=stage,
        succeeded=code == layout.EXIT_OK,
        step=outcome.step if outcome else step,
        total_steps=outcome.total_steps if outcome else None,
        metrics=outcome.metrics if outcome else {},
        artifact_path=ctx.relative(ctx.output_dir) if ctx is not None and code == layout.EXIT_OK else None,
        message=message,
        exit_code=code,
        findings=[f[:300] for f in outcome.findings[:4]] if outcome else [],
        selected_step=outcome.selected_step if outcome else None,
        selection=outcome.selection if outcome else None,
        evaluations=outcome.evaluations[:EVALUATION_ROWS] if outcome else [],
        published=outcome.published[:4] if outcome else [],
        inputs=[ResolvedInput.model_validate(r) for r in outcome.resolved] if outcome else [],
    )


def _install_sigterm(ctx: StageContext) -> None:
    def handler(signum: int, frame: Any) -> None:
        log("SIGTERM: saving a checkpoint and stopping")
        ctx.stop_requested.set()

    signal.signal(signal.SIGTERM, handler)


def _write_result(result: StageResult) -> None:
    from rlhf_stages.runtime.outputs import write_termination_log

    write_termination_log(result)


def _cpu_threads(quantity: str | None) -> int | None:
    """Whole CPUs in a Kubernetes quantity ("2", "1500m"), at least 1."""
    if not quantity:
        return None
    try:
        cpus = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    except ValueError:
        return None
    return max(1, int(cpus))


def _limit_threads(ctx: StageContext, processes: int) -> None:
    """Match torch's CPU threads to the pod's CPU limit (before torch is imported).

    torch sizes its thread pool by the host's cores, not the container's quota: on a shared
    node that oversubscribes the quota and small models train many times slower.
    """
    threads = _cpu_threads(getattr(ctx.config.resources, "cpu", None))
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, threads // processes))


def _requested_nproc(ctx: StageContext, nproc: int | None) -> int:
    """Processes on this Pod: ``--nproc``, else one per GPU (one on a Pod without GPUs)."""
    if launch.launched_child():
        return 1
    if nproc is not None:
        return nproc
    return max(1, getattr(ctx.config.resources, "gpus", 1))


def _warn(ctx: StageContext, notice: str) -> None:
    """A warning for people: the log, this start's record, and so the manifest and the result."""
    from rlhf_stages.runtime import attempts

    log(f"WARNING: {ctx.stage}: {notice}")
    if ctx.attempt is not None:
        attempts.note(ctx, ctx.attempt, notice)


def _attempt(ctx: StageContext, nproc: int | None, config: Path, gang: launch.Gang) -> int:
    """Steps 3-7 once the invocation is valid; returns the exit code."""
    from rlhf_stages.runtime import attempts, outputs

    stage = ctx.stage
    inputs = outputs.config_inputs(ctx)
    module = stage_module(stage)
    # A stage that resolves its inputs again on every start (the inputs stage: a branch may have moved)
    # neither reuses nor sets aside an earlier output; its commit replaces it.
    existing = None if getattr(module, "RESOLVES_EVERY_START", False) else outputs.existing_output(ctx, inputs)
    if existing is not None and existing.reusable:
        message = outputs.reuse_message(ctx, existing.manifest)
        log(f"{stage}: {message}")
        done = existing.manifest
        watched = done.get("details", {}).get("watch") or {}  # a reused output's alarms still count
        previous = StageOutcome(
            metrics=done.get("metrics", {}),
            step=done.get("step", 0),
            total_steps=done.get("totalSteps"),
            findings=list(watched.get("findings", [])),
            selected_step=watched.get("selectedStep"),
            selection=watched.get("selection"),
            evaluations=status_rows(watched.get("evaluations") or [], watched.get("selectedStep")),
            published=list(done.get("details", {}).get("published") or []),  # a reused upload still says where
        )
        if ctx.is_main:
            _write_result(_result(ctx, stage, 0, message, outcome=previous))
        return layout.EXIT_OK
    # The once-per-attempt work is the launcher's on node 0 (the Pod started it; in a gang the other
    # Pods' processes cannot start before node 0 has done it and joined the rendezvous). Launched
    # processes read the start node 0 recorded.
    top = not launch.launched_child() and gang.leader
    if top:
        ctx.attempt = attempts.begin(ctx, outputs.hash_of(inputs))
    elif launch.launched_child():
        ctx.attempt = attempts.latest(ctx)
    # else: another node's launcher, which neither records nor ends an attempt (node 0's may not be there yet)
    if hasattr(module, "validate"):
        module.validate(ctx)
    if top:  # the valid configuration trains: stale output and checkpoints go aside, said so
        if existing is not None:
            _warn(ctx, outputs.supersede_output(ctx, existing))
        number = ctx.attempt["number"] if ctx.attempt else None
        checkpoint_notice = outputs.claim_checkpoints(ctx, outputs.hash_of(inputs), number)
        if checkpoint_notice:
            _warn(ctx, checkpoint_notice)
    processes = _requested_nproc(ctx, nproc)
    _limit_threads(ctx, processes)
    fsdp = launch.sharding(ctx) == "FSDP"
    if fsdp:
        from rlhf_stages.runtime.training import check_fsdp_placement  # imports torch: only when asked

        check_fsdp_placement(ctx)
    if not launch.launched_child() and (processes > 1 or gang.nodes > 1 or fsdp):
        # FSDP even for one process: the Trainer shards only inside a torch.distributed process group
        # (in a lone process it refuses: "Using fsdp only works in distributed training").
        return launch.run(stage, config, processes, gang, log)
    _install_sigterm(ctx)
    outputs.prepare_staging(ctx)
    outcome = module.run(ctx)
    outputs.commit(ctx, outcome)
    if ctx.is_main:
        shutil.rmtree(ctx.checkpoints_dir, ignore_errors=True)
        ctx.write_progress(outcome.step, outcome.total_steps, outcome.metrics, force=True)
        _write_result(_result(ctx, stage, 0, outcome.message or "done", outcome=outcome))
    log(f"{stage}: done, metrics {outcome.metrics}")
    return layout.EXIT_OK


def _reports(ctx: StageContext | None) -> bool:
    """This process writes the termination message: the process the Pod started, or the first process
    torchrun started on this Pod (for its launcher: the stage's result on node 0, its node's elsewhere)."""
    return ctx is None or (launch.reports_for_launcher() if launch.launched_child() else ctx.is_main)


def execute(
    stage: str, config: Path, nproc: int | None = None, node_rank: int | None = None, master_addr: str | None = None
) -> int:
    """Steps 1-7 of the module docstring; returns the exit code."""
    from rlhf_stages.runtime import attempts

    launch.mark_started()
    ctx: StageContext | None = None
    try:
        invocation = load_invocation(config)
        check_stage(invocation, stage)
        ctx = StageContext.create(invocation)
        gang = launch.gang(ctx, node_rank, master_addr)
        code = _attempt(ctx, nproc, config, gang)
    except StageError as exc:
        log(f"{stage} failed: {exc}")
        step = getattr(exc, "step", 0)
        if _reports(ctx):
            _write_result(_result(ctx, stage, exc.exit_code, str(exc), step=step))
        code = exc.exit_code
    except Exception as exc:  # retried by the Job: report and exit 1
        traceback.print_exc()
        if ctx is not None and ctx.stop_requested.is_set():
            code, message = EXIT_INTERRUPTED, f"stopped by SIGTERM: {type(exc).__name__}: {exc}"
        else:
            code, message = 1, f"{type(exc).__name__}: {exc}"
        if _reports(ctx):
            _write_result(_result(ctx, stage, code, message))
    if ctx is not None and ctx.attempt is not None and not launch.launched_child():
        try:
            attempts.end(ctx, ctx.attempt, code)
        except OSError as exc:  # the record is best effort; the exit code is what the Job acts on
            log(f"cannot record the end of this attempt: {exc}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-stage", description="Run one RLHF pipeline stage.")
    parser.add_argument("stage", help=f"stage to run ({', '.join(STAGES)})")
    parser.add_argument("--config", required=True, type=Path, help="StageInvocation file (YAML or JSON)")
    parser.add_argument(
        "--nproc", type=int, default=None, help="data-parallel processes (default: the stage's resources.gpus)"
    )
    parser.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help=f"this Pod's place in a multi-node stage (default: ${launch.JOB_INDEX_ENV}, set by the Indexed Job)",
    )
    parser.add_argument(
        "--master-addr",
        default=None,
        help="node 0's address in a multi-node stage (default: this Pod's on node 0, else the rendezvous Service's)",
    )
    args = parser.parse_args(argv)
    return execute(args.stage, args.config, args.nproc, args.node_rank, args.master_addr)
