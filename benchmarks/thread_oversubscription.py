"""Benchmark: torch's CPU thread count for a tiny training step, alone and beside busy processes.

    PYTHONPATH=operator:stages python benchmarks/thread_oversubscription.py [--steps 200] [--busy 2]

Why it exists: a stage Pod without a CPU limit lets torch size its thread pool by the node's cores.
When other processes want those cores too (other stage Pods, or the three test processes of
tests/run_suite.py on a 2-core machine), the extra OpenMP threads spin while they wait for each
other, and the step costs more CPU and more time than with one thread. This prints, for each thread
count, the wall time and the CPU time (user + system) of the same training steps on the tiny task's
model, once on a quiet machine and once beside ``--busy`` processes that spin. Not a test: nothing is
asserted; run it on a machine that is otherwise quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One training run in a fresh interpreter, so that OMP_NUM_THREADS takes effect before torch starts.
TRAIN = """
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
batch = torch.randint(0, model.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(0))
started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
for _ in range(int(sys.argv[2])):
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
print(json.dumps({"threads": torch.get_num_threads(), "wall": time.perf_counter() - started, "cpu": cpu}))
"""


def train(model: Path, steps: int, threads: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, "-c", TRAIN, str(model), str(steps)], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside the training (default: 2)")
    parser.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="thread counts to compare")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    thread_counts = sorted({int(t) for t in args.threads.split(",")})

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "rlhf_stages.tiny", "--out", tmp],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'stages'}"},
        )
        model = Path(tmp) / "base-model"
        print(f"{args.steps} steps, batch 16 x 64 tokens, {os.cpu_count()} cores")
        print(f"{'load':<12}{'threads':>8}{'wall s':>10}{'cpu s':>10}")
        for load in (0, args.busy):
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
            try:
                for threads in thread_counts:
                    runs = [train(model, args.steps, threads) for _ in range(args.repeats)]
                    wall = sum(r["wall"] for r in runs) / len(runs)
                    cpu = sum(r["cpu"] for r in runs) / len(runs)
                    print(f"{f'{load} busy':<12}{threads:>8}{wall:>10.2f}{cpu:>10.2f}")
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()


if __name__ == "__main__":
    main()
