"""Datasets for the stages: where they come from, column mapping, sampling and templates.

Sources (``DatasetSource.format``):

* ``huggingface``: a hub id (``load_dataset(name, subset, split=...)``, token from ``HF_TOKEN``)
  or a directory on the volume (``save_to_disk`` output, or a directory of data files);
* ``deeplake``: ``deeplake.open_read_only`` on a URL (``hub://org/name``) or a volume directory;
* ``jsonl`` / ``parquet``: a file on the volume.

Then ``columns`` (``expected: actual``) renames, ``maxSamples`` takes a seeded random subset and
``evalFraction`` holds rows out. Seed formats are recognised: OpenOrca
(``question``/``response``/``system_prompt``) fits the default template as is, Alpaca
(``instruction``/``input``/``output``) becomes ``question``/``response``, and hh-rlhf
transcripts (``chosen``/``rejected`` as ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) are split at the
last ``Assistant:`` when a stage needs a prompt and a completion.

Only :func:`check_source` runs before heavy imports; everything else imports ``datasets``.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_api import DatasetSource
from rlhf_stages.runtime.context import StageConfigError, StageContext, StageInputMissing

if TYPE_CHECKING:
    from datasets import Dataset

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


def check_source(ctx: StageContext, source: DatasetSource, what: str) -> None:
    """Fail fast (exit 3) when a dataset on the volume is not there. Hub sources are checked on load."""
    if source.path is None:
        return
    path = ctx.volume_path(source.path)
    if not path.exists():
        raise StageInputMissing(f"{what}: dataset path {source.path} does not exist on the volume ({path})")
    if source.format in ("jsonl", "parquet") and not path.is_file():
        raise StageInputMissing(f"{what}: {source.format} dataset {source.path} is not a file")


def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None  # never logged


def _from_deeplake(location: str) -> Dataset:
    import deeplake
    from datasets import Dataset

    ds = deeplake.open_read_only(location, token=os.environ.get("ACTIVELOOP_TOKEN") or None)
    columns: dict[str, list[Any]] = {}
    for column in ds.schema.columns:
        values: Any = ds[column.name][:]
        columns[column.name] = values.tolist() if hasattr(values, "tolist") else list(values)
    return Dataset.from_dict(columns)


def _from_huggingface(ctx: StageContext, source: DatasetSource) -> Dataset:
    from datasets import DatasetDict, load_dataset, load_from_disk

    if source.name is not None:
        return load_dataset(source.name, source.subset, split=source.split, token=_hf_token())
    path = ctx.volume_path(source.path or "")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if source.split not in loaded:
                raise StageConfigError(f"dataset.split: {source.path} has splits {list(loaded)}, not {source.split!r}")
            return loaded[source.split]
        return loaded
    return load_dataset(str(path), source.subset, split=source.split)


def load_rows(ctx: StageContext, source: DatasetSource, seed: int) -> Dataset:
    """The rows of a source, columns renamed and sampled (not yet split)."""
    from datasets import load_dataset

    if source.format == "deeplake":
        ds = _from_deeplake(source.name or str(ctx.volume_path(source.path or "")))
    elif source.format in ("jsonl", "parquet"):
        builder = "json" if source.format == "jsonl" else "parquet"
        ds = load_dataset(builder, data_files=str(ctx.volume_path(source.path or "")), split="train")
    else:
        ds = _from_huggingface(ctx, source)
    ds = rename_columns(ds, source.columns)
    if source.max_samples is not None and source.max_samples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(source.max_samples))
    if len(ds) == 0:
        raise StageInputMissing(f"dataset {source.name or source.path} has no rows")
    return ds


def rename_columns(ds: Dataset, columns: dict[str, str]) -> Dataset:
    """Apply ``columns`` (``expected: actual``)."""
    missing = [actual for actual in columns.values() if actual not in ds.column_names]
    if missing:
        raise StageConfigError(f"dataset.columns: no column(s) {missing} in the dataset; it has {ds.column_names}")
    mapping = {actual: expected for expected, actual in columns.items() if actual != expected}
    clashes = [e for e in mapping.values() if e in ds.column_names and e not in mapping]
    if clashes:  # the expected name is taken by another column: drop that one, the mapping wins
        ds = ds.remove_columns(clashes)
    return ds.rename_columns(mapping) if mapping else ds


def split_eval(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``fraction`` of the rows (at least one), or none when fraction is 0."""
    held = round(len(ds) * fraction)
    if fraction <= 0 or len(ds) < 2:
        return ds, None
    parts = ds.train_test_split(test_size=max(1, held), seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# ---------------------------------------------------------------------------
# Templates and seed formats
# ---------------------------------------------------------------------------


def template_fields(template: str) -> list[str]:
    """Column names a ``str.format`` template reads."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def split_response_template(template: str) -> tuple[str, str]:
    """(prompt template, completion prefix): the prompt is the text before ``{response}`` with
    trailing spaces moved to the completion, so ``prompt + completion`` is the rendered template
    and the prompt ends on a token boundary (byte-level BPE keeps the space with the next word)."""
    head, _, tail = template.partition("{response}")
    if tail.strip():
        raise StageConfigError("promptTemplate: {response} must come last (the completion ends the sequence)")
    prompt = head.rstrip(" ")
    return prompt, head[len(prompt) :]


def render(template: str, row: dict[str, Any]) -> str:
    try:
        return template.format_map(row)
    except KeyError as exc:
        raise StageConfigError(
            f"promptTemplate reads column {exc.args[0]!r}, which the dataset lacks (columns: {sorted(row)}); "
            "map one with dataset.columns, e.g. {question: instruction}"
        ) from exc


def normalise_alpaca(ds: Dataset) -> Dataset:
    """Alpaca rows (instruction/input/output) as question/response, unless those already exist."""
    names = set(ds.column_names)
    if not {"instruction", "output"} <= names or "question" in names or "response" in names:
        return ds

    def convert(row: dict[str, Any]) -> dict[str, str]:
        extra = (row.get("input") or "").strip()
        question = row["instruction"] + (f"\n\n{extra}" if extra else "")
        return {"question": question, "response": row["output"]}

    return ds.map(convert)


def is_hh_transcript(text: Any) -> bool:
    return isinstance(text, str) and text.lstrip("\n").startswith("Human:") and HH_ASSISTANT in text


def split_hh_transcript(text: str) -> tuple[str, str]:
    """(everything up to and including the last ``Assistant:``, the answer after it)."""
    cut = text.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def check_columns(ds: Dataset, needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise StageConfigError(
            f"{what}: the dataset has no column(s) {missing} (it has {ds.column_names}); "
            "rename with dataset.columns (expected: actual)"
        )


def source_summary(ctx: StageContext, source: DatasetSource) -> str:
    """How a source is recorded in manifests."""
    where = source.name or source.path or ""
    return f"{source.format}:{where}" + (f"[{source.split}]" if source.format == "huggingface" else "")


def local_path(ctx: StageContext, relative: str) -> Path:
    return ctx.volume_path(relative)
