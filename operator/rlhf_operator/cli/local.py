"""``rlhfctl run-local FILE``: the run's stages in order, as local processes, through the same
stage entrypoint the Jobs run (``python -m rlhf_stages <stage> --config ...``).

The volume is a local directory. Re-running reuses a stage's complete output when it was made from
the same settings and inputs, and says so; a stage whose settings (or an earlier stage's output)
changed trains again, its old output moved to ``<run>/superseded/`` with a warning. An interrupted
stage resumes from its last checkpoint if that was written under the same settings (the stage
entrypoint does all of this; docs/stage-protocol.md). Ctrl-C sends SIGTERM to the running stage,
which saves a checkpoint, and stops. Each invocation is a new run (its own uid, ``local-...``), as a
run re-created with the same name on an existing claim would be.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from rlhf_api import layout
from rlhf_api.layout import StageResult
from rlhf_api.run import RLHFRun

from ..dev.controlplane import free_port
from .cluster import watch_lines
from .validate import ManifestError, load_runs

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # operator/ in a checkout; site-packages when installed


@dataclass
class StageRun:
    """What happened to one stage in a local run."""

    stage: str
    status: str  # Succeeded, Skipped, Failed, Interrupted
    seconds: float
    result: dict[str, Any]
    log_file: Path | None = None


def stage_env(result_file: Path) -> dict[str, str]:
    """Environment for a stage process: the source roots importable, results to a local file."""
    roots = [str(SOURCE_ROOT)]
    stages_root = SOURCE_ROOT.parent / "stages"
    if (stages_root / "rlhf_stages").is_dir():
        roots.append(str(stages_root))
    existing = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*roots, *([existing] if existing else [])]),
        layout.TERMINATION_LOG_ENV: str(result_file),
        "PYTHONUNBUFFERED": "1",
    }


def write_invocation(
    run: RLHFRun, stage: str, volume: Path, workdir: Path, namespace: str, uid: str | None = None
) -> Path:
    invocation = layout.StageInvocation(
        stage=stage,
        run=layout.RunRef(namespace=namespace, name=run.metadata.get("name", "run"), uid=uid),
        workspace=str(volume),
        spec=run.spec,
    )
    path = workdir / "invocations" / f"{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(invocation.to_wire(), sort_keys=False))
    return path


class ProgressLine:
    """One self-overwriting progress bar per stage on a terminal; a line every 10 s otherwise."""

    def __init__(self, stage: str, stream: IO[str]) -> None:
        self.stage, self.stream = stage, stream
        self.tty = stream.isatty()
        self.last_print = 0.0

    def update(self, progress: dict[str, Any], elapsed: float) -> None:
        percent = progress.get("percent")
        step, total = progress.get("step", 0), progress.get("totalSteps")
        metrics = progress.get("metrics", {})
        shown = " ".join(f"{k}={v:.3g}" for k, v in list(metrics.items())[:3])
        bar = ""
        if percent is not None:
            filled = int(percent / 5)
            bar = "[" + "#" * filled + "." * (20 - filled) + f"] {percent:3d}% "
        text = f"  {self.stage:<7} {bar}step {step}{f'/{total}' if total else ''} {elapsed:5.0f}s {shown}"
        if self.tty:
            self.stream.write("\r" + text[:110].ljust(110))
            self.stream.flush()
        elif time.monotonic() - self.last_print > 10:
            self.stream.write(text + "\n")
            self.last_print = time.monotonic()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 110 + "\r")


def run_stage(
    run: RLHFRun, stage: str, volume: Path, workdir: Path, namespace: str, python: str, uid: str | None = None
) -> StageRun:
    config = write_invocation(run, stage, volume, workdir, namespace, uid)
    gang = LocalGang(stage, config, workdir, python, _nodes(run, stage))
    run_dir = layout.run_dir(namespace, run.metadata.get("name", "run"))
    progress_file = volume / layout.stage_progress_file(run_dir, stage)
    line = ProgressLine(stage, sys.stderr)
    started = time.monotonic()
    status = "Failed"
    try:
        gang.start()
        while gang.poll() is None:
            time.sleep(0.5)
            if progress_file.exists():
                # OSError/JSONDecodeError: being replaced this instant; the next poll reads it
                with contextlib.suppress(OSError, json.JSONDecodeError):
                    line.update(json.loads(progress_file.read_text()), time.monotonic() - started)
        status = "Succeeded" if gang.poll() == 0 else "Failed"
    except KeyboardInterrupt:
        status = "Interrupted"  # the stop below: each process saves a checkpoint on SIGTERM, run-local resumes
    finally:
        gang.stop()
        line.done()
    return StageRun(stage, status, time.monotonic() - started, gang.result(), gang.log_files[gang.failed_node or 0])


def _nodes(run: RLHFRun, stage: str) -> int:
    section = run.spec.stage(stage)
    resources = getattr(section, "resources", None)
    return int(getattr(resources, "nodes", 1) or 1)


class LocalGang:
    """A stage's processes on this machine: one, or one per node of a multi-node stage.

    ``resources.nodes: N`` runs N stage entrypoints side by side, as the operator's Indexed Job runs N
    Pods: node ranks 0..N-1 given by ``--node-rank``, node 0 found at 127.0.0.1 on a free port, each
    with its own log and termination message (node 0's is the stage's result, as in the cluster). As
    in the cluster the gang lives or dies whole: when one node exits with an error, the others are
    stopped (SIGTERM: they save a checkpoint), instead of waiting out the rendezvous timeout.
    """

    def __init__(self, stage: str, config: Path, workdir: Path, python: str, nodes: int) -> None:
        self.stage, self.config, self.python, self.nodes = stage, config, python, nodes
        suffixes = [""] + [f"-node{rank}" for rank in range(1, nodes)]
        self.result_files = [workdir / "results" / f"{stage}{suffix}.json" for suffix in suffixes]
        self.log_files = [workdir / "logs" / f"{stage}{suffix}.log" for suffix in suffixes]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.failed_node: int | None = None

    def start(self) -> None:
        port = free_port() if self.nodes > 1 else None
        for rank, (result_file, log_file) in enumerate(zip(self.result_files, self.log_files, strict=True)):
            result_file.parent.mkdir(parents=True, exist_ok=True)
            result_file.unlink(missing_ok=True)
            log_file.parent.mkdir(parents=True, exist_ok=True)
            command = [self.python, "-m", "rlhf_stages", self.stage, "--config", str(self.config)]
            env = stage_env(result_file)
            if port is not None:
                command += ["--node-rank", str(rank), "--master-addr", "127.0.0.1"]
                env[layout.RENDEZVOUS_PORT_ENV] = str(port)
            with log_file.open("ab") as log:
                self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))

    def poll(self) -> int | None:
        """None while the gang runs; then node 0's exit code, or the first failed node's."""
        codes = [proc.poll() for proc in self.procs]
        failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None and self.failed_node is None:
            self.failed_node = failed
            self.stop()
            codes = [proc.poll() for proc in self.procs]
        if any(code is None for code in codes):
            return None
        return codes[self.failed_node] if self.failed_node is not None else codes[0]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait()

    def result(self) -> dict[str, Any]:
        """Node 0's termination message; a failed node's when another node failed first."""
        rank = self.failed_node or 0
        files = [self.result_files[rank], self.result_files[0]]
        result: dict[str, Any] = next((json.loads(f.read_text()) for f in files if f.exists()), {})
        if rank and result.get("message"):
            result = {**result, "message": f"node {rank}: {result['message']}"}
        return result


def run_pipeline(
    run: RLHFRun,
    volume: Path,
    workdir: Path,
    namespace: str = "default",
    python: str = sys.executable,
    out: IO[str] = sys.stdout,
) -> list[StageRun]:
    """Runs every enabled stage in order; stops at the first that does not succeed."""
    volume.mkdir(parents=True, exist_ok=True)
    uid = f"local-{uuid.uuid4()}"  # this invocation's run, recorded in manifests and the attempts record
    done: list[StageRun] = []
    for stage in run.spec.pipeline():
        section = run.spec.stage(stage)
        if section is None or not section.enabled:
            print(f"  {stage:<7} skipped (disabled)", file=out)
            done.append(StageRun(stage, "Skipped", 0.0, {}))
            continue
        print(f"  {stage:<7} running (log: {workdir / 'logs' / (stage + '.log')})", file=out, flush=True)
        outcome = run_stage(run, stage, volume, workdir, namespace, python, uid)
        done.append(outcome)
        metrics = outcome.result.get("metrics", {})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:6])
        print(f"  {stage:<7} {outcome.status} in {outcome.seconds:.1f}s {shown}", file=out, flush=True)
        message = outcome.result.get("message")
        if outcome.status == "Succeeded" and message and message != "done":
            # Reuse of an earlier output, or a warning (trained again, old output set aside): said, not silent.
            head, *warnings = message.split("; warning: ")
            for line in ([head] if head != "done" else []) + [f"warning: {w}" for w in warnings]:
                print(f"  {'':<7} {line}", file=out, flush=True)
        if outcome.result.get("stage") == stage:  # the watch: alarms, evaluations, the output chosen
            reported = StageResult.model_validate(outcome.result, strict=False)
            for line in watch_lines(reported.findings, reported.selection_line(), reported.evaluations, indent=10):
                print(line, file=out, flush=True)
        if outcome.status != "Succeeded":
            message = outcome.result.get("message") or _tail(outcome.log_file)
            print(f"  {stage} did not succeed: {message}", file=out)
            break
    return done


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def add_arguments(_: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="an RLHFRun manifest")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".rlhf-local"),
        help="invocations, logs and results go here (default: .rlhf-local)",
    )
    parser.add_argument(
        "--volume",
        type=Path,
        default=None,
        help="the local directory standing in for the shared volume (default: WORKDIR/volume)",
    )
    parser.add_argument("--namespace", default="default", help="namespace used in the run's volume paths")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the stages")


def run(args: Any) -> int:
    try:
        (manifest,) = load_runs(args.file)[:1]
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    workdir = args.workdir.resolve()
    volume = (args.volume or workdir / "volume").resolve()
    print(f"run {manifest.metadata.get('name')} ({manifest.spec.method}) on volume {volume}")
    outcomes = run_pipeline(manifest, volume, workdir, args.namespace, args.python)
    if outcomes and outcomes[-1].status == "Interrupted":
        print("stopped; run the same command again to resume from the last checkpoint")
        return 130
    return 0 if all(o.status in ("Succeeded", "Skipped") for o in outcomes) else 1
