"""The inputs stage: every model and dataset the run names, resolved and staged once, before training.

For each source in the spec (``baseModel``, ``tokenizer``, and the models and datasets of every
enabled stage):

* a hub id (model or huggingface dataset): its revision (a branch, tag or commit; unset: main) is
  resolved to a commit with the ``HF_TOKEN`` Secret, and that commit is downloaded into the input
  cache unless it is there already (:mod:`rlhf_stages.runtime.input_cache`);
* a deeplake URL: opened with ``ACTIVELOOP_TOKEN``, its current version read, and copied into the
  cache under that version unless there;
* a path on the volume: stays where it is; checked (exit 3 when missing) and fingerprinted.

The result is ``<run>/inputs/inputs.json`` (what later stages read to find the copies, while the
operator runs them with ``HF_HUB_OFFLINE=1``) and the resolved revisions in the StageResult, which the
run's status shows. The stage resolves again on every start, never reusing an earlier output, since a
branch may have moved or a file on the volume changed; its output id is a hash of what it resolved, so
the later stages' outputs stay reusable exactly when their inputs are the same (docs/inputs.md).

It runs when the run reads at least one hub id or deeplake URL (``RLHFRunSpec.pipeline``): a run whose
inputs are all on the volume has nothing to fetch. When it runs it fingerprints the volume inputs too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from rlhf_api import DatasetSource, ModelSource, layout
from rlhf_stages.runtime.context import StageContext, StageInputMissing, StageOutcome
from rlhf_stages.runtime.data import check_source
from rlhf_stages.runtime.input_cache import InputCache, cache_root, fingerprint, source_key, write_staged

RESOLVES_EVERY_START = True
"""Read by the entrypoint: never reuse an earlier output of this stage (see the module docstring)."""

# Formats of other frameworks that hub model repositories often carry beside the PyTorch weights.
SKIPPED_MODEL_FILES = ["*.onnx", "onnx/*", "*.msgpack", "*.h5", "tf_model*", "flax_model*", "*.tflite", "*.ot"]


def sources(spec: Any) -> list[tuple[str, ModelSource | DatasetSource]]:
    """Every source the run reads, with the spec field that names it (the API's one definition)."""
    found: list[tuple[str, ModelSource | DatasetSource]] = spec.input_sources()
    return found


class Hub(Protocol):
    """The hub calls this stage makes (tests replace them; production: :class:`HuggingFaceHub`)."""

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str: ...
    def download(self, repo_type: str, repo_id: str, commit: str, into: str) -> None: ...


class HuggingFaceHub:
    """huggingface_hub, with the token Secret (``HF_TOKEN``) when the run references one."""

    def __init__(self) -> None:
        self.token = os.environ.get("HF_TOKEN") or None  # never logged
        # A hub mirror (HF_ENDPOINT, e.g. through spec.podTemplate.env); passed on explicitly because
        # huggingface_hub builds download URLs from the endpoint it saw when first imported.
        self.endpoint = os.environ.get("HF_ENDPOINT") or None

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            info = HfApi(endpoint=self.endpoint, token=self.token).repo_info(
                repo_id, repo_type=repo_type, revision=revision
            )
        except RevisionNotFoundError as exc:
            raise StageInputMissing(f"{repo_type} {repo_id} has no revision {revision!r}") from exc
        except (GatedRepoError, RepositoryNotFoundError) as exc:
            fix = "check the id" if self.token else "check the id, or reference a token in secrets.hfToken"
            raise StageInputMissing(f"{repo_type} {repo_id}: not found or not accessible ({fix})") from exc
        if not info.sha:
            raise StageInputMissing(f"{repo_type} {repo_id}@{revision}: the hub returned no commit")
        return str(info.sha)

    def download(self, repo_type: str, repo_id: str, commit: str, into: str) -> None:
        from huggingface_hub import snapshot_download

        snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=commit,
            local_dir=into,
            token=self.token,
            endpoint=self.endpoint,
            ignore_patterns=SKIPPED_MODEL_FILES if repo_type == "model" else None,
        )
        # huggingface_hub's download bookkeeping (locks, metadata): of no use once the entry is complete.
        shutil.rmtree(Path(into) / ".cache", ignore_errors=True)


HUB: Hub | None = None
"""The hub client; None: :class:`HuggingFaceHub` (tests set a fake)."""


def _deeplake_stage(cache: InputCache, url: str) -> tuple[str, Any]:
    import deeplake

    token = os.environ.get("ACTIVELOOP_TOKEN") or None  # never logged
    try:
        version = str(deeplake.open_read_only(url, token=token).version)
    except Exception as exc:  # deeplake raises its own types, not OSError, for missing or private data
        raise StageInputMissing(
            f"deeplake dataset {url}: cannot open ({exc}); check the URL or secrets.activeloopToken"
        ) from exc
    entry = cache.ensure("deeplake", url, version, lambda into: deeplake.copy(url, str(into / "dataset"), token=token))
    return version, entry


def validate(ctx: StageContext) -> None:
    """Volume paths exist (exit 3); hub sources are checked when resolved."""
    for field, source in sources(ctx.spec):
        if source.path is None:
            continue
        if isinstance(source, DatasetSource):
            check_source(ctx, source, field)
        elif not ctx.volume_path(source.path).is_dir():
            raise StageInputMissing(f"{field}.path: no directory {source.path} on the volume")


def _stage_one(ctx: StageContext, cache: InputCache, hub: Hub, field: str, source: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"key": source_key(field, source), "field": field}
    if source.path is not None:
        record.update(source=source.path, revision=fingerprint(ctx.volume_path(source.path)), cache="local")
        return record
    record["source"] = source.name
    if isinstance(source, DatasetSource) and source.format == "deeplake":
        version, entry = _deeplake_stage(cache, str(source.name))
        record.update(revision=version, cache="hit" if entry.hit else "miss", cachePath=f"{entry.relative}/dataset")
        return record
    repo_type = "model" if isinstance(source, ModelSource) else "dataset"
    requested = source.revision or "main"
    commit = hub.resolve(repo_type, source.name, requested)
    entry = cache.ensure(
        f"{repo_type}s", source.name, commit, lambda into: hub.download(repo_type, source.name, commit, str(into))
    )
    record.update(revision=commit, requested=requested, cache="hit" if entry.hit else "miss", cachePath=entry.relative)
    return record


def run(ctx: StageContext) -> StageOutcome:
    cache = InputCache(cache_root(ctx.workspace))
    hub = HUB if HUB is not None else HuggingFaceHub()
    staged: list[dict[str, Any]] = []
    done: dict[str, dict[str, Any]] = {}  # one source named twice (baseModel and tokenizer) is staged once
    for field, source in sources(ctx.spec):
        identity = source_key("", source)
        if identity not in done:
            done[identity] = _stage_one(ctx, cache, hub, field, source)
        staged.append({**done[identity], "key": source_key(field, source), "field": field})
    if ctx.is_main:
        write_staged(ctx.staging_dir / layout.INPUTS_FILE, staged)
    hits = sum(1 for s in staged if s.get("cache") == "hit")
    misses = sum(1 for s in staged if s.get("cache") == "miss")
    resolved = [{k: s[k] for k in ("field", "source", "revision", "requested", "cache") if s.get(k)} for s in staged]
    # The same resolution gives the same id: later stages' outputs stay reusable (upstream_outputs).
    # Whether a copy came from the cache is left out: it changes nothing the later stages read.
    what = [{k: v for k, v in r.items() if k != "cache"} for r in resolved]
    output_id = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
    for s in staged:
        where = f" at {s['revision']}" if s.get("revision") else ""
        print(f"rlhf-stage: inputs: {s['field']} = {s['source']}{where} ({s['cache']})", flush=True)
    return StageOutcome(
        metrics={"inputs/cache_hits": float(hits), "inputs/cache_misses": float(misses)},
        inputs={"resolved": resolved},
        message=f"{len(staged)} inputs resolved: {misses} fetched, {hits} from the cache, "
        f"{len(staged) - hits - misses} on the volume",
        resolved=resolved,
        output_id=output_id,
    )
