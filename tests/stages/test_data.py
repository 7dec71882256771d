"""Dataset sources, column mapping, sampling, splits, templates and seed formats (no training)."""

from __future__ import annotations

import json
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
    import deeplake

    ds = deeplake.create(str(volume / "d" / "lake"))
    ds.add_column("instruction", deeplake.types.Text())
    ds.add_column("answer", deeplake.types.Text())
    ds.add_column("score", deeplake.types.Int64())
    ds.append(
        {
            "instruction": [r["question"] for r in ROWS],
            "answer": [r["response"] for r in ROWS],
            "score": list(range(len(ROWS))),
        }
    )
    ds.commit()
    source = _source(format="deeplake", path="d/lake", columns={"question": "instruction", "response": "answer"})
    rows = data.load_rows(_ctx(volume), source, seed=0)
    assert rows.column_names == ["question", "response", "score"]
    assert rows["question"] == [r["question"] for r in ROWS] and rows["score"] == list(range(20))


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
