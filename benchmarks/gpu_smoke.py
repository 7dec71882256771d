"""Every method's tiny example on a GPU, end to end: do the stages run on CUDA at all?

The test suite runs every stage on the CPU only (CI has no GPU), so code that mixes devices passes
there and fails on the first GPU: the PPO stage did (``global_sum`` stacked CUDA statistics with CPU
counters), found by benchmarks/gpu.py on an H200. This runs examples/tiny*.yaml (PPO, DPO, GRPO, RLOO,
ReST, RLAIF) with ``rlhfctl run-local``, side by side, with ``resources.gpus: 1`` and few steps, and
reports each stage's outcome and the processes nvidia-smi saw on the GPU. Not a learning check
(the suite's CPU tests are): steps are cut to keep a GPU machine's time short.

    PYTHONPATH=operator:stages python benchmarks/gpu_smoke.py --out DIR [--assets DIR] [--only PPO] [--sharding FSDP]

``--assets``: the output of ``python -m rlhf_stages.tiny --out DIR --judge`` (built here when absent).
Without CUDA it runs on the CPU, which checks the script only (exit 2 unless --allow-cpu).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "stages")]

from ppo_vs_trl import stage_env  # noqa: E402  (the stages' environment: project first, offline, no W&B)

SHORT_TRAINER_STEPS = 6  # Trainer-based stages (sft, reward, dpo, rest's improve steps)
SHORT_POLICY_STEPS = 4  # PPO, GRPO, RLOO


def shortened(manifest: dict[str, Any], sharding: str = "DDP") -> dict[str, Any]:
    """The example on one GPU per stage, with few steps; ``sharding`` on the stages that offer it."""
    from rlhf_api.methods import STAGE_KINDS

    spec = manifest["spec"]
    for name, section in spec.items():
        if not isinstance(section, dict):
            continue
        if "resources" in section:
            section["resources"]["gpus"] = 1
            if name in STAGE_KINDS and sharding in STAGE_KINDS[name].shardings:
                section["resources"]["sharding"] = sharding
        if "training" in section:
            section["training"].pop("numTrainEpochs", None)
            section["training"]["maxSteps"] = SHORT_TRAINER_STEPS
            section["training"]["saveSteps"] = SHORT_TRAINER_STEPS
        if "totalSteps" in section:
            section["totalSteps"] = SHORT_POLICY_STEPS
            section["saveFreq"] = 2
        if "growSteps" in section:
            section["growSteps"] = 1
    return manifest


def run_example(example: Path, work: Path, assets: Path, sharding: str) -> dict[str, Any]:
    manifest = shortened(yaml.safe_load(example.read_text()), sharding)
    method = manifest["spec"]["method"]
    root = work / method.lower()
    volume = root / "volume"
    volume.mkdir(parents=True, exist_ok=True)
    if not (volume / "assets").exists():
        (volume / "assets").symlink_to(assets)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(manifest))
    started = time.perf_counter()
    command = [sys.executable, "-m", "rlhf_operator.cli", "run-local", str(path), "--workdir", str(root / "work")]
    proc = subprocess.run(
        [*command, "--volume", str(volume)],
        env=stage_env(root / "unused.result.json"),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    (root / "run-local.log").write_text(proc.stdout + proc.stderr)
    return {
        "method": method,
        "exit": proc.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "output": (proc.stdout + proc.stderr)[-2500:],
    }


def sample_gpu_processes(stop: threading.Event, seen: dict[int, int]) -> None:
    """Every second, the processes on the GPU and their memory (MiB): proof the stages used it."""
    while not stop.wait(1.0):
        proc = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in proc.stdout.splitlines():
            pid, mib = (int(x) for x in line.split(","))
            seen[pid] = max(seen.get(pid, 0), mib)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="summary JSON and logs go here")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rlhf-gpu-smoke"))
    parser.add_argument("--assets", type=Path, default=None, help="tiny assets (built with --judge when absent)")
    parser.add_argument("--only", default="", help="comma-separated methods (default: every examples/tiny*.yaml)")
    parser.add_argument(
        "--sharding", default="DDP", choices=["DDP", "FSDP"], help="resources.sharding where a stage offers it"
    )
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (checks the script only)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_smoke: no CUDA device; --allow-cpu runs it on the CPU to check the script", file=sys.stderr)
        return 2
    assets = (args.assets or args.work / "assets").resolve()
    if not (assets / "base-model").exists():
        build = [sys.executable, "-m", "rlhf_stages.tiny", "--out", str(assets), "--judge"]
        subprocess.run(build, env=stage_env(args.work / "unused.json"), cwd=REPO, check=True, capture_output=True)
    examples = sorted(REPO.glob("examples/tiny*.yaml"))
    wanted = {m.strip().upper() for m in args.only.split(",") if m.strip()}
    if wanted:
        examples = [e for e in examples if yaml.safe_load(e.read_text())["spec"]["method"].upper() in wanted]
    seen: dict[int, int] = {}
    stop = threading.Event()
    sampler = None
    if torch.cuda.is_available():
        sampler = threading.Thread(target=sample_gpu_processes, args=(stop, seen), daemon=True)
        sampler.start()
    with ThreadPoolExecutor(len(examples)) as pool:
        results = list(pool.map(lambda e: run_example(e, args.work, assets, args.sharding), examples))
    stop.set()
    if sampler is not None:
        sampler.join()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU", "runs": results}
    summary["gpu_processes"] = {"count": len(seen), "peak_mib": max(seen.values(), default=0)}
    (args.out / "gpu-smoke.json").write_text(json.dumps(summary, indent=2))
    for r in results:
        print(f"== {r['method']}: exit {r['exit']} in {r['seconds']} s\n{r['output'][-1200:]}")
    print(f"GPU processes seen: {len(seen)}, peak {max(seen.values(), default=0)} MiB")
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
