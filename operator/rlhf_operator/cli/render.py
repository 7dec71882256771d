"""``rlhfctl render FILE``: the Kubernetes objects the operator creates for each stage, as YAML.

Uses the operator's own pure builders, so what is printed is what the operator would create
(the run's UID is a placeholder until the run exists).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from rlhf_api.layout import RunRef
from rlhf_operator import children

from .validate import ManifestError, load_runs

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def objects_for(manifest: Any, namespace: str) -> list[dict[str, Any]]:
    identity = RunRef(
        name=manifest.metadata.get("name", "run"),
        namespace=manifest.metadata.get("namespace", namespace),
        uid=manifest.metadata.get("uid", PLACEHOLDER_UID),
    )
    spec = manifest.spec
    objects: list[dict[str, Any]] = []
    if spec.storage.existing_claim is None:
        objects.append(children.build_pvc(identity, spec))
    for stage in spec.pipeline():
        section = spec.stage(stage)
        if section is None or not section.enabled:
            continue
        objects.append(children.build_job(identity, spec, stage))
    return objects


def add_arguments(_: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="an RLHFRun manifest")
    parser.add_argument("--namespace", default="default", help="namespace when the manifest names none")
    parser.add_argument("--stage", default=None, help="only this stage's objects")


def run(args: Any) -> int:
    try:
        runs = load_runs(args.file)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    docs = []
    for manifest in runs:
        for obj in objects_for(manifest, args.namespace):
            stage = obj["metadata"].get("labels", {}).get("rlhf-operator.io/stage")
            if args.stage is None or stage == args.stage:
                docs.append(obj)
    if args.stage is not None and not docs:
        print(f"{args.file}: no enabled stage named {args.stage!r}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0
