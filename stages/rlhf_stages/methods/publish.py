"""Publish stage: uploads the run's result, after merge, to an S3-compatible bucket and/or a hub repository.

What goes where (docs/publishing.md): the merged model (``merge/model``) as ``model/`` and, when
``publish.rewardModel`` is set, the reward model (``reward/model``) as ``reward-model/``; a model card
(``README.md``, written from the run) in the model's folder; and, last, ``rlhf-publish.json``: every
uploaded file with its size and sha256. In a bucket the folders go under ``<prefix>/``; in a hub
repository the model is the repository's root (so the hub shows the card) and the reward model its
``reward-model/`` folder.

Resumable and idempotent: each S3 object carries its sha256 as user metadata, and a start skips every
object whose size and sha256 already match, so a retry after a crash uploads only what is missing or
different. The hub deduplicates content itself (a commit of unchanged files changes nothing).
Credentials come from the environment the operator fills from the Secrets ``spec.publish`` names
(``rlhf_api.publish``); they are never logged, and errors name the spec field and the Secret, not values.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from rlhf_api import publish as api
from rlhf_stages.report import read_manifests
from rlhf_stages.runtime.context import (
    StageConfigError,
    StageContext,
    StageError,
    StageInputMissing,
    StageInterrupted,
    StageOutcome,
)
from rlhf_stages.runtime.outputs import completed_manifest

_HASH_CHUNK = 8 * 1024 * 1024
# S3 error codes that mean the key pair is wrong or lacks rights: retrying cannot fix them.
_AUTH_ERRORS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "AuthorizationHeaderMalformed"}
)


@dataclass(frozen=True)
class PublishedFile:
    """One file to upload: where it is on the volume and where it goes, relative to the target's root."""

    local: Path
    key: str
    """Relative key, e.g. ``model/config.json`` (under the S3 prefix; in a hub repo, model/ is the root)."""
    size: int
    sha256: str


# ------------------------------------------------------------------ inputs


def _sources(ctx: StageContext) -> list[tuple[str, Path]]:
    """(folder, directory) of each model to publish: the merged model, and the reward model if asked."""
    wanted = [(api.MODEL_FOLDER, "merge")]
    if ctx.config.reward_model:
        wanted.append((api.REWARD_MODEL_FOLDER, "reward"))
    found = []
    for folder, stage in wanted:
        out = ctx.stage_output_of(stage)
        if completed_manifest(out) is None:
            raise StageInputMissing(f"publish: the {stage} stage's output {ctx.relative(out)} is not complete")
        model = out / "model"
        if not (model / "config.json").is_file():
            raise StageInputMissing(f"publish: {ctx.relative(model)} holds no model (no config.json)")
        found.append((folder, model))
    return found


def _secret(env: str, field: str, where: str) -> str:
    value = os.environ.get(env, "")
    if not value:
        raise StageConfigError(
            f"{field}: the credential from {where} is missing or empty (environment variable {env}); "
            "check that the Secret exists in the run's namespace and holds that key"
        )
    return value


def s3_keys(ctx: StageContext) -> tuple[str, str]:
    creds = ctx.config.s3.credentials
    where = f"Secret {creds.secret_name}"
    return (
        _secret(
            api.S3_ACCESS_KEY_ID_ENV,
            "spec.publish.s3.credentials.accessKeyIdKey",
            f"{where} key {creds.access_key_id_key}",
        ),
        _secret(
            api.S3_SECRET_ACCESS_KEY_ENV,
            "spec.publish.s3.credentials.secretAccessKeyKey",
            f"{where} key {creds.secret_access_key_key}",
        ),
    )


def hub_token(ctx: StageContext) -> str:
    ref = ctx.config.hub.token or ctx.spec.secrets.hf_token
    field = "spec.publish.hub.token" if ctx.config.hub.token else "spec.secrets.hfToken"
    where = f"Secret {ref.name} key {ref.key}" if ref is not None else "no Secret"
    return _secret(api.HUB_TOKEN_ENV, field, where)


def validate(ctx: StageContext) -> None:
    """Before any network: the models are there and every credential the targets need is set."""
    _sources(ctx)
    if ctx.config.s3 is not None:
        s3_keys(ctx)
    if ctx.config.hub is not None:
        hub_token(ctx)


# ------------------------------------------------------------------ the files and the card


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def collect(sources: Iterable[tuple[str, Path]], card: Path | None) -> list[PublishedFile]:
    """Every file to upload, hashed, in a stable order; the card replaces a README the model may have."""
    files = []
    for folder, root in sources:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            if card is not None and folder == api.MODEL_FOLDER and rel == api.MODEL_CARD_FILE:
                continue
            files.append(PublishedFile(path, f"{folder}/{rel}", path.stat().st_size, sha256_of(path)))
    if card is not None:
        key = f"{api.MODEL_FOLDER}/{api.MODEL_CARD_FILE}"
        files.append(PublishedFile(card, key, card.stat().st_size, sha256_of(card)))
    return files


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value).replace("|", "\\|").replace("\n", " ")


def _source_text(source: Any) -> str:
    text = source.name if source.name else f"{source.path} (on the run's volume)"
    return f"{text} @ {source.revision}" if getattr(source, "revision", None) else text


def model_card(ctx: StageContext, operator_version: str | None) -> str:
    """The README.md a hub shows: what this model is and how it was made, from the spec and the manifests."""
    spec, run = ctx.spec, ctx.invocation.run
    stages = [s for s in spec.pipeline() if s != ctx.stage and spec.stage(s) is not None and spec.stage(s).enabled]
    manifests = read_manifests(ctx.run_dir)
    datasets = [(s, spec.stage(s).dataset) for s in stages if getattr(spec.stage(s), "dataset", None) is not None]
    front: dict[str, Any] = {"library_name": "transformers", "tags": ["rlhf", spec.method.lower(), "rlhf-operator"]}
    if spec.base_model.name:
        front["base_model"] = spec.base_model.name
    hub_datasets = sorted({d.name for _, d in datasets if d.name and d.format == "huggingface"})
    if hub_datasets:
        front["datasets"] = hub_datasets
    lines = ["---", yaml.safe_dump(front, sort_keys=True).rstrip(), "---", ""]
    lines += [
        f"# {run.name}",
        "",
        f"{spec.base_model.name or 'A model'} aligned with **{spec.method}** by rlhf-operator "
        f"(run `{run.namespace}/{run.name}`; stages {', '.join(stages)}).",
        "",
        "## Base model",
        "",
        f"- model: {_source_text(spec.base_model)}",
    ]
    if spec.tokenizer is not None:
        lines.append(f"- tokenizer: {_source_text(spec.tokenizer)}")
    lines += ["", "## Datasets", ""]
    if datasets:
        lines += [
            "| stage | dataset | format | subset | split | revision | max samples |",
            "|---|---|---|---|---|---|---|",
        ]
        for stage, d in datasets:
            source = d.name or f"{d.path} (volume)"
            revision = getattr(d, "revision", None)  # where the API records one
            row = [stage, source, d.format, d.subset, d.split, revision, d.max_samples]
            lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    else:
        lines.append("No enabled stage names a dataset of its own.")
    lines += ["", "## Method and settings", ""]
    for stage in stages:
        section = spec.stage(stage).to_wire()
        shown = {k: v for k, v in section.items() if k not in ("resources", "podTemplate", "enabled", "dataset")}
        lines += [f"**{stage}**", "", "```yaml", yaml.safe_dump(shown, sort_keys=True).rstrip() or "{}", "```", ""]
    lines += ["## Evaluation", ""]
    rows = [(s, k, v) for s in stages for k, v in (manifests.get(s, {}).get("metrics") or {}).items()]
    if rows:
        lines += ["| stage | metric | value |", "|---|---|---|"]
        lines += [f"| {s} | {_cell(k)} | {v:.6g} |" for s, k, v in rows if isinstance(v, int | float)]
    else:
        lines.append("The stages recorded no metrics.")
    merged = manifests.get("merge", {})
    lines += [
        "",
        "## Provenance",
        "",
        f"- config hash (merge, covering every earlier stage's output): `{merged.get('configHash', '-')}`",
        f"- merge output id: `{merged.get('outputId', '-')}`",
        f"- run uid: `{run.uid or '-'}`",
        f"- rlhf-operator version: {operator_version or 'unknown (not started by the operator)'}",
    ]
    libraries = merged.get("libraries") or {}
    if libraries:
        lines.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in sorted(libraries.items())))
    return "\n".join(lines) + "\n"


def publish_record(ctx: StageContext, files: list[PublishedFile]) -> dict[str, Any]:
    """``rlhf-publish.json``: what was published, from which run. No timestamp, so a retry that finds
    every file in place finds this one in place too."""
    merged = completed_manifest(ctx.stage_output_of("merge")) or {}
    return {
        "run": ctx.invocation.run.to_wire(),
        "method": ctx.spec.method,
        "mergeConfigHash": merged.get("configHash"),
        "files": {f.key: {"size": f.size, "sha256": f.sha256} for f in files},
    }


# ------------------------------------------------------------------ targets


@dataclass
class Uploaded:
    uri: str
    uploaded: list[str]
    """Files sent (a hub commit: every file; the hub itself skips content it already holds)."""
    skipped: list[str]
    """Files already in place with the same size and sha256 (S3 only)."""
    summary: str = ""


Progress = Callable[[int], None]


def _s3_error(code: str, ctx: StageContext, what: str) -> StageError:
    """The StageError for an S3 error code: the server's message is left out (it may quote the key id)."""
    target = ctx.config.s3
    if code in _AUTH_ERRORS:
        creds = target.credentials
        return StageConfigError(
            f"spec.publish.s3.credentials: {target.endpoint} refused the access key pair from Secret "
            f"{creds.secret_name} (keys {creds.access_key_id_key}, {creds.secret_access_key_key}) while "
            f"{what}: {code}. Put a key pair with write access to bucket {target.bucket} in that Secret"
        )
    if code == "NoSuchBucket":
        return StageConfigError(
            f"spec.publish.s3.bucket: bucket {target.bucket} does not exist at {target.endpoint}: create it "
            "(the stage does not create buckets) or fix the name"
        )
    # Anything else (the server unreachable, a 5xx) may pass: exit 1, the Job retries and the upload resumes.
    return StageError(f"spec.publish.s3.endpoint: {what} at {target.endpoint} failed: {code}")


def s3_prefix(ctx: StageContext) -> str:
    run = ctx.invocation.run
    return ctx.config.s3.prefix or f"{run.namespace}/{run.name}"


def upload_s3(ctx: StageContext, files: list[PublishedFile], record: bytes, progress: Progress) -> Uploaded:
    """Each file unless an object of the same size and sha256 is there; the record last."""
    from minio import Minio
    from minio.error import S3Error

    target = ctx.config.s3
    access_key, secret_key = s3_keys(ctx)
    url = urlsplit(target.endpoint)
    client = Minio(
        url.netloc, access_key=access_key, secret_key=secret_key, secure=url.scheme == "https", region=target.region
    )
    prefix = s3_prefix(ctx)
    meta_header = f"x-amz-meta-{api.SHA256_METADATA_KEY}"

    def in_place(key: str, size: int, sha256: str) -> bool:
        try:
            stat = client.stat_object(target.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return False
            raise
        return stat.size == size and (stat.metadata or {}).get(meta_header) == sha256

    done = Uploaded(f"s3://{target.bucket}/{prefix}/{api.MODEL_FOLDER}", [], [])
    try:
        if not client.bucket_exists(target.bucket):
            raise _s3_error("NoSuchBucket", ctx, "looking up the bucket")
        for index, f in enumerate(files):
            if ctx.stop_requested.is_set():
                raise StageInterrupted(index, None)
            key = f"{prefix}/{f.key}"
            if in_place(key, f.size, f.sha256):
                done.skipped.append(f.key)
            else:
                client.fput_object(target.bucket, key, str(f.local), metadata={api.SHA256_METADATA_KEY: f.sha256})
                done.uploaded.append(f.key)
            progress(index + 1)
        # The record last, so that its presence means every file is in place (not counted as a file).
        record_key = f"{prefix}/{api.PUBLISH_RECORD_FILE}"
        record_sha = hashlib.sha256(record).hexdigest()
        if not in_place(record_key, len(record), record_sha):
            client.put_object(
                target.bucket,
                record_key,
                io.BytesIO(record),
                len(record),
                content_type="application/json",
                metadata={api.SHA256_METADATA_KEY: record_sha},
            )
    except S3Error as exc:
        raise _s3_error(str(exc.code), ctx, "uploading") from None
    except StageError:
        raise
    except Exception as exc:  # connection refused, DNS, TLS: name the endpoint, not the keys
        raise StageError(f"spec.publish.s3.endpoint: cannot reach {target.endpoint}: {type(exc).__name__}") from None
    done.summary = f"{done.uri}: {len(done.uploaded)} uploaded, {len(done.skipped)} already there"
    return done


def hub_path(key: str) -> str:
    """Where a file goes in the hub repository: the model at the root, the reward model in its folder."""
    folder, _, rest = key.partition("/")
    return rest if folder == api.MODEL_FOLDER else key


def upload_hub(ctx: StageContext, files: list[PublishedFile], record: bytes, api_class: Any = None) -> Uploaded:
    """One commit of every file (the hub skips content it already has) to ``hub.revision``."""
    from huggingface_hub import CommitOperationAdd, HfApi

    target = ctx.config.hub
    client = (api_class or HfApi)(token=hub_token(ctx))
    client.create_repo(target.repo_id, repo_type="model", private=target.private, exist_ok=True)
    if target.revision != "main":
        client.create_branch(target.repo_id, branch=target.revision, repo_type="model", exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=hub_path(f.key), path_or_fileobj=str(f.local)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo=api.PUBLISH_RECORD_FILE, path_or_fileobj=record))
    run = ctx.invocation.run
    client.create_commit(
        target.repo_id,
        operations=operations,
        commit_message=f"rlhf-operator: publish run {run.namespace}/{run.name}",
        repo_type="model",
        revision=target.revision,
    )
    endpoint = str(getattr(client, "endpoint", None) or "https://huggingface.co").rstrip("/")
    uri = f"{endpoint}/{target.repo_id}/tree/{target.revision}"
    committed = [hub_path(f.key) for f in files]
    return Uploaded(uri, committed, [], f"{uri}: {len(committed)} files committed")


# ------------------------------------------------------------------ run


def run(ctx: StageContext) -> StageOutcome:
    cfg = ctx.config
    sources = _sources(ctx)
    operator_version = os.environ.get(api.OPERATOR_VERSION_ENV)
    card = None
    if cfg.model_card:
        card = ctx.staging_dir / api.MODEL_CARD_FILE
        card.write_text(model_card(ctx, operator_version), encoding="utf-8")
    files = collect(sources, card)
    record = json.dumps(publish_record(ctx, files), indent=1, sort_keys=True).encode()
    (ctx.staging_dir / api.PUBLISH_RECORD_FILE).write_bytes(record)
    targets = [t for t in ("s3", "hub") if getattr(cfg, t) is not None]
    total = len(files) * len(targets)
    results: dict[str, Uploaded] = {}
    offset = 0

    def progress(done: int) -> None:
        ctx.write_progress(offset + done, total)

    if cfg.s3 is not None:
        results["s3"] = upload_s3(ctx, files, record, progress)
        offset += len(files)
    if cfg.hub is not None:
        results["hub"] = upload_hub(ctx, files, record)
        offset += len(files)
    published = [r.uri for r in results.values()]
    uploaded = sum(len(r.uploaded) for r in results.values())
    size = sum(f.size for f in files)
    return StageOutcome(
        metrics={"files": float(len(files)), "bytes": float(size), "uploaded": float(uploaded)},
        step=offset,
        total_steps=total,
        inputs={folder: ctx.relative(path) for folder, path in sources},
        details={
            "files": {f.key: {"size": f.size, "sha256": f.sha256} for f in files},
            "targets": {
                name: {"uri": r.uri, "uploaded": r.uploaded, "skipped": r.skipped} for name, r in results.items()
            },
            "operatorVersion": operator_version,
        },
        message=f"published {len(files)} files ({size} bytes): " + "; ".join(r.summary for r in results.values()),
        published=published,
    )
