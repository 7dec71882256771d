"""``rlhfctl status NAME`` and ``rlhfctl logs NAME --stage S``: a run on a cluster, for humans."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from rlhf_api.names import GROUP, LEGACY_JOB_NAME_LABEL, PLURAL, VERSION
from rlhf_api.run import RLHFRunStatus
from rlhf_api.timestamps import parse_timestamp
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
        lines += [f"{'':<8} ALARM {finding}" for finding in st.findings]  # reward hacking (docs/watch.md)
        if st.selection:
            lines.append(f"{'':<8} output: {st.selection}")
        for used in st.inputs:  # the inputs stage: what each input was read at
            at = f"@{used.revision}" if used.revision else ""
            asked = f" (asked {used.requested})" if used.requested and used.requested != used.revision else ""
            cache = f" [{used.cache}]" if used.cache else ""
            lines.append(f"{'':<8} input {used.field}: {used.source}{at}{asked}{cache}")
    if status.conditions:
        lines += ["", "CONDITIONS"]
        lines += [f"  {c.type}={c.status} {c.reason}: {c.message}" for c in status.conditions]
    return "\n".join(lines)


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
