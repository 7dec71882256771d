"""``rlhfctl quickstart``: a complete RLHF run on a tiny model, on this machine's CPU, with a report.

1. builds a tiny model, tokenizer and synthetic data with a known target behaviour (no hub);
2. runs ``examples/tiny.yaml`` (or ``--file``, any tiny example: DPO, ReST, GRPO, RLOO, RLAIF, whose
   tiny judge it trains first) through ``run-local`` (SFT, reward model, PPO, merge);
3. evaluates the SFT policy and the final merged policy on held-out prompts (unseen topics) with
   the run's reward model (when it has one) and the ground-truth check;
4. writes ``report/report.md`` with plots and ``report/report.json`` with the same figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rlhf_api import layout

from .local import SOURCE_ROOT, run_pipeline, stage_env
from .validate import ManifestError, load_runs

DEFAULT_EXAMPLE = SOURCE_ROOT.parent / "examples" / "tiny.yaml"
EVAL_SAMPLES_PER_PROMPT = 4


def _python_module(python: str, module: str, *args: str, log: Path) -> None:
    with log.open("ab") as out:
        proc = subprocess.run(
            [python, "-m", module, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=stage_env(log.with_suffix(".result.json")),
            check=False,
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"python -m {module} failed (exit {proc.returncode}); log {log}:\n{tail}")


def build_assets(volume: Path, python: str, log: Path) -> Path:
    assets = volume / "assets"
    if (assets / "base-model" / "config.json").exists():
        print(f"  assets  reused ({assets})")
        return assets
    started = time.monotonic()
    _python_module(python, "rlhf_stages.tiny", "--out", str(assets), log=log)
    print(f"  assets  built in {time.monotonic() - started:.1f}s ({assets})")
    return assets


def build_judge(manifest: Any, volume: Path, python: str, log: Path) -> None:
    """Method RLAIF with the tiny judge (``rlaif.judge.path: assets/judge``): train it once."""
    rlaif = manifest.spec.rlaif if manifest.spec.method == "RLAIF" else None
    if rlaif is None or rlaif.judge.path is None or Path(rlaif.judge.path) != Path("assets") / "judge":
        return
    judge = volume / rlaif.judge.path
    if (judge / "config.json").exists():
        print(f"  judge   reused ({judge})")
        return
    started = time.monotonic()
    _python_module(python, "rlhf_stages.tiny.judge", "--assets", str(volume / "assets"), log=log)
    print(f"  judge   trained in {time.monotonic() - started:.1f}s ({judge})")


def evaluate(
    python: str, policy: Path, reward_model: Path | None, prompts: Path, out: Path, log: Path
) -> dict[str, Any]:
    scorer = ["--reward-model", str(reward_model)] if reward_model is not None else []
    _python_module(
        python,
        "rlhf_stages.tiny.evaluate",
        "--policy",
        str(policy),
        *scorer,
        "--prompts",
        str(prompts),
        "--samples-per-prompt",
        str(EVAL_SAMPLES_PER_PROMPT),
        "--seed",
        "0",
        "--json",
        str(out),
        log=log,
    )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def add_arguments(_: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".quickstart"),
        help="volume, logs and the report go here (default: .quickstart)",
    )
    parser.add_argument(
        "--file", type=Path, default=DEFAULT_EXAMPLE, help="the RLHFRun to run (default: examples/tiny.yaml)"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the stages")


def run(args: Any) -> int:
    started = time.monotonic()
    try:
        (manifest,) = load_runs(args.file)[:1]
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    workdir = args.workdir.resolve()
    volume = workdir / "volume"
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"quickstart: {args.file} -> {workdir}")
    assets = build_assets(volume, args.python, logs / "assets.log")
    build_judge(manifest, volume, args.python, logs / "judge.log")

    outcomes = run_pipeline(manifest, volume, workdir, "default", args.python)
    if any(o.status not in ("Succeeded", "Skipped") for o in outcomes):
        return 130 if outcomes[-1].status == "Interrupted" else 1

    run_dir = volume / layout.run_dir("default", manifest.metadata.get("name", "run"))
    # Runs without a reward stage (DPO, RLAIF then DPO) are compared on the ground truth alone.
    trained_reward_model = run_dir / "reward" / "model"
    reward_model = trained_reward_model if trained_reward_model.is_dir() else None
    prompts = assets / "data" / "eval_prompts.jsonl"
    print("  eval    held-out prompts: SFT policy vs aligned (merged) policy")
    before = evaluate(
        args.python, run_dir / "sft" / "model", reward_model, prompts, workdir / "eval-sft.json", logs / "eval.log"
    )
    after = evaluate(
        args.python, run_dir / "merge" / "model", reward_model, prompts, workdir / "eval-merged.json", logs / "eval.log"
    )
    timings = {o.stage: round(o.seconds, 1) for o in outcomes}
    (workdir / "timings.json").write_text(json.dumps(timings))
    report_dir = workdir / "report"
    _python_module(
        args.python,
        "rlhf_stages.report",
        "--run-dir",
        str(run_dir),
        "--before",
        str(workdir / "eval-sft.json"),
        "--after",
        str(workdir / "eval-merged.json"),
        "--timings",
        str(workdir / "timings.json"),
        "--out",
        str(report_dir),
        log=logs / "report.log",
    )

    def score(summary: dict[str, Any]) -> str:
        return "n/a" if summary.get("reward_mean") is None else f"{summary['reward_mean']:+.3f}"

    print(
        f"\n  held-out reward      SFT {score(before)}  ->  aligned {score(after)}\n"
        f"  ground-truth rate    SFT {before['target_rate']:.2f}    ->  aligned {after['target_rate']:.2f}\n"
        f"  EOS rate             SFT {before['eos_rate']:.2f}    ->  aligned {after['eos_rate']:.2f}\n"
        f"\nreport: {report_dir / 'report.md'} (and report.json, plots)\n"
        f"total {time.monotonic() - started:.0f}s"
    )
    return 0
