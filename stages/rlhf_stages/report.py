"""The run report: did alignment work? Markdown with PNG plots, and the same figures as JSON.

    python -m rlhf_stages.report --run-dir DIR --before eval-sft.json --after eval-merged.json \
        [--timings timings.json] --out REPORT_DIR

Reads the stage manifests in the run directory (metrics and per-step history) and two
evaluations from ``rlhf_stages.tiny.evaluate`` (the SFT policy and the aligned policy on the same
held-out prompts), and writes ``report.md``, ``report.json`` and ``*.png``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_api.methods import ALIGNED_POLICY_STAGES
from rlhf_api.watch import ANSWER_SIGNALS, shape_only_note

# Curves worth plotting per stage: (history key, label). The first key a stage has is used.
CURVES: dict[str, list[tuple[str, str]]] = {
    "sft": [("loss", "SFT training loss")],
    "reward": [("loss", "reward-model training loss")],
    "ppo": [("reward_mean", "PPO mean reward"), ("kl", "PPO KL to reference"), ("value_loss", "PPO value loss")],
    "dpo": [("loss", "DPO loss")],
    "grpo": [("reward", "GRPO reward")],
    "rloo": [("reward", "RLOO reward")],
    "rest": [("reward_mean", "ReST reward")],
}


def read_manifests(run_dir: Path) -> dict[str, dict[str, Any]]:
    manifests = {}
    for path in sorted(run_dir.glob("*/manifest.json")):
        manifests[path.parent.name] = json.loads(path.read_text())
    return manifests


def history_of(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    details = manifest.get("details") or {}
    history = details.get("history") or details.get("log_history") or []
    return [h for h in history if isinstance(h, dict)]


def series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for index, entry in enumerate(history):
        value = entry.get(key)
        if isinstance(value, int | float):
            xs.append(float(entry.get("step", index + 1)))
            ys.append(float(value))
    return xs, ys


def plot(xs: Sequence[float], ys: Sequence[float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or in a pod
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(xs, ys, marker="." if len(xs) < 60 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_report(
    run_dir: Path, before: dict[str, Any], after: dict[str, Any], timings: dict[str, float], out: Path
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    manifests = read_manifests(run_dir)
    plots: list[dict[str, str]] = []
    for stage, curves in CURVES.items():
        history = history_of(manifests.get(stage, {}))
        for key, title in curves:
            xs, ys = series(history, key)
            if len(xs) >= 2:
                name = f"{stage}_{key}.png"
                plot(xs, ys, title, out / name)
                plots.append({"stage": stage, "metric": key, "file": name})

    def pick(evaluation: dict[str, Any]) -> dict[str, float]:
        keys = ("reward_mean", "reward_std", "target_rate", "ground_truth_mean", "eos_rate", "mean_length_tokens")
        return {k: float(evaluation[k]) for k in keys if isinstance(evaluation.get(k), int | float)}

    reward_metrics = manifests.get("reward", {}).get("metrics", {})
    policy_stage = next((s for s in ALIGNED_POLICY_STAGES if s in manifests), None)
    report = {
        "stages": {
            s: {"metrics": m.get("metrics", {}), "step": m.get("step"), "seconds": timings.get(s)}
            for s, m in manifests.items()
        },
        "reward_model_eval_accuracy": reward_metrics.get("eval_accuracy"),
        "policy_stage": policy_stage,
        "policy_final_kl": manifests.get(policy_stage or "", {}).get("metrics", {}).get("kl"),
        "heldout": {"sft": pick(before), "aligned": pick(after)},
        "improvement": {
            # No reward model in the run (DPO, RLAIF then DPO): only the ground truth compares them.
            "reward_mean": None
            if before.get("reward_mean") is None or after.get("reward_mean") is None
            else float(after["reward_mean"]) - float(before["reward_mean"]),
            "target_rate": float(after["target_rate"]) - float(before["target_rate"]),
        },
        "labelling": {k: v for k, v in manifests.get("rlaif", {}).get("metrics", {}).items() if k in RLAIF_HEADLINES},
        "samples": {"sft": before.get("samples", [])[:5], "aligned": after.get("samples", [])[:5]},
        "plots": plots,
        "timings_seconds": timings,
        "watch": watch_of(run_dir, policy_stage, manifests, out, plots),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "report.md").write_text(render_markdown(report))
    return report


WATCH_CURVES = (
    ("score_mean", "held-out reward-model score"),
    ("length_mean", "held-out answer length (tokens)"),
    ("kl_mean", "held-out KL to the reference (nats)"),
    ("distinct_2", "held-out distinct-2"),
    ("preference_accuracy", "held-out preference accuracy"),
    ("check_pass_rate", "held-out answers passing every check"),
    ("judge_win_rate", "judge's win rate over the starting policy's answers"),
)


def watch_of(
    run_dir: Path, stage: str | None, manifests: dict[str, Any], out: Path, plots: list[dict[str, str]]
) -> dict[str, Any] | None:
    """The policy stage's watch (docs/watch.md): settings, findings, the checkpoint chosen, the evaluation
    table with its samples (from the stage's evaluation log), and its curves (appended to ``plots``)."""
    watched = ((manifests.get(stage or "") or {}).get("details") or {}).get("watch")
    if not watched:
        return None
    log = run_dir / str(stage) / str(watched.get("log", ""))
    records = [json.loads(line) for line in log.read_text().splitlines() if line] if log.is_file() else []
    for key, title in WATCH_CURVES:
        xs, ys = series(records, key)
        if len(xs) >= 2:
            name = f"{stage}_watch_{key}.png"
            plot(xs, ys, title, out / name)
            plots.append({"stage": str(stage), "metric": f"watch {key}", "file": name})
    return {**watched, "samples": {str(r["step"]): r.get("samples", []) for r in records}}


RLAIF_HEADLINES = ("pairs_labelled", "pairs_judged", "agreement_rate", "first_position_rate")


def _fmt(value: Any, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, int | float) else "n/a"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    sft, aligned = report["heldout"]["sft"], report["heldout"]["aligned"]
    lines = [
        "# RLHF run report",
        "",
        f"Held-out prompts (topics never seen in training). Policy stage: `{report['policy_stage']}`.",
        "",
        "| | SFT policy | aligned policy | change |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("reward_mean", "reward-model score (mean)"),
        ("target_rate", "ground-truth target rate"),
        ("eos_rate", "ends with EOS"),
        ("mean_length_tokens", "mean length (tokens)"),
    ):
        a, b = sft.get(key), aligned.get(key)
        change = _fmt(b - a, "+.3f") if isinstance(a, float) and isinstance(b, float) else "n/a"
        lines.append(f"| {label} | {_fmt(a)} | {_fmt(b)} | {change} |")
    lines += [
        "",
        f"Reward model held-out pair accuracy: **{_fmt(report['reward_model_eval_accuracy'])}**. "
        f"Final KL to the reference: **{_fmt(report['policy_final_kl'])}**.",
        "",
    ]
    labelling = report.get("labelling") or {}
    if labelling:
        lines += [
            f"RLAIF judge: **{_fmt(labelling.get('pairs_labelled'), '.0f')}** of "
            f"{_fmt(labelling.get('pairs_judged'), '.0f')} pairs labelled (both orders agreeing: "
            f"{_fmt(labelling.get('agreement_rate'), '.2f')}; verdicts for the first-shown answer: "
            f"{_fmt(labelling.get('first_position_rate'), '.2f')}).",
            "",
        ]
    lines += [
        "## Stages",
        "",
        "| stage | wall time (s) | headline metrics |",
        "|---|---|---|",
    ]
    for stage, info in report["stages"].items():
        metrics = ", ".join(f"{k}={_fmt(v, '.4g')}" for k, v in list(info["metrics"].items())[:6])
        lines.append(f"| {stage} | {_fmt(info['seconds'], '.1f')} | {_cell(metrics)} |")
    lines += watch_markdown(report.get("watch"))
    if report["plots"]:
        lines += ["", "## Curves", ""]
        lines += [f"![{p['stage']} {p['metric']}]({p['file']})" for p in report["plots"]]
    lines += ["", "## Samples (same held-out prompts)", "", "| prompt | SFT policy | aligned policy |", "|---|---|---|"]
    for before, after in zip(report["samples"]["sft"], report["samples"]["aligned"], strict=False):
        lines.append(
            f"| {_cell(before.get('prompt', ''))} | {_cell(before.get('text', ''))} | {_cell(after.get('text', ''))} |"
        )
    return "\n".join(lines) + "\n"


def watch_markdown(watched: dict[str, Any] | None) -> list[str]:
    if not watched:
        return []
    lines = ["", "## Reward-hacking watch", ""]
    findings = watched.get("findings") or []
    table = watched.get("evaluations") or []
    measured = {key for row in table for key, value in row.items() if value is not None}
    note = shape_only_note(measured)
    quiet = f"No detector fired: {note}." if note else "No detector fired (docs/watch.md says what they cannot see)."
    lines.append(f"**ALARM**: {'; '.join(findings)}" if findings else quiet)
    lines += ["", f"Output: step {watched.get('selectedStep')} ({watched.get('selection')}).", ""]
    # The optional signals get a column only when this run measured them (a preference set, checks).
    columns = [k for k in WATCH_TABLE if k not in WATCH_OPTIONAL or any(e.get(k) is not None for e in table)]
    lines += [
        "| step | " + " | ".join(WATCH_TABLE[k] for k in columns) + " | |",
        "|---|" + "---|" * len(columns) + "---|",
    ]
    for e in table:
        marks = ", ".join(
            m for m, on in (("alarm", e.get("alarm")), ("output", e.get("step") == watched.get("selectedStep"))) if on
        )
        lines.append(f"| {e.get('step')} | " + " | ".join(_fmt(e.get(k)) for k in columns) + f" | {marks} |")
    samples = watched.get("samples") or {}
    if samples:
        lines += ["", "Sample answers per evaluation:", "", "| step | prompt | answer | score |", "|---|---|---|---|"]
        for step, kept in samples.items():
            for s in kept:
                failed = f" (fails {', '.join(s['failed_checks'])})" if s.get("failed_checks") else ""
                lines.append(
                    f"| {step} | {_cell(s['prompt'])} | {_cell(s['answer'])}{_cell(failed)} | {_fmt(s['score'])} |"
                )
    return lines


# The evaluation table's columns (the manifest's details.watch.evaluations keys) and their headings.
WATCH_TABLE = {
    "score_mean": "score",
    "score_std": "score sd",
    "kl_mean": "KL",
    "length_mean": "length",
    "eos_rate": "EOS",
    "distinct_2": "distinct-2",
    "preference_accuracy": "preference accuracy",
    "check_pass_rate": "checks passed",
    "judge_win_rate": "judge win rate",
}
WATCH_OPTIONAL = tuple(ANSWER_SIGNALS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--before", type=Path, required=True, help="evaluation JSON of the SFT policy")
    parser.add_argument("--after", type=Path, required=True, help="evaluation JSON of the aligned policy")
    parser.add_argument("--timings", type=Path, default=None, help="JSON of stage -> seconds")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    timings = json.loads(args.timings.read_text()) if args.timings else {}
    build_report(
        args.run_dir, json.loads(args.before.read_text()), json.loads(args.after.read_text()), timings, args.out
    )
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
