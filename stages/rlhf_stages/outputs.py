"""Atomic stage output with its manifest, and the StageResult written to the termination log.

A stage writes its files into ``ctx.staging_dir`` (a hidden directory next to the final one);
:func:`commit` adds ``manifest.json`` and renames the directory to ``layout.stage_output``. A
reader therefore sees either no output or a complete one; a complete manifest is what
"this stage is done" means (:func:`completed_manifest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf_operator.api import layout
from rlhf_operator.api.layout import StageResult

from .context import StageContext, StageOutcome, write_json_atomic

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "deeplake", "pydantic")


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (no imports)."""
    versions = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def config_hash(ctx: StageContext) -> str:
    """Hash of what determines this stage's output: its section and the models it starts from.

    Resources and ``enabled`` are left out: moving a stage to another node type does not change
    what it computes.
    """
    section = ctx.config.to_wire() if ctx.config is not None else {}
    section = {k: v for k, v in section.items() if k not in ("resources", "enabled")}
    spec = ctx.spec
    body = {
        "stage": ctx.stage,
        "section": section,
        "baseModel": spec.base_model.to_wire(),
        "tokenizer": spec.tokenizer.to_wire() if spec.tokenizer else None,
        "method": spec.method,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(output_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output_dir / layout.MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def completed_manifest(output_dir: Path) -> dict[str, Any] | None:
    """The manifest of a finished stage output, or None when the output is absent or incomplete."""
    manifest = read_manifest(output_dir)
    return manifest if manifest and manifest.get("completed") is True else None


def prepare_staging(ctx: StageContext) -> None:
    """A fresh, empty staging directory (a previous attempt may have left a partial one)."""
    if ctx.is_main:
        shutil.rmtree(ctx.staging_dir, ignore_errors=True)
        ctx.staging_dir.mkdir(parents=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(ctx: StageContext, outcome: StageOutcome) -> dict[str, Any]:
    """Write the manifest into the staging directory and move it into place (rank 0 only)."""
    manifest = {
        "apiVersion": ctx.invocation.api_version,
        "kind": "StageManifest",
        "stage": ctx.stage,
        "run": ctx.invocation.run.to_wire(),
        "completed": True,
        "configHash": config_hash(ctx),
        "inputs": outcome.inputs,
        "libraries": library_versions(),
        "metrics": outcome.metrics,
        "step": outcome.step,
        "totalSteps": outcome.total_steps,
        "details": outcome.details,
        "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if not ctx.is_main:
        return manifest
    write_json_atomic(ctx.staging_dir / layout.MANIFEST_FILE, manifest)
    if ctx.output_dir.exists():
        # Incomplete leftovers (a complete output would have ended the stage at start).
        stale = ctx.output_dir.with_name(f".{ctx.output_dir.name}.stale-{os.getpid()}")
        os.rename(ctx.output_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(ctx.staging_dir, ctx.output_dir)
    _fsync_dir(ctx.output_dir.parent)
    return manifest


def result_json(result: StageResult) -> str:
    """The result as JSON of at most 4 KiB: metrics, then the message, are cut to fit."""
    body = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    text = json.dumps(body, sort_keys=True)
    limit = layout.TERMINATION_MESSAGE_LIMIT
    while len(text.encode()) > limit and body.get("metrics"):
        body["metrics"].pop(sorted(body["metrics"])[-1])
        text = json.dumps(body, sort_keys=True)
    if len(text.encode()) > limit and body.get("message"):
        overflow = len(text.encode()) - limit
        body["message"] = (
            body["message"].encode()[: max(0, len(body["message"].encode()) - overflow - 8)].decode(errors="ignore")
            + "..."
        )
        text = json.dumps(body, sort_keys=True)
    return text


def write_termination_log(result: StageResult) -> None:
    """Write the result where Kubernetes picks it up as the termination message.

    Outside a pod /dev/termination-log usually is not writable: that is skipped silently, but
    only when RLHF_TERMINATION_LOG is unset (an explicit path that fails is reported).
    """
    explicit = os.environ.get(layout.TERMINATION_LOG_ENV)
    path = explicit or layout.DEFAULT_TERMINATION_LOG
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(result_json(result))
    except OSError as exc:
        if explicit:
            print(f"rlhf-stage: cannot write the termination log {path}: {exc}", file=sys.stderr)
