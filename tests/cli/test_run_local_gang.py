"""``rlhfctl run-local`` with ``resources.nodes: 2``: one stage process per node, as the operator's
Indexed Job runs one Pod per node, living and dying together.

The stage processes here are a fake (``--python`` runs the script below, which records how it was
started and answers like a stage): what is tested is the CLI's gang, cheaply. The real launcher on two
processes (rendezvous, gloo, losses against one process) is tests/stages/test_multinode.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.pythonpath import REPO, python_env

FAKE_STAGE = """
import json, os, signal, sys, time
from pathlib import Path

stage, args = sys.argv[3], sys.argv[4:]
rank = int(args[args.index("--node-rank") + 1]) if "--node-rank" in args else None
record = Path(os.environ["FAKE_RECORDS"]) / f"{stage}-{rank}.json"
seen = {"args": args, "port": os.environ.get("RLHF_RENDEZVOUS_PORT")}
record.write_text(json.dumps(seen))

def answer(succeeded, message):
    result = {"stage": stage, "succeeded": succeeded, "metrics": {}, "message": message}
    Path(os.environ["RLHF_TERMINATION_LOG"]).write_text(json.dumps(result))

def on_sigterm(*_):
    record.write_text(json.dumps({**seen, "sigterm": True}))
    answer(False, "stopped by SIGTERM")
    sys.exit(143)

signal.signal(signal.SIGTERM, on_sigterm)
if rank is not None and str(rank) == os.environ.get("FAKE_FAIL_RANK"):
    answer(False, "CUDA out of memory on this node")
    sys.exit(1)
if rank == 0 and os.environ.get("FAKE_FAIL_RANK"):
    time.sleep(120)  # a node 0 waiting for a peer that died: the CLI must stop it
answer(True, "done")
"""


def _run_local(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    run = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    run["spec"]["sft"]["resources"]["nodes"] = 2
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(yaml.safe_dump(run))
    python = tmp_path / "fake-python"
    python.write_text(f"#!{sys.executable}\n{FAKE_STAGE}")
    python.chmod(0o755)
    records = tmp_path / "records"
    records.mkdir()
    work = tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_operator.cli",
            "run-local",
            str(manifest),
            "--workdir",
            str(work),
            "--python",
            str(python),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=python_env() | {"FAKE_RECORDS": str(records), **env},
        cwd=REPO,
    )
    return proc, records


def _record(records: Path, stage: str, rank: int | None) -> dict:
    return json.loads((records / f"{stage}-{rank}.json").read_text())


def test_a_two_node_stage_runs_one_process_per_node(tmp_path: Path) -> None:
    proc, records = _run_local(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nodes = [_record(records, "sft", rank) for rank in (0, 1)]
    for rank, seen in enumerate(nodes):
        assert seen["args"][-4:] == ["--node-rank", str(rank), "--master-addr", "127.0.0.1"], seen
    assert nodes[0]["port"] == nodes[1]["port"] and int(nodes[0]["port"]) > 0  # one rendezvous
    for stage in ("reward", "ppo", "merge"):  # one Pod each: no gang arguments
        assert _record(records, stage, None) == {
            "args": ["--config", str(tmp_path / f"work/invocations/{stage}.yaml")],
            "port": None,
        }
    assert (tmp_path / "work/logs/sft-node1.log").exists() and (tmp_path / "work/results/sft-node1.json").exists()
    assert "sft     Succeeded" in proc.stdout


def test_one_node_failing_stops_the_other_and_names_the_node(tmp_path: Path) -> None:
    proc, records = _run_local(tmp_path, FAKE_FAIL_RANK="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sft did not succeed: node 1: CUDA out of memory on this node" in proc.stdout, proc.stdout
    # Stopped, not left waiting 120 s for its peer (the run-local call would then time out).
    assert _record(records, "sft", 0).get("sigterm") is True
    assert not (records / "reward-None.json").exists()  # the pipeline stopped at the failed stage
