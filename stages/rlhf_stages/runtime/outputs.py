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
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf_api import layout
from rlhf_api.layout import StageResult
from rlhf_api.timestamps import format_timestamp as _now  # now, as an RFC 3339 timestamp
from rlhf_stages.runtime.atomic import fsync_dir, write_json_atomic
from rlhf_stages.runtime.checkpoint_dir import CheckpointDir
from rlhf_stages.runtime.context import StageContext, StageOutcome

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


def upstream_outputs(ctx: StageContext) -> dict[str, str | None]:
    """Which output of each earlier enabled stage this stage builds on (None: not there).

    An output is named by the ``outputId`` its manifest records (new for every commit; older
    manifests: config hash and finish time), so training an earlier stage again, even with the same
    settings, makes every later stage's output stale.
    """
    found: dict[str, str | None] = {}
    for stage in layout.enabled_before(ctx.spec, ctx.stage):
        manifest = completed_manifest(ctx.stage_output_of(stage))
        if manifest is None:
            found[stage] = None
        else:
            found[stage] = manifest.get("outputId") or f"{manifest.get('configHash')}@{manifest.get('finishedAt')}"
    return found


def config_inputs(ctx: StageContext) -> dict[str, Any]:
    """What determines this stage's output: its section, the models it starts from and the outputs of
    the earlier stages it reads (:func:`upstream_outputs`). Recorded in the manifest as ``config``.

    Resources and ``enabled`` are left out: moving a stage to another node type does not change
    what it computes. So is ``runtime`` (retries, deadlines, scheduling).
    """
    section = ctx.config.to_wire() if ctx.config is not None else {}
    section = {k: v for k, v in section.items() if k not in ("resources", "enabled")}
    spec = ctx.spec
    return {
        "stage": ctx.stage,
        "section": section,
        "baseModel": spec.base_model.to_wire(),
        "tokenizer": spec.tokenizer.to_wire() if spec.tokenizer else None,
        "method": spec.method,
        "upstream": upstream_outputs(ctx),
    }


def hash_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def config_hash(ctx: StageContext) -> str:
    """Hash of :func:`config_inputs`: equal hashes mean the output can be reused."""
    return hash_of(config_inputs(ctx))


def read_manifest(output_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output_dir / layout.MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def completed_manifest(output_dir: Path) -> dict[str, Any] | None:
    """The manifest of a finished stage output, or None when the output is absent or incomplete."""
    manifest = read_manifest(output_dir)
    return manifest if manifest and manifest.get("completed") is True else None


SUPERSEDED_DIR = "superseded"
"""``<run>/superseded/``: outputs and checkpoints of other settings, kept for people, never read again."""


@dataclass
class Existing:
    """A complete output already in place, and whether it was made from the same settings and inputs."""

    manifest: dict[str, Any]
    reusable: bool
    changes: list[str]


def existing_output(ctx: StageContext, inputs: dict[str, Any]) -> Existing | None:
    """The complete output in place, compared with what this start would compute (None: no output)."""
    manifest = completed_manifest(ctx.output_dir)
    if manifest is None:
        return None
    if manifest.get("configHash") == hash_of(inputs):
        return Existing(manifest, True, [])
    return Existing(manifest, False, describe_changes(ctx.stage, manifest.get("config"), inputs))


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: value}


def _shown(value: Any) -> str:
    text = "unset" if value is None else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_changes(stage: str, old: Any, new: dict[str, Any], limit: int = 6) -> list[str]:
    """What differs between the settings an output was made from and these, for people."""
    if not isinstance(old, dict):
        return ["its manifest records no settings to compare (written by an older version): trained again to be sure"]
    changes: list[str] = []
    old_up, new_up = old.get("upstream") or {}, new.get("upstream") or {}
    for name in sorted(set(old_up) | set(new_up)):
        if old_up.get(name) != new_up.get(name):
            if new_up.get(name) is None:
                changes.append(f"the {name} stage's output is not there any more")
            elif name not in old_up:
                changes.append(f"it was made without the {name} stage's output")
            else:
                changes.append(f"the {name} stage's output it was made from was replaced: trained again")
    roots = {"section": f"spec.{stage}", "baseModel": "spec.baseModel", "tokenizer": "spec.tokenizer"}
    for key in ("method", *roots):
        a = _flatten(old.get(key), roots.get(key, f"spec.{key}"))
        b = _flatten(new.get(key), roots.get(key, f"spec.{key}"))
        for path in sorted(set(a) | set(b)):
            if a.get(path) != b.get(path):
                changes.append(f"{path}: {_shown(a.get(path))} -> {_shown(b.get(path))}")
    if not changes:
        changes.append("its config hash differs (computed differently by another version)")
    return changes[:limit] + ([f"and {len(changes) - limit} more"] if len(changes) > limit else [])


def reuse_message(ctx: StageContext, manifest: dict[str, Any]) -> str:
    """Says whose output is reused: this run's (a retried Pod) or an earlier run's with the same name."""
    by = manifest.get("writtenBy") or {}
    uid = by.get("runUid", (manifest.get("run") or {}).get("uid"))
    if uid is not None and uid == ctx.invocation.run.uid:
        who = "this run"
    else:
        who = f"an earlier run named {ctx.invocation.run.name} (uid {uid or 'unknown'})"
    attempt = f", attempt {by['attempt']}" if by.get("attempt") else ""
    pod = f" on {by['pod']}" if by.get("pod") else ""  # the Pod name (the host name outside a cluster)
    return (
        f"already done: reused {ctx.relative(ctx.output_dir)}, written by {who}{attempt}{pod} at "
        f"{manifest.get('finishedAt', 'an unknown time')} from the same settings and inputs "
        f"(config hash {str(manifest.get('configHash'))[:12]})"
    )


def set_aside(ctx: StageContext, path: Path, name: str) -> Path:
    """Move ``path`` to ``<run>/superseded/<name>-<UTC time>`` (rank 0); returns the new place."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    root = ctx.run_dir / SUPERSEDED_DIR
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = root / f"{name}-{stamp}-{n}"
    os.rename(path, target)
    fsync_dir(ctx.run_dir)
    return target


def supersede_output(ctx: StageContext, existing: Existing) -> str:
    """Move a stale output aside; returns the warning that says why and where it went."""
    aside = set_aside(ctx, ctx.output_dir, ctx.stage)
    return (
        f"trained again: the previous {ctx.stage} output (config hash "
        f"{str(existing.manifest.get('configHash'))[:12]}, finished {existing.manifest.get('finishedAt')}) "
        f"was made from other settings or inputs ({'; '.join(existing.changes)}); it is kept, never read "
        f"again, at {ctx.relative(aside)} (delete it when no longer needed)"
    )


def claim_checkpoints(ctx: StageContext, config_hash: str, attempt: int | None) -> str | None:
    """Checkpoints are resumed only under the config hash they were written with.

    Others (or ones of unknown origin) are moved to ``superseded/``; returns the warning, if any.
    Then records this hash in ``<stage>.checkpoints/config-hash.json`` (rank 0, before training).
    """
    checkpoints = CheckpointDir(ctx.checkpoints_dir)
    notice = None
    owner = checkpoints.owner()
    written_under = owner.get("configHash") if owner is not None else None
    if checkpoints.holds_checkpoints() and written_under != config_hash:
        aside = set_aside(ctx, checkpoints.root, f"{ctx.stage}.checkpoints")
        origin = f"config hash {written_under[:12]}" if written_under else "unknown settings"
        notice = (
            f"not resumed: the checkpoints in {ctx.relative(checkpoints.root)} were written under {origin}, not "
            f"these settings and inputs; moved to {ctx.relative(aside)}"
        )
    if written_under != config_hash:
        checkpoints.record_owner(
            {"configHash": config_hash, "runUid": ctx.invocation.run.uid, "attempt": attempt, "since": _now()}
        )
    return notice


def prepare_staging(ctx: StageContext) -> None:
    """A fresh, empty staging directory (a previous attempt may have left a partial one)."""
    if ctx.is_main:
        shutil.rmtree(ctx.staging_dir, ignore_errors=True)
        ctx.staging_dir.mkdir(parents=True)


def commit(ctx: StageContext, outcome: StageOutcome) -> dict[str, Any]:
    """Write the manifest into the staging directory and move it into place (rank 0 only)."""
    inputs = config_inputs(ctx)
    attempt = ctx.attempt or {}
    details = dict(outcome.details)
    if attempt.get("notices"):
        details["notices"] = attempt["notices"]
    if outcome.published:  # read back when the output is reused (entrypoint)
        details["published"] = outcome.published
    manifest = {
        "apiVersion": ctx.invocation.api_version,
        "kind": "StageManifest",
        "stage": ctx.stage,
        "run": ctx.invocation.run.to_wire(),
        "completed": True,
        "outputId": outcome.output_id or uuid.uuid4().hex,
        "configHash": hash_of(inputs),
        "config": inputs,
        "writtenBy": {
            "runUid": ctx.invocation.run.uid,
            "attempt": attempt.get("number"),
            "pod": attempt.get("pod"),
        },
        "inputs": outcome.inputs,
        "libraries": library_versions(),
        "metrics": outcome.metrics,
        "step": outcome.step,
        "totalSteps": outcome.total_steps,
        "details": details,
        "finishedAt": _now(),
    }
    if not ctx.is_main:
        return manifest
    write_json_atomic(ctx.staging_dir / layout.MANIFEST_FILE, manifest)
    if ctx.output_dir.exists():
        # Incomplete leftovers (a complete output was reused or set aside at start).
        stale = ctx.output_dir.with_name(f".{ctx.output_dir.name}.stale-{os.getpid()}")
        os.rename(ctx.output_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(ctx.staging_dir, ctx.output_dir)
    fsync_dir(ctx.output_dir.parent)
    return manifest


def result_json(result: StageResult) -> str:
    """The result as JSON of at most 4 KiB: the watch's evaluations (all but the baseline, the output
    and the latest), metrics, inputs, then the message, are cut to fit."""
    body = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    # Absent when empty (no alarm; not the publish or inputs stage; no watch): readers older than the
    # field still parse it.
    for key in ("findings", "published", "inputs", "evaluations"):
        if not body.get(key):
            body.pop(key, None)
    for row in body.get("evaluations", []):  # false flags are the defaults: left out, the message is shorter
        for flag in ("alarm", "selected"):
            if not row[flag]:
                row.pop(flag)
    text = json.dumps(body, sort_keys=True)
    limit = layout.TERMINATION_MESSAGE_LIMIT
    rows = body.get("evaluations", [])
    middle = [r for r in rows[1:-1] if not r.get("selected")]
    while len(text.encode()) > limit and middle:
        rows.remove(middle.pop(0))
        text = json.dumps(body, sort_keys=True)
    while len(text.encode()) > limit and body.get("metrics"):
        body["metrics"].pop(sorted(body["metrics"])[-1])
        text = json.dumps(body, sort_keys=True)
    while len(text.encode()) > limit and body.get("inputs"):  # all of them stay in <run>/inputs/inputs.json
        body["inputs"].pop()
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
