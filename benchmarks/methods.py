"""Compare the alignment methods on the tiny task: held-out reward, ground truth, wall time, peak RSS.

    PYTHONPATH=operator:stages python benchmarks/methods.py [--workspace DIR] [--methods DPO,GRPO] [--seeds 0,1,2]

Uses the harness of the method tests (tests/stages/methods_support.py): one base run (SFT and an
independent reward model) on a volume of tiny assets, then each method's stage from its
examples/tiny-<method>.yaml once per seed, started from that same SFT policy. Each policy is scored
on the held-out prompts (unseen topics, 2 samples per prompt, fixed sampling seed) by the base run's
reward model (prompt + completion + EOS) and by the ground-truth check. Wall time and peak RSS are
those of the stage process alone. Prints a Markdown table (the one in docs/methods.md) and, with
``--json``, writes every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "stages"), str(REPO / "tests" / "stages")]

import methods_support as ms  # noqa: E402

# method -> (stage, stages of the method to run before it in the same run)
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "DPO": ("dpo", ()),
    "GRPO": ("grpo", ()),
    "RLOO": ("rloo", ()),
    "ReST": ("rest", ()),
    # The labelling stage runs first in the same run; its time and memory count towards RLAIF's.
    "RLAIF": ("dpo", ("rlaif",)),
}


def seed_changes(method: str, stage: str, seed: int) -> dict[str, Any]:
    """Where each method's seed lives in its section."""
    if method in ("GRPO", "RLOO"):
        return {stage: {"seed": seed}}
    if method == "RLAIF":
        return {"rlaif": {"seed": seed}, stage: {"training": {"seed": seed}}}
    return {stage: {"training": {"seed": seed}}}


def seconds(run: ms.MethodRun) -> float:
    """Wall time of the method's stages (for RLAIF: labelling and DPO)."""
    return run.stage.seconds + sum(s.seconds for s in run.extra.values())


def peak_rss(run: ms.MethodRun) -> float:
    return max([run.stage.peak_rss_mib, *(s.peak_rss_mib for s in run.extra.values())])


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def table(sft: ms.Evaluation, results: dict[str, list[ms.MethodRun]]) -> str:
    """The Markdown table of docs/methods.md: mean ± sd over seeds, peak RSS the maximum."""
    columns = ("reward_mean", "target_rate", "ground_truth_mean", "not_positive_rate", "off_topic_rate", "eos_rate")
    lines = [
        "| method | held-out reward | ground-truth target rate | ground truth (graded) | not-positive rate "
        "| off-topic rate | EOS rate | wall time (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
        "| SFT (start) | " + " | ".join(f"{getattr(sft, c):.2f}" for c in columns) + " | – | – |",
    ]
    for method, runs in results.items():
        cells = [_mean_sd([getattr(r.evaluation, c) for r in runs]) for c in columns]
        cells += [_mean_sd([seconds(r) for r in runs]), f"{max(peak_rss(r) for r in runs):.0f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/rlhf-methods-bench"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    ms.ensure_base(args.workspace)
    if "RLAIF" in args.methods.split(","):
        print(f"tiny judge: {ms.ensure_judge(args.workspace)}", flush=True)
    sft = ms.sft_evaluation(args.workspace)
    results: dict[str, list[ms.MethodRun]] = {}
    for method in args.methods.split(","):
        stage, before = METHODS[method]
        for seed in (int(s) for s in args.seeds.split(",")):
            run = ms.run_method(args.workspace, method, stage, seed, seed_changes(method, stage, seed), before=before)
            results.setdefault(method, []).append(run)
            print(ms.summary_line(method, sft, run), flush=True)
    print(table(sft, results))
    if args.json is not None:
        body = {
            m: [
                {
                    "seed": r.seed,
                    "seconds": seconds(r),
                    "peakRssMiB": peak_rss(r),
                    "metrics": r.stage.result.get("metrics", {}),
                    "eval": {k: v for k, v in vars(r.evaluation).items() if k != "details"},
                }
                for r in runs
            ]
            for m, runs in results.items()
        }
        body["SFT"] = [{"eval": {k: v for k, v in vars(sft).items() if k != "details"}}]
        args.json.write_text(json.dumps(body, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
