"""Where models and datasets come from: a hub, deeplake, or files on the shared volume."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from .base import ApiModel, Rule

_PARENT_SEGMENT = re.compile(r"(^|/)\.\.(/|$)")
_PATH_CEL = "!self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')"
_PATH_MESSAGE = "must be a path relative to the shared volume, without '..' segments (e.g. data/sft.jsonl)"


def _check_volume_path(value: str) -> str:
    if value.startswith("/") or _PARENT_SEGMENT.search(value):
        raise ValueError(_PATH_MESSAGE)
    return value


VolumePath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        json_schema_extra={"x-kubernetes-validations": [{"rule": _PATH_CEL, "message": _PATH_MESSAGE}]},
    ),
    AfterValidator(_check_volume_path),
]
"""A path inside the shared volume, relative to its root (mounted at /workspace in stage pods)."""

HubId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]

DEEPLAKE_REMOTE_PREFIXES = ("hub://", "al://", "s3://", "gcs://", "gs://", "azure://")


class ModelSource(ApiModel):
    """A pretrained model: a hub id, or a directory on the shared volume. Set exactly one."""

    rules = (
        Rule(
            cel="has(self.name) != has(self.path)",
            message="set exactly one of name (a hub id such as facebook/opt-1.3b) or path (a directory on the volume)",
            check=lambda m: (m.name is None) != (m.path is None),
        ),
    )

    name: HubId | None = None
    """Hub model id, e.g. ``facebook/opt-1.3b``; downloaded with the HF token Secret if one is referenced."""
    path: VolumePath | None = None
    """Directory on the shared volume holding a saved model (config and weights)."""
    revision: Annotated[str, Field(max_length=128)] | None = None
    """Hub revision (branch, tag or commit); ignored for paths."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Leave off unless you trust the source."""


DatasetFormat = Literal["huggingface", "deeplake", "jsonl", "parquet"]


class DatasetSource(ApiModel):
    """A dataset and how its columns map to what a stage reads."""

    rules = (
        Rule(
            cel="has(self.name) != has(self.path)",
            message="set exactly one of name (hub id or deeplake URL) or path (on the shared volume)",
            check=lambda d: (d.name is None) != (d.path is None),
        ),
        Rule(
            cel="!(self.format in ['jsonl', 'parquet']) || has(self.path)",
            message="jsonl and parquet datasets are files on the shared volume: set path, not name",
            field_path=".format",
            check=lambda d: d.format not in ("jsonl", "parquet") or d.path is not None,
        ),
        Rule(
            cel="self.format != 'deeplake' || !has(self.name) || "
            + " || ".join(f"self.name.startsWith('{p}')" for p in DEEPLAKE_REMOTE_PREFIXES),
            message="a deeplake name is a URL such as hub://activeloop/hh-rlhf (or use path for a local dataset)",
            field_path=".name",
            check=lambda d: d.format != "deeplake" or d.name is None or d.name.startswith(DEEPLAKE_REMOTE_PREFIXES),
        ),
        Rule(
            cel="self.format == 'deeplake' || !has(self.name) || !self.name.contains('://')",
            message="a huggingface dataset name is a hub id such as Anthropic/hh-rlhf, not a URL",
            field_path=".name",
            check=lambda d: d.format == "deeplake" or d.name is None or "://" not in d.name,
        ),
    )

    format: DatasetFormat = "huggingface"
    """How the dataset is stored: a Hugging Face dataset (hub id or saved directory), a deeplake dataset,
    or a jsonl/parquet file on the volume."""
    name: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """Hub dataset id (e.g. ``Anthropic/hh-rlhf``) or deeplake URL (e.g. ``hub://activeloop/open-orca``)."""
    path: VolumePath | None = None
    """File or directory on the shared volume."""
    subset: Annotated[str, Field(max_length=128)] | None = None
    """Dataset configuration name (huggingface only)."""
    revision: Annotated[str, Field(max_length=128)] | None = None
    """Hub revision (branch, tag or commit) of a huggingface dataset named by hub id; unset: main. The
    inputs stage resolves it to a commit and records it in the run's status. Ignored for paths."""
    split: Annotated[str, Field(min_length=1, max_length=128)] = "train"
    """Split to read."""
    columns: dict[str, Annotated[str, Field(max_length=128)]] = Field(default_factory=dict, max_length=16)
    """Renames dataset columns to the names the stage expects, as ``expected: actual``; e.g.
    ``{question: instruction}`` lets a template's ``{question}`` read the ``instruction`` column."""
    max_samples: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many rows, chosen by the stage's seed before any other row is read (a hub id is
    then streamed through a seeded shuffle buffer, an approximate shuffle: docs/methods.md, Datasets);
    unset reads all."""
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Fraction of rows held out for evaluation metrics; 0 disables evaluation."""
