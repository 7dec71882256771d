"""``resources.sharding: FSDP`` on a GPU: train, stop on SIGTERM, resume, and feed the next stage.

The test suite cannot run FSDP (the Trainer shards only on GPUs; CI has none), so this is the check
that it works at all (issue 17), on the tiny task with one GPU per stage:

1. sft with DDP (the reference): 12 steps, a checkpoint every 4;
2. sft with FSDP, the same seed and steps: SIGTERM after its first checkpoint (exit 143, a checkpoint
   saved by the FSDP state-dict path), then a second start that resumes from it and finishes; its
   held-out loss is compared with (1)'s: one process holds every shard, so FSDP must train the
   same model as DDP, up to the numerics of a different reduction order;
3. reward with FSDP on (2)'s policy, and then ppo (which reads both outputs, written from FSDP's
   gathered state dict) for two steps: the outputs are plain weights the next stages can load.

    PYTHONPATH=operator:stages python benchmarks/gpu_fsdp.py --out DIR [--assets DIR] [--allow-cpu]

``--assets``: ``python -m rlhf_stages.tiny --out DIR`` (built here when absent). ``--allow-cpu``
rehearses the script on the CPU with DDP in place of FSDP (the API refuses FSDP without GPUs).
Writes DIR/gpu-fsdp.json and prints what each start did; exit 0 only when every check holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "stages")]

from ppo_vs_trl import stage_env  # noqa: E402  (the stages' environment: project first, offline, no W&B)

STEPS, SAVE_EVERY = 12, 4
LOSS_TOLERANCE = 0.02  # relative: FSDP with one rank reduces in another order than DDP, nothing more
STEP_DELAY_S = "0.3"  # the stages' debug delay per step, so SIGTERM lands between checkpoint 4 and 12


def spec(sharding: str, gpus: int) -> dict[str, Any]:
    """examples/tiny.yaml with few steps, one GPU and ``sharding`` on the stages that offer FSDP."""
    tiny = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())["spec"]
    for name in ("sft", "reward"):
        training = tiny[name]["training"]
        training.pop("numTrainEpochs", None)
        training.update(maxSteps=STEPS, saveSteps=SAVE_EVERY, loggingSteps=2, saveTotalLimit=5)
        tiny[name]["resources"] = {"gpus": gpus, "memory": "8Gi", "sharding": sharding}
    tiny["ppo"].update(totalSteps=2, saveFreq=1, resources={"gpus": gpus, "memory": "8Gi"})
    return tiny


def invocation(ws: Path, run: str, stage: str, run_spec: dict[str, Any]) -> Path:
    config = ws / "configs" / f"{run}-{stage}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    body = {"apiVersion": "rlhf-operator.io/v1alpha1", "kind": "StageInvocation", "stage": stage}
    config.write_text(yaml.safe_dump({**body, "run": {"name": run}, "workspace": str(ws), "spec": run_spec}))
    return config


def start(ws: Path, run: str, stage: str, config: Path, attempt: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_stages", stage, "--config", str(config)],
        env={**stage_env(ws / f"{run}-{stage}-{attempt}.result.json"), **env},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], log: Path, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    log.write_text(out)
    return proc.returncode, out


def manifest(ws: Path, run: str, stage: str) -> dict[str, Any]:
    return json.loads((ws / "runs" / "default" / run / stage / "manifest.json").read_text())


def eval_loss(ws: Path, run: str) -> float:
    """The held-out loss after the last step (the Trainer's train_loss of a resumed start covers
    only the steps after the resume, so it cannot be compared with an uninterrupted run's)."""
    return float(manifest(ws, run, "sft")["metrics"]["eval_loss"])


def interrupted_then_resumed(ws: Path, out: Path, run: str, run_spec: dict[str, Any]) -> dict[str, Any]:
    """sft: SIGTERM once checkpoint-4 is complete, then a second start that must resume and finish."""
    config = invocation(ws, run, "sft", run_spec)
    checkpoints = ws / "runs" / "default" / run / "sft.checkpoints"
    proc = start(ws, run, "sft", config, "a", RLHF_DEBUG_STEP_DELAY_S=STEP_DELAY_S)
    deadline = time.monotonic() + 300
    while not (checkpoints / f"checkpoint-{SAVE_EVERY}").is_dir() and proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            break
        time.sleep(0.2)
    time.sleep(0.5)  # a step or two past the checkpoint, so the SIGTERM checkpoint is a new one
    proc.send_signal(signal.SIGTERM)
    first_code, first = finish(proc, out / f"{run}-sft-a.log")
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    second = start(ws, run, "sft", config, "b")
    second_code, resumed = finish(second, out / f"{run}-sft-b.log")
    newest = saved[-1] if saved else None
    return {
        "sigterm_exit": first_code,
        "checkpoints_after_sigterm": saved,
        "resume_exit": second_code,
        "resumed_from": newest if f"resuming sft from checkpoint-{newest}" in resumed else None,
        "final_step": manifest(ws, run, "sft")["step"] if second_code == 0 else None,
        "tail": (first[-1500:], resumed[-1500:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rlhf-gpu-fsdp"))
    parser.add_argument("--assets", type=Path, default=None)
    parser.add_argument("--allow-cpu", action="store_true", help="rehearse on the CPU, DDP in place of FSDP")
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.allow_cpu:
        print("gpu_fsdp: no CUDA device; --allow-cpu rehearses the script on the CPU", file=sys.stderr)
        return 2
    sharded, gpus = ("FSDP", 1) if gpu else ("DDP", 0)
    ws = args.work
    shutil.rmtree(ws / "runs", ignore_errors=True)  # every start below must train, not reuse
    ws.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    assets = (args.assets or ws / "built-assets").resolve()
    if not (assets / "base-model").exists():
        build = [sys.executable, "-m", "rlhf_stages.tiny", "--out", str(assets)]
        subprocess.run(build, env=stage_env(ws / "unused.json"), cwd=REPO, check=True, capture_output=True)
    if not (ws / "assets").exists():
        (ws / "assets").symlink_to(assets)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if gpu else "CPU (rehearsal)",
        "sharding": sharded,
    }
    checks: dict[str, bool] = {}

    began = time.perf_counter()
    code, _ = finish(
        start(ws, "ddp", "sft", invocation(ws, "ddp", "sft", spec("DDP", gpus)), "a"), args.out / "ddp-sft.log"
    )
    report["ddp_sft"] = {"exit": code, "seconds": round(time.perf_counter() - began, 1)}
    checks["ddp sft finished"] = code == 0

    began = time.perf_counter()
    sharded_spec = spec(sharded, gpus)
    report["fsdp_sft"] = interrupted_then_resumed(ws, args.out, "fsdp", sharded_spec)
    report["fsdp_sft"]["seconds"] = round(time.perf_counter() - began, 1)
    r = report["fsdp_sft"]
    checks["SIGTERM: exit 143 with a checkpoint past the first"] = r["sigterm_exit"] == 143 and bool(
        r["checkpoints_after_sigterm"] and r["checkpoints_after_sigterm"][-1] > SAVE_EVERY
    )
    checks["second start resumed from the newest checkpoint"] = r["resumed_from"] is not None
    checks[f"second start finished at step {STEPS}"] = r["final_step"] == STEPS
    if checks["ddp sft finished"] and r["final_step"] == STEPS:
        ddp, fsdp = eval_loss(ws, "ddp"), eval_loss(ws, "fsdp")
        report["eval_loss"] = {"ddp": ddp, "sharded_resumed": fsdp, "relative_difference": abs(fsdp - ddp) / ddp}
        checks[f"eval loss within {LOSS_TOLERANCE:.0%} of uninterrupted DDP's"] = (
            abs(fsdp - ddp) / ddp <= LOSS_TOLERANCE
        )

    for stage in ("reward", "ppo"):
        began = time.perf_counter()
        code, text = finish(
            start(ws, "fsdp", stage, invocation(ws, "fsdp", stage, sharded_spec), "a"), args.out / f"fsdp-{stage}.log"
        )
        report[f"{stage}_after"] = {"exit": code, "seconds": round(time.perf_counter() - began, 1)}
        if code == 0:
            report[f"{stage}_after"]["metrics"] = manifest(ws, "fsdp", stage)["metrics"]
        else:
            report[f"{stage}_after"]["tail"] = text[-2000:]
        checks[f"{stage} ran on the FSDP outputs"] = code == 0

    report["checks"] = checks
    (args.out / "gpu-fsdp.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "fsdp_sft"}, indent=2, default=str)[:4000])
    print(json.dumps({k: v for k, v in report["fsdp_sft"].items() if k != "tail"}, default=str))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not all(checks.values()):
        for text in report["fsdp_sft"]["tail"]:
            print(text)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
