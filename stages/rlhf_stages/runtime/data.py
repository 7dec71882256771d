"""Datasets for the stages: where they come from, column mapping, sampling and templates.

Sources (``DatasetSource.format``):

* ``huggingface``: a hub id (``load_dataset(name, subset, split=...)``, token from ``HF_TOKEN``)
  or a directory on the volume (``save_to_disk`` output, or a directory of data files);
* ``deeplake``: ``deeplake.open_read_only`` on a URL (``hub://org/name``, token from
  ``ACTIVELOOP_TOKEN``) or a volume directory;
* ``jsonl`` / ``parquet``: a file on the volume.

A hub id or deeplake URL that the inputs stage staged is read from its copy in the input cache
instead (``input_cache.staged_copy``): then the whole dataset is on the volume and ``maxSamples``
selects rows from it like from any file.

No source is loaded whole into memory. ``maxSamples`` picks its rows by seed
(:func:`sample_indices`) before anything is read wherever the row count is known: Arrow datasets
(files on the volume, saved datasets) are memory-mapped and only the chosen rows selected; deeplake
reads only the chosen rows, in batches, into a memory-mapped Arrow file. A hub id with
``maxSamples`` is streamed instead of downloaded whole: its shards are shuffled by the seed, its
rows mixed in a buffer of :data:`SHUFFLE_BUFFER` rows (an approximate shuffle), and the stream cut
after ``maxSamples`` rows. docs/methods.md (Datasets) says the same for users.

Then ``columns`` (``expected: actual``) renames and ``evalFraction`` holds rows out. Seed formats
are recognised: OpenOrca (``question``/``response``/``system_prompt``) fits the default template as
is, Alpaca (``instruction``/``input``/``output``) becomes ``question``/``response``, and hh-rlhf
transcripts (``chosen``/``rejected`` as ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) are split at the
last ``Assistant:`` when a stage needs a prompt and a completion.

Only :func:`check_source` runs before heavy imports; everything else imports ``datasets``.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_api import DatasetSource
from rlhf_stages.runtime import input_cache
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


# Rows a streamed hub dataset is shuffled through. A bigger buffer mixes further but holds more rows
# in memory on every rank; 10 000 rows of text are tens of MB.
SHUFFLE_BUFFER = 10_000
# Rows of a deeplake dataset per Arrow batch, and per request when they are consecutive (reading all).
READ_BATCH = 1_024
# Chosen (scattered) rows per deeplake request: deeplake fetches every chunk a request touches at
# once, so 1024 scattered rows of a 300 000-row text dataset held 1 GB of chunks; 64 hold 0.2 GB at
# the same speed (docs/benchmarks.md, deeplake sampling).
SCATTERED_BATCH = 64
# Bump when the cached Arrow layout of a deeplake read changes, so old files are not reused.
_DEEPLAKE_CACHE_FORMAT = 1


def sample_indices(total: int, max_samples: int | None, seed: int) -> list[int] | None:
    """The row indices ``maxSamples`` keeps, in a seeded random order, or None to keep all rows in
    their order. The same (total, max_samples, seed) gives the same indices for every format, so a
    dataset converted from jsonl to parquet or deeplake samples the same rows."""
    if max_samples is None or max_samples >= total:
        return None
    import numpy as np

    # The head of a seeded permutation: exactly the rows ``Dataset.shuffle(seed).select(range(n))``
    # kept before sampling moved ahead of the read, so existing runs and results keep their rows.
    # The price is an index per row of the dataset (8 bytes) for a moment, never the rows themselves.
    chosen: list[int] = np.random.default_rng(seed).permutation(total)[:max_samples].tolist()
    return chosen


def _from_deeplake(location: str, max_samples: int | None, seed: int) -> Dataset:
    """The chosen rows of a deeplake dataset, read in batches into a memory-mapped Arrow file.

    The file is cached under the datasets cache (on the shared volume in a stage Pod, HF_HOME) by
    location, dataset version, sample and seed, so a retry or another rank reuses it; a new commit of
    the dataset changes the version and so the file."""
    import hashlib
    import json

    import datasets
    import deeplake
    import numpy as np

    ds = deeplake.open_read_only(location, token=os.environ.get("ACTIVELOOP_TOKEN") or None)
    total = len(ds)
    if total == 0:
        raise StageInputMissing(f"dataset {location} has no rows")
    chosen = sample_indices(total, max_samples, seed)
    key = json.dumps([_DEEPLAKE_CACHE_FORMAT, location, ds.version, total, max_samples, seed])
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "deeplake" / f"{hashlib.sha256(key.encode()).hexdigest()}.arrow"
    # Read in index order: deeplake then decompresses each chunk once, where the chosen (random)
    # order would revisit chunks. The Dataset is put back in the chosen order by an index mapping.
    ordered = np.arange(total) if chosen is None else np.sort(chosen)
    if not cache.exists():
        _write_arrow(cache, _deeplake_batches(ds, ordered))
    rows = datasets.Dataset.from_file(str(cache))
    if chosen is None:
        return rows
    return rows.select(np.searchsorted(ordered, chosen).tolist())


def _deeplake_batches(ds: Any, ordered: Any) -> Iterator[dict[str, list[Any]]]:
    names = [column.name for column in ds.schema.columns]
    for start in range(0, len(ordered), READ_BATCH):
        indices = ordered[start : start + READ_BATCH]
        requests: list[Any]
        if indices[-1] - indices[0] + 1 == len(indices):  # consecutive rows (reading all): one range
            requests = [slice(int(indices[0]), int(indices[-1]) + 1)]
        else:  # exactly the chosen rows, a few at a time
            requests = [indices[i : i + SCATTERED_BATCH].tolist() for i in range(0, len(indices), SCATTERED_BATCH)]
        batch: dict[str, list[Any]] = {name: [] for name in names}
        for name in names:
            for where in requests:
                values: Any = ds[name][where]
                batch[name].extend(values.tolist() if hasattr(values, "tolist") else values)
        yield batch


def _write_arrow(path: Path, batches: Iterator[dict[str, list[Any]]]) -> None:
    """Batches of columns as an Arrow stream file (the layout ``Dataset.from_file`` memory-maps),
    written beside ``path`` and renamed into place so that a reader never sees half a file."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    writer, schema = None, None
    try:
        with pa.OSFile(str(partial), "wb") as sink:
            for batch in batches:
                table = pa.Table.from_pydict(batch)
                if writer is None:
                    schema = table.schema
                    writer = pa.ipc.new_stream(sink, schema)
                else:  # one schema per file; deeplake columns are typed, so every batch infers the same
                    table = table.cast(schema)
                writer.write_table(table)
            if writer is None:
                raise ValueError("no batches to write")  # callers check for rows first
            writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def stream_sample(
    location: str, subset: str | None, split: str, max_samples: int, seed: int, revision: str | None = None
) -> Dataset:
    """``max_samples`` rows of a streamed dataset (a hub id), shuffled by ``seed`` through a buffer of
    :data:`SHUFFLE_BUFFER` rows; only what the stream reads (those rows and the buffer's) is downloaded.

    The shuffle is approximate: shards are shuffled, then rows mix only within the buffer, so with
    one shard the rows come from the first ``max_samples + SHUFFLE_BUFFER`` of it. The same seed and
    the same hub revision give the same rows."""
    from datasets import Dataset, load_dataset

    stream = load_dataset(location, subset, split=split, streaming=True, token=_hf_token(), revision=revision)
    taken = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER).take(max_samples)
    return Dataset.from_list(list(taken), features=taken.features)


def _from_huggingface(ctx: StageContext, source: DatasetSource, seed: int) -> Dataset:
    from datasets import DatasetDict, load_dataset, load_from_disk

    staged = input_cache.staged_copy(ctx, source)
    if staged is not None:  # the inputs stage's copy of the hub repository: its data files
        return load_dataset(str(staged), source.subset, split=source.split)
    if source.name is not None:
        if source.max_samples is not None:
            return stream_sample(source.name, source.subset, source.split, source.max_samples, seed, source.revision)
        return load_dataset(source.name, source.subset, split=source.split, token=_hf_token(), revision=source.revision)
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
    """The rows of a source, sampled by ``maxSamples`` and columns renamed (not yet split)."""
    from datasets import load_dataset

    if source.format == "deeplake":
        # Sampled while reading: only the chosen rows leave deeplake.
        staged = input_cache.staged_copy(ctx, source)
        location = str(staged) if staged is not None else source.name or str(ctx.volume_path(source.path or ""))
        ds = _from_deeplake(location, source.max_samples, seed)
    else:
        if source.format in ("jsonl", "parquet"):
            builder = "json" if source.format == "jsonl" else "parquet"
            ds = load_dataset(builder, data_files=str(ctx.volume_path(source.path or "")), split="train")
        else:
            ds = _from_huggingface(ctx, source, seed)
        # Arrow datasets are memory-mapped: selecting the chosen rows copies nothing. A streamed
        # sample has at most maxSamples rows already, and is kept as it came.
        chosen = sample_indices(len(ds), source.max_samples, seed)
        if chosen is not None:
            ds = ds.select(chosen)
    ds = rename_columns(ds, source.columns)
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
