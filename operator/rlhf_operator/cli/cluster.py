"""``rlhfctl status NAME`` and ``rlhfctl logs NAME --stage S``: a run on a cluster, for humans."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rlhf_api.names import GROUP, LEGACY_JOB_NAME_LABEL, PLURAL, VERSION
from rlhf_api.run import RLHFRunStatus
from rlhf_api.timestamps import parse_timestamp
from rlhf_api.watch import ANSWER_SIGNALS, EvaluationRow, shape_only_note
from rlhf_operator import children


def _clients(kubeconfig: str | None, context: str | None) -> Any:
    from kubernetes import client, config

    config.load_kube_config(config_file=kubeconfig, context=context)
    return client


def _seconds_between(start: str | None, end: str | None) -> str:
    begin = parse_timestamp(start)
    if begin is None:
        return "-"
    finish = parse_timestamp(end) or datetime.now(UTC)
    seconds = int((finish - begin).total_seconds())
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def render_status(name: str, obj: dict[str, Any]) -> str:
    """A readable table of a run's status (pure: tested without a cluster)."""
    status = RLHFRunStatus.model_validate(obj.get("status") or {}, strict=False)
    spec = obj.get("spec", {})
    lines = [
        f"run {name}  method {spec.get('method', 'PPO')}  phase {status.phase}"
        f"  stage {status.current_stage or '-'}  progress {status.progress or '-'}",
    ]
    if status.output_model:
        lines.append(f"output model: {status.output_model}")
    lines += [f"published: {uri}" for uri in status.published]
    header = f"{'STAGE':<8} {'PHASE':<10} {'TRIES':>5} {'TIME':>8} {'PROGRESS':>9}  METRICS"
    lines += ["", header]
    for st in status.stages:
        percent = f"{st.progress.percent}%" if st.progress and st.progress.percent is not None else "-"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in list(st.metrics.items())[:4])
        lines.append(
            f"{st.name:<8} {st.phase:<10} {st.attempts:>5} {_seconds_between(st.start_time, st.completion_time):>8}"
            f" {percent:>9}  {metrics}"
        )
        if st.message and st.phase == "Failed":
            lines.append(f"{'':<8} {st.message}")
        lines += watch_lines(st.findings, st.selection, st.evaluations or [], indent=9)
        for used in st.inputs:  # the inputs stage: what each input was read at
            at = f"@{used.revision}" if used.revision else ""
            asked = f" (asked {used.requested})" if used.requested and used.requested != used.revision else ""
            cache = f" [{used.cache}]" if used.cache else ""
            lines.append(f"{'':<8} input {used.field}: {used.source}{at}{asked}{cache}")
    if status.conditions:
        lines += ["", "CONDITIONS"]
        lines += [f"  {c.type}={c.status} {c.reason}: {c.message}" for c in status.conditions]
    return "\n".join(lines)


def watch_lines(
    findings: Sequence[str], selection: str | None, rows: Sequence[EvaluationRow], indent: int
) -> list[str]:
    """A watched stage's alarms, its evaluations and which one became the output (docs/watch.md);
    ``rlhfctl status`` and ``rlhfctl run-local`` print them under the stage's line."""
    pad = " " * indent
    lines = [f"{pad}ALARM {finding}" for finding in findings]
    if selection:
        lines.append(f"{pad}output: {selection}")
    if not rows:
        return lines
    columns = [
        ("score", "SCORE", "+.3g"),
        ("kl", "KL", ".3g"),
        ("length", "LENGTH", ".3g"),
        ("distinct2", "DIST-2", ".2f"),
    ]
    # Only the signals this run measured (a preference set, checks, a judge): the others would be columns of '-'.
    measured = {key for key in ANSWER_SIGNALS if any(getattr(r, key) is not None for r in rows)}
    columns += [
        (key, head, ".2f")
        for key, head in (
            ("preference_accuracy", "PREF-ACC"),
            ("check_pass_rate", "CHECKS"),
            ("judge_win_rate", "JUDGE"),
        )
        if key in measured
    ]
    lines.append(pad + f"{'EVAL STEP':>9}" + "".join(f" {head:>8}" for _, head, _ in columns))
    for r in rows:
        cells = "".join(
            f" {format(v, spec) if (v := getattr(r, key)) is not None else '-':>8}" for key, _, spec in columns
        )
        marks = " ".join(m for m, on in (("ALARM", r.alarm), ("<- output", r.selected)) if on)
        lines.append(f"{pad}{r.step:>9}{cells}  {marks}".rstrip())
    note = None if findings else shape_only_note(measured)
    return [*lines, f"{pad}{note}"] if note else lines


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="RLHFRun name")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--context", default=None)
    if command == "logs":
        parser.add_argument("--stage", required=True, help="stage name, e.g. sft, reward, ppo, merge")
        parser.add_argument("--tail", type=int, default=None, help="only the last N lines")


def run(args: Any) -> int:
    client = _clients(args.kubeconfig, args.context)
    from kubernetes.client.exceptions import ApiException

    try:
        if hasattr(args, "stage"):
            return _logs(client, args)
        obj = client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, args.name)
    except ApiException as exc:
        print(f"{args.namespace}/{args.name}: {exc.reason} ({exc.status})", file=sys.stderr)
        return 1
    print(render_status(args.name, obj))
    return 0


def _logs(client: Any, args: Any) -> int:
    job = children.job_name(args.name, args.stage)
    pods = client.CoreV1Api().list_namespaced_pod(args.namespace, label_selector=f"{LEGACY_JOB_NAME_LABEL}={job}").items
    if not pods:
        print(f"no pods of Job {args.namespace}/{job} (stage not started, or its Job was cleaned up)", file=sys.stderr)
        return 1
    latest = max(pods, key=lambda p: p.metadata.creation_timestamp)
    text = client.CoreV1Api().read_namespaced_pod_log(latest.metadata.name, args.namespace, tail_lines=args.tail)
    sys.stdout.write(text)
    return 0
