"""Benchmark (not a test): our PPO stage against TRL 1.12.0's PPOTrainer on the tiny task.

Both start from the same SFT policy and reward model (this project's sft and reward stages on the
tiny assets), use the same prompts, batch/mini-batch sizes, PPO epochs, learning rate, LoRA, KL
coefficient, clip ranges, missing-EOS penalty, number of steps and seeds, and are evaluated the
same way: one merged policy each, sampled on the HELD-OUT prompts (topics never trained on), scored
by the reward model (prompt + answer + EOS) and by the ground-truth check of the tiny task.

TRL 1.12 is not a project dependency; it runs in a throwaway venv made by
``benchmarks/setup_trl112_env.sh`` (same torch/transformers/peft/accelerate, only TRL differs).

    benchmarks/setup_trl112_env.sh
    PYTHONPATH=operator:stages python benchmarks/ppo_vs_trl.py [--seeds 0 1 2] [--workspace DIR]

Differences that remain (TRL's design, not settings): TRL samples a fixed response length
(responseLength.max; ours samples a budget in [min, max] per response), trains the whole value
model (ours a LoRA adapter plus the score head) and clips no gradients. Both keep the KL
coefficient fixed (examples/tiny.yaml sets adaptiveKl: false).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())["spec"]
TRL_PYTHON = "/root/.cache/rlhf-operator/venv-trl112/bin/python"
RUN = "bench"


def stage_env(result: Path) -> dict[str, str]:
    """``rlhfctl run-local``'s stage environment (the project's source roots before any PYTHONPATH already
    set, such as an offline GPU machine's carried packages; the result file), offline and quiet."""
    from rlhf_operator.cli.local import stage_env as local_stage_env

    return {
        **local_stage_env(result),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        # The same torch thread count on both sides (the tests' setting; the machine may be shared).
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def run_dir(ws: Path) -> Path:
    return ws / "runs" / "default" / RUN


def run_stage(ws: Path, stage: str, spec: dict[str, Any]) -> float:
    config = ws / "configs" / f"{stage}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "rlhf-operator.io/v1alpha1",
                "kind": "StageInvocation",
                "stage": stage,
                "run": {"name": RUN},
                "workspace": str(ws),
                "spec": spec,
            }
        )
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_stages", stage, "--config", str(config)],
        env=stage_env(ws / f"{stage}.result.json"),
        cwd=REPO,
        capture_output=True,
        check=False,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def prepare(ws: Path) -> None:
    """Tiny assets, then SFT and the reward model (skipped when already done)."""
    from rlhf_stages.tiny.assets import build_tiny_assets

    if not (ws / "assets" / "base-model" / "config.json").exists():
        build_tiny_assets(ws / "assets", seed=0)
    for stage in ("sft", "reward"):
        if (run_dir(ws) / stage / "manifest.json").exists():
            continue
        print(f"{stage}: {run_stage(ws, stage, TINY):.0f}s", flush=True)


def run_ours(ws: Path, seed: int, out: Path) -> dict[str, float]:
    for name in ("ppo", "ppo.checkpoints", ".ppo.partial"):
        shutil.rmtree(run_dir(ws) / name, ignore_errors=True)
    spec = json.loads(json.dumps(TINY))
    spec["ppo"]["seed"] = seed
    wall = run_stage(ws, "ppo", spec)
    manifest = json.loads((run_dir(ws) / "ppo" / "manifest.json").read_text())
    shutil.copytree(run_dir(ws) / "ppo" / "adapter", out, dirs_exist_ok=True)
    train = sum(h["step_seconds"] for h in manifest["details"]["history"])
    return {"wall_s": wall, "train_s": train}


def run_trl(ws: Path, seed: int, out: Path, python: str, setup: Path | None = None) -> dict[str, float]:
    """TRL's PPOTrainer in the TRL venv; ``setup``: a JSON file of :func:`trl_worker`'s keyword arguments."""
    started = time.perf_counter()
    extra = ["--worker-setup", str(setup)] if setup is not None else []
    proc = subprocess.run(
        [python, __file__, "--trl-worker", "--workspace", str(ws), "--seed", str(seed), "--out", str(out), *extra],
        env=stage_env(ws / "trl.result.json"),
        cwd=REPO,
        capture_output=True,
        check=False,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"TRL worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    times = json.loads((out / "times.json").read_text())
    return {"wall_s": time.perf_counter() - started, "train_s": times["train_s"]}


def trl_worker(
    ws: Path,
    seed: int,
    out: Path,
    ppo: dict[str, Any] | None = None,
    policy_path: str | None = None,
    reward_path: str | None = None,
    use_cpu: bool = True,
    precision: dict[str, bool] | None = None,
) -> None:
    """Runs inside the TRL 1.12 venv: PPOTrainer with the settings of a ppo section (examples/tiny.yaml's
    unless given) from ``policy_path`` against ``reward_path`` (this run's sft and reward outputs unless
    given). ``use_cpu=False`` and ``precision`` (e.g. ``{"bf16": False, "gradient_checkpointing": False}``,
    as our stage trains) for the GPU benchmark (benchmarks/gpu.py); unset, PPOConfig's defaults stay
    (bf16 and gradient checkpointing on)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf_stages.tiny.assets import read_jsonl

    p = TINY["ppo"] if ppo is None else ppo
    lora = p.get("lora", {})
    sft = policy_path or str(run_dir(ws) / "sft" / "model")
    reward = reward_path or str(run_dir(ws) / "reward" / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(sft))
    template = p.get("promptTemplate", "Question: {prompt}\n\nAnswer:")
    rows = read_jsonl(ws / p["dataset"]["path"])
    ids = [tokenizer(template.format_map(r))["input_ids"] for r in rows]
    train = Dataset.from_dict({"input_ids": ids})
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_pretrained(str(sft))
    value = AutoModelForSequenceClassification.from_pretrained(str(reward), num_labels=1)
    rm = AutoModelForSequenceClassification.from_pretrained(str(reward), num_labels=1)
    batch, mini = p["batchSize"], p["miniBatchSize"]
    args = PPOConfig(
        output_dir=str(out / "trl-output"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=batch // mini,
        num_ppo_epochs=p["ppoEpochs"],
        learning_rate=p["learningRate"],
        lr_scheduler_type="constant",
        total_episodes=p["totalSteps"] * batch,
        response_length=p.get("responseLength", {}).get("max", 32),
        stop_token="eos",
        missing_eos_penalty=p.get("missingEosPenalty", 1.0),
        kl_coef=p.get("initKlCoef", 0.2),
        cliprange=p.get("clipRange", 0.2),
        cliprange_value=p.get("clipRangeValue", 0.2),
        vf_coef=p.get("valueLossCoef", 0.1),
        gamma=p.get("gamma", 1.0),
        lam=p.get("lam", 0.95),
        temperature=p.get("generation", {}).get("temperature", 1.0),
        seed=seed,
        save_strategy="no",
        report_to=[],
        num_sample_generations=0,
        use_cpu=use_cpu,
        disable_tqdm=True,
        logging_steps=5,
        per_device_eval_batch_size=8,
        **(precision or {}),
    )
    peft_config = LoraConfig(
        r=lora.get("r", 16),
        lora_alpha=lora.get("alpha", 32),
        lora_dropout=lora.get("dropout", 0.05),
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=rm,
        train_dataset=train,
        value_model=value,
        eval_dataset=train.select(range(8)),
        peft_config=peft_config,
    )
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    trainer.model.policy.save_pretrained(str(out))
    (out / "times.json").write_text(json.dumps({"train_s": train_s}))


def evaluate(ws: Path, adapter: Path | None, samples: int) -> dict[str, float]:
    """Held-out reward (EOS penalty as in training) and ground-truth rate of one policy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_stages.tiny.evaluate import evaluate_policy, load_prompts

    sft = run_dir(ws) / "sft" / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(sft))
    policy = AutoModelForCausalLM.from_pretrained(str(sft))
    if adapter is not None:
        policy = PeftModel.from_pretrained(policy, str(adapter)).merge_and_unload()
    rm = AutoModelForSequenceClassification.from_pretrained(str(run_dir(ws) / "reward" / "model"), num_labels=1)
    prompts = load_prompts(ws / "assets" / "data" / "eval_prompts.jsonl")
    s = evaluate_policy(
        policy,
        tokenizer,
        prompts,
        reward_model=rm,
        seed=1234,
        samples_per_prompt=samples,
        max_new_tokens=TINY["ppo"].get("responseLength", {}).get("max", 32),
    )
    # The reward PPO maximised: the missing-EOS penalty applies to answers cut off at the budget.
    penalty = TINY["ppo"].get("missingEosPenalty", 1.0) * (1.0 - s["eos_rate"])
    return {"reward": s["reward_mean"] - penalty, "target_rate": s["target_rate"], "eos_rate": s["eos_rate"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/ppo-vs-trl"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trl-python", default=TRL_PYTHON)
    parser.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-setup", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--trl-precision-defaults",
        action="store_true",
        help="keep PPOConfig's own bf16 and gradient checkpointing (on) instead of float32 without "
        "checkpointing as our stage trains (how the 2026-11-22 table ran)",
    )
    args = parser.parse_args()
    ws = args.workspace.resolve()
    if args.trl_worker:
        setup = json.loads(args.worker_setup.read_text()) if args.worker_setup else {}
        trl_worker(ws, args.seed, args.out, **setup)
        return 0

    prepare(ws)
    # Like for like by default: TRL 1.12's PPOConfig turns on bf16 and gradient checkpointing unless
    # told otherwise (also on the CPU), while our stage trains in float32 without checkpointing.
    setup = None
    if not args.trl_precision_defaults:
        setup = ws / "trl-setup.json"
        setup.write_text(json.dumps({"precision": {"bf16": False, "gradient_checkpointing": False}}))
    rows: list[dict[str, Any]] = [{"impl": "sft", "seed": "-", **evaluate(ws, None, args.eval_samples)}]
    for seed in args.seeds:
        for impl in ("ours", "trl-1.12"):
            out = ws / "results" / f"{impl}-s{seed}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            timing = run_ours(ws, seed, out) if impl == "ours" else run_trl(ws, seed, out, args.trl_python, setup)
            row = {"impl": impl, "seed": seed, **evaluate(ws, out, args.eval_samples), **timing}
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'impl':10} {'seed':>4} {'reward':>8} {'target':>7} {'eos':>5} {'train_s':>8} {'wall_s':>7}")
    for r in rows:
        print(
            f"{r['impl']:10} {r['seed']!s:>4} {r['reward']:8.3f} {r['target_rate']:7.3f} {r['eos_rate']:5.2f} "
            f"{r.get('train_s', float('nan')):8.1f} {r.get('wall_s', float('nan')):7.1f}"
        )
    for impl in ("ours", "trl-1.12"):
        mine = [r for r in rows if r["impl"] == impl]
        if mine:
            mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("reward", "target_rate", "train_s", "wall_s")}
            print(
                f"{impl:10} mean reward {mean['reward']:.3f} target {mean['target_rate']:.3f} "
                f"train {mean['train_s']:.1f}s wall {mean['wall_s']:.1f}s"
            )
    (ws / "results" / "summary.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
