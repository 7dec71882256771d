"""A stage's processes under ``torch.distributed.run``: several on one Pod, or a gang of Pods.

One Pod (``resources.nodes`` 1): ``--nproc N`` or ``resources.gpus`` > 1 starts N processes with
torchrun's ``--standalone`` rendezvous.

A gang (``resources.nodes`` N > 1; docs/stage-protocol.md "Multi-node stages"): the operator runs
the stage as an Indexed Job of N Pods and a Service in front of Pod 0. Every Pod's entrypoint starts
torchrun with the static rendezvous (``--nnodes N --node-rank R``), even for one process per Pod:

* node rank R: ``JOB_COMPLETION_INDEX`` (the Job controller sets it in every Pod), or ``--node-rank``;
* the master: node 0 listens at its own address (``RLHF_POD_IP``, 127.0.0.1 when unset); the others
  reach it through the Service, at the address the kubelet puts in ``<SERVICE>_SERVICE_HOST``
  (clusters without DNS), else by the Service's name; ``--master-addr`` overrides both;
* the port: ``RLHF_RENDEZVOUS_PORT`` (default 29400);
* the bound: ``RLHF_RENDEZVOUS_TIMEOUT_S`` (default 600 s). A gang whose Pods do not all join within
  it (one never scheduled, a Pod that cannot reach node 0) fails with exit 1 and a message naming
  the missing nodes, instead of waiting for ever.

Global rank 0 (node 0's first process) is the stage's main process: it alone writes outputs,
checkpoints, progress and the stage's result. Every Pod's launcher writes a termination message: node
0's is the stage's result (its rank 0's, relayed), the others' say which node they were and how their
processes ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_api import layout
from rlhf_api.layout import StageResult
from rlhf_stages.runtime.context import StageConfigError, StageContext

# The names the operator sets are the API's (layout.py), shared with the operator's children.py.
JOB_INDEX_ENV = layout.JOB_COMPLETION_INDEX_ENV
SERVICE_ENV = layout.RENDEZVOUS_SERVICE_ENV
PORT_ENV = layout.RENDEZVOUS_PORT_ENV
POD_IP_ENV = layout.POD_IP_ENV
DEFAULT_PORT = layout.RENDEZVOUS_PORT

TIMEOUT_ENV = "RLHF_RENDEZVOUS_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600
"""Long enough for the Pods of a gang to pull a multi-GiB stage image at different speeds and for node
0 to record its start first; short enough that a Pod that is never scheduled fails the gang in minutes."""

CHILD_ENV = "RLHF_NPROC_CHILD"
"""Set in every process the launcher starts (torchrun passes the environment on)."""
STARTED_ENV = "RLHF_LAUNCH_STARTED_FILE"
"""A file each started process creates: none there after torchrun failed = the rendezvous never completed."""


def launched_child() -> bool:
    """One of the processes a launcher started (not the process the Pod started)."""
    return bool(os.environ.get(CHILD_ENV)) or "LOCAL_RANK" in os.environ


def reports_for_launcher() -> bool:
    """This launched process writes a result for its Pod's launcher: the first process on each Pod
    (global rank 0 on node 0, whose result is the stage's; on the other nodes, their exit code's reason)."""
    return launched_child() and os.environ.get("LOCAL_RANK", "0") == "0"


def mark_started() -> None:
    """Tell this Pod's launcher that torchrun's rendezvous completed and this process runs."""
    started = os.environ.get(STARTED_ENV)
    if started and launched_child():
        with contextlib.suppress(OSError):  # only the launcher's failure message depends on it
            Path(started).touch()


def nodes(ctx: StageContext) -> int:
    """``resources.nodes``: the Pods the stage runs on."""
    return int(ctx.config.resources.nodes)


def sharding(ctx: StageContext) -> str:
    """``resources.sharding``: ``DDP`` or ``FSDP``."""
    return str(ctx.config.resources.sharding)


@dataclass(frozen=True)
class Gang:
    """Where this Pod stands in a multi-node stage."""

    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    timeout_s: int

    @property
    def leader(self) -> bool:
        """Node 0: records the attempt, sets stale outputs aside, hosts the rendezvous, reports the result."""
        return self.node_rank == 0

    def describe(self) -> str:
        return f"node {self.node_rank} of {self.nodes}"


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise StageConfigError(f"{name}={raw!r} is not a whole number") from None


def gang(ctx: StageContext, node_rank: int | None = None, master_addr: str | None = None) -> Gang:
    """This Pod's place in the gang, from the operator's env (or the CLI overrides, for local runs)."""
    count = nodes(ctx)
    where = f"spec.{ctx.stage}.resources.nodes"
    if launched_child():  # torchrun has placed this process: its node rank and master are in the env
        port = _int_env("MASTER_PORT", DEFAULT_PORT)
        return Gang(count, _int_env("GROUP_RANK", 0), os.environ.get("MASTER_ADDR", ""), port, DEFAULT_TIMEOUT_S)
    if count == 1 and node_rank is None:  # one Pod: nothing of a gang's env is read
        return Gang(1, 0, "", DEFAULT_PORT, DEFAULT_TIMEOUT_S)
    if node_rank is None:
        raw = os.environ.get(JOB_INDEX_ENV)
        if count > 1 and raw is None:
            raise StageConfigError(
                f"{where} is {count}, but {JOB_INDEX_ENV} is not set: the operator runs a multi-node stage "
                "as an Indexed Job, which sets it; to run one node by hand, pass --node-rank"
            )
        node_rank = _int_env(JOB_INDEX_ENV, 0)
    if not 0 <= node_rank < count:
        raise StageConfigError(f"node rank {node_rank} is outside 0..{count - 1} ({where} is {count})")
    if master_addr is None:
        if node_rank == 0:
            master_addr = os.environ.get(POD_IP_ENV) or "127.0.0.1"
        else:
            service = os.environ.get(SERVICE_ENV)
            if not service:
                raise StageConfigError(
                    f"{where} is {count}, but {SERVICE_ENV} is not set: node {node_rank} cannot find node 0 "
                    "(the operator sets it; by hand, pass --master-addr)"
                )
            master_addr = os.environ.get(layout.service_host_env(service)) or service
    timeout = _int_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    if timeout < 1:
        raise StageConfigError(f"{TIMEOUT_ENV} must be at least 1 second")
    return Gang(count, node_rank, master_addr, _int_env(PORT_ENV, DEFAULT_PORT), timeout)


def torchrun_command(stage: str, config: Path, nproc: int, gang: Gang) -> list[str]:
    """The torchrun command line: standalone for one Pod, the static rendezvous for a gang."""
    if gang.nodes == 1:
        where = ["--standalone"]
    else:
        where = [
            f"--nnodes={gang.nodes}",
            f"--node-rank={gang.node_rank}",
            f"--master-addr={gang.master_addr}",
            f"--master-port={gang.master_port}",
            # The static rendezvous' TCPStore waits this long for every node (node 0) or for node 0 (the others).
            f"--rdzv-conf=timeout={gang.timeout_s}",
            # A lost node fails the gang; the operator restarts it whole (docs/stage-protocol.md).
            "--max-restarts=0",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        f"--nproc-per-node={nproc}",
        "-m",
        "rlhf_stages",
        stage,
        "--config",
        str(config),
    ]


def _write_result(result: StageResult) -> None:
    from rlhf_stages.runtime.outputs import write_termination_log

    write_termination_log(result)


def _read_result(path: Path) -> StageResult | None:
    if not (path.exists() and path.stat().st_size):
        return None
    try:
        return StageResult.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def rendezvous_failure(gang: Gang) -> str:
    """What went wrong when torchrun failed before any process started, for this node's message."""
    bound = f"within {gang.timeout_s} s ({TIMEOUT_ENV})"
    if gang.leader:
        # torchrun's static rendezvous counts the nodes that joined ("1/3 clients joined", in its log
        # above) but does not say which; with two nodes the missing one is known.
        missing = "node 1" if gang.nodes == 2 else f"one or more of nodes 1..{gang.nodes - 1}"
        return (
            f"rendezvous failed: not every node of the {gang.nodes}-node gang joined node 0 at "
            f"{gang.master_addr}:{gang.master_port} {bound}; missing: {missing} (its Pod never started, or "
            "cannot reach this Pod: kubectl get pods -l batch.kubernetes.io/job-completion-index)"
        )
    return (
        f"rendezvous failed: node {gang.node_rank} of {gang.nodes} could not complete the rendezvous with "
        f"node 0 at {gang.master_addr}:{gang.master_port} {bound}; missing: node 0, or another node of the "
        "gang that node 0 still waits for"
    )


def _workers(torchrun: subprocess.Popen[bytes]) -> list[int]:
    """The processes torchrun started (its children), or none when it has not started them yet."""
    try:
        listed = Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text(encoding="ascii")
    except OSError:
        return []
    return [int(pid) for pid in listed.split()]


def _stop(torchrun: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the Pod's, on PID 1) to the ranks themselves: they agree on a step, rank 0 saves a
    checkpoint, they exit 143, and torchrun then ends. Sent to torchrun instead, it would give them 30 s
    (torch's fixed shutdown timeout) and then SIGKILL, too short for a large model's checkpoint."""
    workers = _workers(torchrun)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if not workers:  # still at the rendezvous: nothing to save
        torchrun.send_signal(signal.SIGTERM)


def run(stage: str, config: Path, nproc: int, gang: Gang, log: Any) -> int:
    """Run the stage's processes under torchrun, then write this Pod's termination message; returns
    the exit code (rank 0's own code where it reported one: 2, 3 and 143 keep their meaning)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file, started = Path(tmp) / "result.json", Path(tmp) / "started"
        env = {
            **os.environ,
            layout.TERMINATION_LOG_ENV: str(result_file),
            CHILD_ENV: "1",
            STARTED_ENV: str(started),
        }
        cmd = torchrun_command(stage, config, nproc, gang)
        log(f"launching {nproc} processes{'' if gang.nodes == 1 else ' as ' + gang.describe()}: {' '.join(cmd)}")
        began = time.monotonic()
        child = subprocess.Popen(cmd, env=env)
        signal.signal(signal.SIGTERM, lambda s, f: _stop(child))
        code = child.wait()
        code = 128 - code if code < 0 else code  # killed by a signal
        ours = _read_result(result_file)
        if code and ours is not None and ours.exit_code:
            code = ours.exit_code  # torchrun exits 1 whatever failed
        if code and ours is None and gang.nodes > 1 and not started.exists():
            message = rendezvous_failure(gang)
            if time.monotonic() - began < gang.timeout_s:  # not the bound: torchrun itself failed
                message = (
                    f"torchrun failed (exit {code}) before the stage's processes started, after "
                    f"{time.monotonic() - began:.0f} s (see its log above); {message}"
                )
            log(f"{stage}: {gang.describe()}: {message}")
            ours = StageResult(stage=stage, succeeded=False, exit_code=code, message=message)
        if gang.leader:
            if ours is not None:
                _write_result(ours.model_copy(update={"exit_code": code, "succeeded": code == 0}))
            else:  # rank 0 died before reporting
                code = code or 1
                message = f"distributed launch failed with exit code {code}"
                _write_result(StageResult(stage=stage, succeeded=False, exit_code=code, message=message))
        else:
            how = "its processes finished" if code == 0 else f"exit {code}: {ours.message if ours else 'see its log'}"
            message = f"{gang.describe()} (Pod {socket.gethostname()}): {how}; node 0 reports the stage's result"
            _write_result(StageResult(stage=stage, succeeded=code == 0, exit_code=code, message=message[:3000]))
        return code
