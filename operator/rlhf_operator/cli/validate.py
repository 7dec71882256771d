"""``rlhfctl validate FILE...``: the admission checks, offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from rlhf_api.run import RLHFRun
from rlhf_api.validation import validate_manifest


class ManifestError(Exception):
    """A file that is not a readable RLHFRun manifest; the message says why."""


def load_runs(path: Path) -> list[RLHFRun]:
    """Every RLHFRun in a (multi-document) YAML file; raises ManifestError listing field errors."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    if not docs:
        raise ManifestError(f"{path}: no document found")
    runs, problems = [], []
    for index, doc in enumerate(docs):
        kind = doc.get("kind") if isinstance(doc, dict) else None
        where = f"{path}" + (f" (document {index + 1})" if len(docs) > 1 else "")
        if kind != "RLHFRun":
            problems.append(f"{where}: kind is {kind!r}, expected RLHFRun")
            continue
        run, errors = validate_manifest(doc)
        if errors:
            problems += [f"{where}: {e}" for e in errors]
        elif run is not None:
            runs.append(run)
    if problems:
        raise ManifestError("\n".join(problems))
    return runs


def add_arguments(_: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="RLHFRun manifests (YAML)")


def run(args: Any) -> int:
    failed = False
    for path in args.files:
        try:
            runs = load_runs(path)
        except ManifestError as exc:
            print(exc, file=sys.stderr)
            failed = True
            continue
        for r in runs:
            stages = " -> ".join(s if r.spec.stage(s).enabled else f"({s} skipped)" for s in _stages(r))
            print(f"{path}: {r.metadata.get('name', '<unnamed>')} is valid: {r.spec.method}: {stages}")
    return 1 if failed else 0


def _stages(r: RLHFRun) -> list[str]:
    return [s for s in r.spec.pipeline() if r.spec.stage(s) is not None]
