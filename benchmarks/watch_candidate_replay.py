"""Which checkpoint each recorded watch run would output for other ``watch.candidateLengthRatio``
values: the watch's own selection (rlhf_stages.sampling.watch.select) replayed over the evaluation
logs that benchmarks/watch_seeds.py recorded, no training. Exact for ``warn`` runs: their training
does not depend on the selection. The ground truth of a kept step is known where some recorded run
kept or stopped at that step (the default runs, and the ``lengthRatio`` 0.85 ``stop`` runs); "?"
elsewhere: the ``warn`` runs keep no other weights.

    PYTHONPATH=operator:stages python benchmarks/watch_candidate_replay.py \
        benchmarks/results/2026-12-01-watch-seeds/watch-seeds.json \
        benchmarks/results/2026-12-01-watch-seeds/watch-seeds-lr085-stop.json --ratios 0,0.85,0.9,0.95
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rlhf_api.watch import Watch
from rlhf_stages.sampling.watch import select


def known_ground_truth(reports: list[dict[str, Any]]) -> dict[tuple[str, str, int, int], float]:
    """(method, reward, seed, step) -> ground-truth target rate, from every report's kept and final weights."""
    known: dict[tuple[str, str, int, int], float] = {}
    for report in reports:
        for run in report["runs"]:
            key = (run["method"], run["reward"], run["seed"])
            known[(*key, int(run["kept_step"]))] = run["gt_kept"]["target_rate"]
            known[(*key, int(run["step"]))] = run["gt_final"]["target_rate"]
    return known


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recorded", type=Path, help="watch_seeds.py's JSON of the default (warn) runs")
    parser.add_argument("others", type=Path, nargs="*", help="more watch_seeds.py JSONs: ground truth of more steps")
    parser.add_argument("--ratios", default="0,0.85,0.9,0.95")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    recorded = json.loads(args.recorded.read_text())
    known = known_ground_truth([recorded, *(json.loads(p.read_text()) for p in args.others)])
    print("| method | reward | seed | alarm | " + " | ".join(f"{r:g}: kept (length x, GT)" for r in ratios) + " |")
    print("|---|---|---|---|" + "---|" * len(ratios))
    sums: dict[float, list[float]] = {r: [] for r in ratios}
    for run in recorded["runs"]:
        history = [{"repetition": 0.0, **e} for e in run["evaluations"]]  # logs before repetition was kept
        base = history[0]
        cells = []
        for ratio in ratios:
            step, _ = select(history, Watch(candidate_length_ratio=ratio), int(run["step"]))
            kept = next(e for e in history if int(e["step"]) == step)
            gt = known.get((run["method"], run["reward"], run["seed"], step))
            if gt is not None and run["reward"] == "hole":
                sums[ratio].append(gt)
            shown = "?" if gt is None else f"{gt:.2f}"
            cells.append(f"{step} ({kept['length_mean'] / base['length_mean']:.2f}, {shown})")
        alarm = run["first_finding_step"] if run["first_finding_step"] is not None else "none"
        print(f"| {run['method']} | {run['reward']} | {run['seed']} | {alarm} | " + " | ".join(cells) + " |")
    for ratio, values in sums.items():
        mean = sum(values) / len(values) if values else float("nan")
        print(f"candidateLengthRatio {ratio:g}: hole runs with a known GT {len(values)}, mean GT kept {mean:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
