"""Dataset sources, column mapping, sampling, splits, templates and seed formats (no training)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_spec
from rlhf_api import DatasetSource, SFTStage
from rlhf_api.layout import RunRef, StageInvocation
from rlhf_stages.methods.sft import build_examples
from rlhf_stages.runtime import data
from rlhf_stages.runtime.context import StageConfigError, StageContext, StageInputMissing

ROWS = [
    {"question": f"how is the old lake {i}?", "response": f"the old lake is calm {i}.", "system_prompt": "Be nice."}
    for i in range(20)
]


def _ctx(volume: Path) -> StageContext:
    invocation = StageInvocation(stage="sft", run=RunRef(name="data"), workspace=str(volume), spec=tiny_spec())  # type: ignore[arg-type]
    return StageContext.create(invocation)


def _source(**fields: Any) -> DatasetSource:
    return DatasetSource.model_validate(fields)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A datasets cache of the test's own: deeplake reads are cached there (as on the volume in a Pod)."""
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _lake(path: Path, columns: dict[str, list[Any]]) -> None:
    import deeplake

    ds = deeplake.create(str(path))
    for name, values in columns.items():
        ds.add_column(name, deeplake.types.Int64() if isinstance(values[0], int) else deeplake.types.Text())
    ds.append(columns)
    ds.commit()


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir()
    with (tmp_path / "d" / "rows.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    return tmp_path


def test_jsonl_parquet_and_saved_hf_datasets_agree(volume: Path) -> None:
    from datasets import Dataset, DatasetDict

    ctx = _ctx(volume)
    Dataset.from_list(ROWS).to_parquet(str(volume / "d" / "rows.parquet"))
    Dataset.from_list(ROWS).save_to_disk(str(volume / "d" / "saved"))
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:2])}).save_to_disk(
        str(volume / "d" / "saved_dict")
    )
    sources = [
        _source(format="jsonl", path="d/rows.jsonl"),
        _source(format="parquet", path="d/rows.parquet"),
        _source(format="huggingface", path="d/saved"),
        _source(format="huggingface", path="d/saved_dict", split="train"),
    ]
    for source in sources:
        assert data.load_rows(ctx, source, seed=0).to_list() == ROWS, source
    assert len(data.load_rows(ctx, _source(path="d/saved_dict", split="test"), seed=0)) == 2
    with pytest.raises(StageConfigError, match="validation"):
        data.load_rows(ctx, _source(path="d/saved_dict", split="validation"), seed=0)


def test_deeplake_local_dataset(volume: Path) -> None:
    _lake(
        volume / "d" / "lake",
        {
            "instruction": [r["question"] for r in ROWS],
            "answer": [r["response"] for r in ROWS],
            "score": list(range(len(ROWS))),
        },
    )
    source = _source(format="deeplake", path="d/lake", columns={"question": "instruction", "response": "answer"})
    rows = data.load_rows(_ctx(volume), source, seed=0)
    assert rows.column_names == ["question", "response", "score"]
    assert rows["question"] == [r["question"] for r in ROWS] and rows["score"] == list(range(20))


def test_every_format_samples_the_same_rows_by_seed(volume: Path) -> None:
    """maxSamples picks row indices from the seed alone, so a dataset samples the same rows whether it
    is jsonl, parquet, a saved dataset or deeplake (and a conversion between them changes nothing)."""
    from datasets import Dataset

    ctx = _ctx(volume)
    Dataset.from_list(ROWS).to_parquet(str(volume / "d" / "rows.parquet"))
    Dataset.from_list(ROWS).save_to_disk(str(volume / "d" / "saved"))
    _lake(volume / "d" / "lake", {k: [r[k] for r in ROWS] for k in ROWS[0]})
    chosen = data.sample_indices(len(ROWS), 7, seed=3)
    assert chosen is not None and len(set(chosen)) == 7 and chosen != sorted(chosen)  # shuffled, not a prefix
    expected = [ROWS[i] for i in chosen]
    # The rows datasets' own seeded shuffle kept when data.py loaded everything first: runs keep their rows.
    assert Dataset.from_list(ROWS).shuffle(seed=3).select(range(7)).to_list() == expected
    for fmt, path in (
        ("jsonl", "d/rows.jsonl"),
        ("parquet", "d/rows.parquet"),
        ("huggingface", "d/saved"),
        ("deeplake", "d/lake"),
    ):
        source = _source(format=fmt, path=path, maxSamples=7)
        assert data.load_rows(ctx, source, seed=3).to_list() == expected, fmt
        assert data.load_rows(ctx, source, seed=4).to_list() != expected, fmt
    assert data.sample_indices(len(ROWS), 20, seed=3) is None  # all rows: kept in order, unshuffled
    assert data.load_rows(ctx, _source(format="deeplake", path="d/lake", maxSamples=50), seed=3).to_list() == ROWS


class CountingLake:
    """A deeplake dataset that records which rows each column read asks for."""

    def __init__(self, ds: Any, reads: Counter[tuple[str, int]]) -> None:
        self.ds, self.reads = ds, reads
        self.schema, self.version = ds.schema, ds.version

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, column: str) -> CountingColumn:
        return CountingColumn(self.ds[column], column, self.reads)


class CountingColumn:
    def __init__(self, column: Any, name: str, reads: Counter[tuple[str, int]]) -> None:
        self.column, self.name, self.reads = column, name, reads

    def __getitem__(self, where: Any) -> Any:
        rows = range(where.start, where.stop) if isinstance(where, slice) else where
        self.reads.update((self.name, int(i)) for i in rows)
        return self.column[where]


def test_deeplake_reads_only_the_chosen_rows_once(volume: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deeplake

    total, wanted = 5000, 300
    _lake(volume / "big", {"id": list(range(total)), "text": [f"row {i}" for i in range(total)]})
    reads: Counter[tuple[str, int]] = Counter()
    real_open = deeplake.open_read_only
    monkeypatch.setattr(deeplake, "open_read_only", lambda *a, **kw: CountingLake(real_open(*a, **kw), reads))
    ctx, source = _ctx(volume), _source(format="deeplake", path="big", maxSamples=wanted)

    rows = data.load_rows(ctx, source, seed=11)
    chosen = data.sample_indices(total, wanted, seed=11)
    assert chosen is not None and rows["id"] == chosen and rows["text"] == [f"row {i}" for i in chosen]
    # Every chosen row was read once per column, and no other row at all.
    assert reads == Counter({(column, i): 1 for column in ("id", "text") for i in chosen})
    # Another rank or a retry reads the cached Arrow file: deeplake is not read again.
    reads.clear()
    assert data.load_rows(ctx, source, seed=11)["id"] == chosen and not reads
    # A new commit is a new version: read again, and the new row can be chosen.
    lake = deeplake.open(str(volume / "big"))
    lake.append({"id": [total], "text": ["new"]})
    lake.commit()
    assert data.load_rows(ctx, source, seed=11)["id"] == data.sample_indices(total + 1, wanted, seed=11)
    assert len(reads) == 2 * wanted
    # No maxSamples: every row once, in order, over several batches.
    reads.clear()
    assert data.load_rows(ctx, _source(format="deeplake", path="big"), seed=11)["id"] == list(range(total + 1))
    assert total + 1 > 2 * data.READ_BATCH and reads == Counter(
        {(c, i): 1 for c in ("id", "text") for i in range(total + 1)}
    )


def test_hub_ids_with_max_samples_are_streamed(volume: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id is never downloaded whole for a sample. The hub itself is not reachable here, so the
    streaming sampler runs on a directory of data files, which datasets streams the same way."""
    streamed = data.stream_sample(str(volume / "d"), None, "train", 5, seed=1)
    assert len(streamed) == 5 and all(row in ROWS for row in streamed.to_list())
    assert streamed.to_list() == data.stream_sample(str(volume / "d"), None, "train", 5, seed=1).to_list()
    assert streamed.to_list() != data.stream_sample(str(volume / "d"), None, "train", 5, seed=2).to_list()
    assert len(data.stream_sample(str(volume / "d"), None, "train", 50, seed=1)) == len(ROWS)

    calls = []

    def fake_stream(*args: Any) -> Any:
        calls.append(args)
        return streamed

    monkeypatch.setattr(data, "stream_sample", fake_stream)
    source = _source(name="org/big", split="train", maxSamples=5, columns={"prompt": "question"})
    rows = data.load_rows(_ctx(volume), source, seed=9)
    assert calls == [("org/big", None, "train", 5, 9, None)] and rows["prompt"] == streamed["question"]


def test_column_mapping_sampling_and_split(volume: Path) -> None:
    ctx = _ctx(volume)
    source = _source(format="jsonl", path="d/rows.jsonl", columns={"prompt": "question"}, maxSamples=10)
    first = data.load_rows(ctx, source, seed=3)
    assert "prompt" in first.column_names and "question" not in first.column_names and len(first) == 10
    assert first.to_list() == data.load_rows(ctx, source, seed=3).to_list()  # seeded
    assert first.to_list() != data.load_rows(ctx, source, seed=4).to_list()
    train, held = data.split_eval(first, 0.2, seed=0)
    assert (len(train), len(held)) == (8, 2)
    assert data.split_eval(first, 0.0, seed=0)[1] is None
    assert len(data.split_eval(first, 0.01, seed=0)[1]) == 1  # at least one row when asked for any
    with pytest.raises(StageConfigError, match="instruction"):
        data.load_rows(ctx, _source(format="jsonl", path="d/rows.jsonl", columns={"question": "instruction"}), 0)


def test_missing_path_is_input_missing(volume: Path) -> None:
    with pytest.raises(StageInputMissing, match=r"d/nope\.jsonl"):
        data.check_source(_ctx(volume), _source(format="jsonl", path="d/nope.jsonl"), "sft.dataset")


def _sft(**fields: Any) -> SFTStage:
    return SFTStage.model_validate({"dataset": {"path": "x.jsonl", "format": "jsonl"}, **fields})


def test_openorca_template_with_system_column() -> None:
    from datasets import Dataset

    examples = build_examples(Dataset.from_list(ROWS[:1]), _sft(systemColumn="system_prompt"))
    assert examples[0] == {
        "prompt": "Be nice.\n\nQuestion: how is the old lake 0?\n\nAnswer:",
        "completion": " the old lake is calm 0.",
    }


def test_alpaca_rows_become_question_and_response() -> None:
    from datasets import Dataset

    rows = Dataset.from_list(
        [
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
        ]
    )
    examples = build_examples(rows, _sft(promptTemplate="### Instruction:\n{question}\n### Response:\n{response}"))
    assert examples[0] == {"prompt": "### Instruction:\nSay hi.\n### Response:\n", "completion": "hi"}
    assert examples[1]["prompt"].startswith("### Instruction:\nTranslate.\n\nbonjour")


def test_hh_transcripts_split_at_the_last_assistant_turn() -> None:
    from datasets import Dataset

    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how is the old lake?\n\nAssistant: it is calm."
    examples = build_examples(Dataset.from_list([{"chosen": chosen, "rejected": "x"}]), _sft())
    assert examples[0]["prompt"].endswith("how is the old lake?\n\nAssistant:")
    assert examples[0]["completion"] == " it is calm."


def test_template_errors_name_the_column() -> None:
    from datasets import Dataset

    with pytest.raises(StageConfigError, match="topic"):
        build_examples(Dataset.from_list(ROWS[:1]), _sft(promptTemplate="About {topic}: {response}"))
    with pytest.raises(StageConfigError, match="come last"):
        data.split_response_template("{response} -- {question}")
