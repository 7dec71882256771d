"""Benchmark: per-stage wall time and peak memory of the tiny pipeline, and the overhead of our
stage entrypoint against a plain script that calls the same TRL trainer on the same config.

    PYTHONPATH=operator:stages python benchmarks/stage_overhead.py [--workdir DIR] [--repeats 3]

Prints a table; numbers are whatever this machine gives (2 shared cores here: run it on a quiet
machine). Not a test: nothing is asserted. The overhead goal is <= 1.05x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "stages")]

from rlhf_api.run import RLHFRun  # noqa: E402
from rlhf_operator.cli.local import stage_env, write_invocation  # noqa: E402

# The plain script: the same data, template, model and training arguments, straight into TRL,
# without our config model, data layer, checkpoint callback, manifest or atomic output.
PLAIN_SFT = textwrap.dedent(
    """
    import json, sys
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    assets, out, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rows = [json.loads(l) for l in open(f"{assets}/data/sft.jsonl")]
    tok = AutoTokenizer.from_pretrained(f"{assets}/base-model")
    eos = tok.eos_token
    ds = Dataset.from_list([{"prompt": f"Question: {r['question']}\\n\\nAnswer:",
                             "completion": f" {r['response']}{eos}"} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(f"{assets}/base-model", dtype="float32")
    args = SFTConfig(output_dir=out, learning_rate=6e-3, max_steps=max_steps, per_device_train_batch_size=16,
                     lr_scheduler_type="linear", max_length=64, logging_steps=10, save_strategy="no",
                     bf16=False, use_cpu=True, report_to=[], disable_tqdm=True, completion_only_loss=True,
                     gradient_checkpointing=False, seed=42, dataset_num_proc=None)
    SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()
    model.save_pretrained(f"{out}/model"); tok.save_pretrained(f"{out}/model")
    """
)


def timed_ok(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of a command that must succeed (a failed run would look fast)."""
    seconds, _, code = timed(cmd, env)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {code}")
    return seconds


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MiB) of the child, and its exit code."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.monotonic() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sft-steps", type=int, default=120)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    volume = workdir / "volume"
    env = stage_env(workdir / "result.json")
    subprocess.run(
        [sys.executable, "-m", "rlhf_stages.tiny", "--out", str(volume / "assets")],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    run = RLHFRun.model_validate(yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text()))

    print("stage    wall_s  peak_rss_MiB  (examples/tiny.yaml, one process per stage)")
    for stage in run.spec.pipeline():
        config = write_invocation(run, stage, volume, workdir, "default")
        seconds, rss, code = timed([sys.executable, "-m", "rlhf_stages", stage, "--config", str(config)], env)
        print(f"{stage:<8} {seconds:6.1f}  {rss:12.0f}  exit {code}")

    # Overhead: the same SFT budget through our entrypoint and through the plain script.
    sft = run.spec.sft
    assert sft is not None, "examples/tiny.yaml has an sft section"
    shortened = sft.model_copy(update={"training": sft.training.model_copy(update={"max_steps": args.sft_steps})})
    spec = run.spec.model_copy(update={"sft": shortened})
    ours, plain = [], []
    script = workdir / "plain_sft.py"
    script.write_text(PLAIN_SFT)
    for repeat in range(args.repeats):
        shutil.rmtree(volume / "runs", ignore_errors=True)
        bench_run = run.model_copy(update={"spec": spec})
        config = write_invocation(bench_run, "sft", volume, workdir, "default")
        ours.append(timed_ok([sys.executable, "-m", "rlhf_stages", "sft", "--config", str(config)], env))
        out = workdir / f"plain-{repeat}"
        plain.append(
            timed_ok([sys.executable, str(script), str(volume / "assets"), str(out), str(args.sft_steps)], env)
        )
    ratio = min(ours) / min(plain)
    print(
        f"\nSFT {args.sft_steps} steps, best of {args.repeats}: entrypoint {min(ours):.1f}s, "
        f"plain TRL script {min(plain):.1f}s, ratio {ratio:.3f} (goal <= 1.05)"
    )
    print(json.dumps({"ours_s": ours, "plain_s": plain, "ratio_best": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
