"""Tiny assets and the ground-truth evaluation of the synthetic task."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from rlhf_stages.sampling.generate import Completion, generate_completions
from rlhf_stages.sampling.score import score_with_reward_model
from rlhf_stages.tiny.assets import (
    DEFAULT_PROMPT_TEMPLATE,
    HELD_OUT_TOPICS,
    REJECTED_KINDS,
    TRAIN_TOPICS,
    TinyAssets,
    build_tiny_assets,
    build_tiny_data,
    format_completion,
    format_prompt,
    read_jsonl,
    split_prompt_template,
)
from rlhf_stages.tiny.evaluate import evaluate_policy
from rlhf_stages.tiny.ground_truth import check_target, ground_truth_score, meets_target, prompt_topic, topics_in


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return build_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets", seed=0)


# --------------------------------------------------------------------------
# Build: determinism and layout
# --------------------------------------------------------------------------


def test_build_is_deterministic_for_a_seed(assets: TinyAssets, tmp_path: Path) -> None:
    again = build_tiny_assets(tmp_path / "again", seed=0)
    first, second = _digest(assets.root), _digest(again.root)
    assert first == second
    # Every advertised path exists.
    for value in vars(assets).values():
        assert Path(value).exists(), value
    assert {"base-model/model.safetensors", "tokenizer/tokenizer.json", "data/sft.jsonl"} <= set(first)


def test_other_seed_changes_data(assets: TinyAssets, tmp_path: Path) -> None:
    other = build_tiny_data(tmp_path / "other", seed=1)
    assert other.sft.read_bytes() != assets.sft.read_bytes()
    assert other.preferences.read_bytes() != assets.preferences.read_bytes()


# --------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------


def test_tokenizer_round_trips_and_has_special_tokens(assets: TinyAssets) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets.tokenizer))
    assert 300 <= len(tok) <= 600
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert None not in ids and len(ids) == 4  # all set and distinct

    text = format_prompt("how is the old park?") + format_completion("the old park is lovely, calm & ünïcode!")
    encoded = tok(text)["input_ids"]
    assert tok.eos_token_id not in encoded and tok.bos_token_id not in encoded  # nothing added
    assert tok.decode(encoded) == text
    # The corpus' words are learned merges: a typical answer is short in tokens.
    assert len(tok(" the old lake is lovely and calm.")["input_ids"]) <= 9
    # Prompt and completion tokenised apart concatenate to the joint encoding.
    prompt, completion = format_prompt("how is the old lake?"), format_completion("the old lake is nice.")
    assert tok(prompt)["input_ids"] + tok(completion)["input_ids"] == tok(prompt + completion)["input_ids"]

    chat = tok.apply_chat_template(
        [
            {"role": "user", "content": "how is the old lake?"},
            {"role": "assistant", "content": "the old lake is nice."},
        ],
        tokenize=False,
    )
    assert chat == prompt + completion + tok.eos_token
    gen_prompt = tok.apply_chat_template(
        [{"role": "user", "content": "how is the old lake?"}], tokenize=False, add_generation_prompt=True
    )
    assert gen_prompt == prompt


def test_base_model_loads_and_generates(assets: TinyAssets) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets.base_model))
    model = AutoModelForCausalLM.from_pretrained(str(assets.base_model))
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 500_000

    prompts = [format_prompt("how is the old lake?"), format_prompt("tell me about the north garden.")]
    first = generate_completions(model, tok, prompts, max_new_tokens=8, seed=3)
    second = generate_completions(model, tok, prompts, max_new_tokens=8, seed=3)
    assert first == second  # deterministic for a seed
    assert all(1 <= c.num_tokens <= 8 for c in first)
    greedy = generate_completions(model, tok, prompts, max_new_tokens=8, seed=0, greedy=True)
    assert [c.prompt for c in greedy] == prompts

    # The base checkpoint also starts a reward model (random score head).
    rm = AutoModelForSequenceClassification.from_pretrained(str(assets.base_model), num_labels=1)
    scores = score_with_reward_model(rm, tok, prompts, first)
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)

    summary = evaluate_policy(model, tok, prompts, reward_model=rm, max_new_tokens=8, samples_per_prompt=2)
    assert summary["num_completions"] == 4
    assert 0.0 <= summary["target_rate"] <= 1.0 and summary["reward_mean"] is not None
    assert len(summary["samples"]) == 4


# --------------------------------------------------------------------------
# Reward-model scoring mechanics
# --------------------------------------------------------------------------


class _LastTokenRM(torch.nn.Module):
    """Stand-in reward model whose score is the id of the last token."""

    def __init__(self, pad_token_id: int | None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Cfg", (), {"pad_token_id": pad_token_id})()
        self.batch_sizes: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        assert bool(attention_mask.all())  # never padded
        self.batch_sizes.append(input_ids.shape[0])
        return type("Out", (), {"logits": input_ids[:, -1:].float()})()


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_scoring_includes_eos_only_when_generated(assets: TinyAssets, pad_is_eos: bool) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets.tokenizer))
    rm = _LastTokenRM(tok.eos_token_id if pad_is_eos else tok.pad_token_id)
    prompt = format_prompt("how is the old lake?")
    done = Completion(prompt, " the old lake is nice.", ended_with_eos=True, num_tokens=7)
    cut = Completion(prompt, " the old lake is nice and", ended_with_eos=False, num_tokens=6)
    scores = score_with_reward_model(rm, tok, [prompt, prompt, prompt], [done, cut, " the old lake"])
    last_of_cut = tok(prompt + cut.text)["input_ids"][-1]
    assert scores == [float(tok.eos_token_id), float(last_of_cut), float(tok.eos_token_id)]
    assert rm.config.pad_token_id == (tok.eos_token_id if pad_is_eos else tok.pad_token_id)  # restored
    if pad_is_eos:
        assert set(rm.batch_sizes) == {1}


# --------------------------------------------------------------------------
# Data: formats, splits, and agreement with the ground truth
# --------------------------------------------------------------------------


def test_prompt_template_convention() -> None:
    assert split_prompt_template(DEFAULT_PROMPT_TEMPLATE) == ("Question: {question}\n\nAnswer:", " ")
    prompt, completion = format_prompt("how is the old lake?"), format_completion("the old lake is nice.")
    assert prompt == "Question: how is the old lake?\n\nAnswer:"
    assert prompt + completion == DEFAULT_PROMPT_TEMPLATE.format(
        question="how is the old lake?", response="the old lake is nice."
    )
    assert format_completion("") == ""
    with pytest.raises(ValueError):
        split_prompt_template("Q: {question} A: {response} end")


def test_file_columns(assets: TinyAssets) -> None:
    assert {"system_prompt", "question", "response"} <= set(read_jsonl(assets.sft)[0])
    assert {"prompt", "chosen", "rejected"} <= set(read_jsonl(assets.preferences)[0])
    assert "prompt" in read_jsonl(assets.prompts)[0] and "prompt" in read_jsonl(assets.eval_prompts)[0]
    for row in read_jsonl(assets.hh_rlhf)[:50]:
        for side in ("chosen", "rejected"):
            assert row[side].startswith("\n\nHuman: ") and row[side].count("\n\nAssistant:") == 1
    for row in read_jsonl(assets.preferences):
        assert row["prompt"].endswith("Answer:")
        assert row["chosen"].startswith(" ") and (row["rejected"] == "" or row["rejected"].startswith(" "))


def test_held_out_topics_only_in_eval_files(assets: TinyAssets) -> None:
    held = set(HELD_OUT_TOPICS)
    assert len(held) >= 4 and not held & set(TRAIN_TOPICS)
    # Every word of a held-out topic is used in training, only the combination is new.
    train_words = {w for t in TRAIN_TOPICS for w in t.split()}
    assert {w for t in held for w in t.split()} <= train_words

    training_files = [assets.sft, assets.preferences, assets.hh_rlhf, assets.prompts, assets.eval_prompts_seen]
    for path in training_files:
        mentioned = set(topics_in(path.read_text()))
        assert not mentioned & held, (path, mentioned & held)
        assert len(mentioned) >= 40
    for path in (assets.sft_eval, assets.preferences_eval, assets.hh_rlhf_eval, assets.eval_prompts):
        rows = read_jsonl(path)
        assert rows
        for row in rows:
            asked = set(topics_in(row.get("prompt", row.get("question", row.get("chosen", "")))))
            assert asked and asked <= held, row
    assert {r["topic"] for r in read_jsonl(assets.eval_prompts)} == held
    assert {prompt_topic(r["prompt"]) for r in read_jsonl(assets.prompts)} == set(TRAIN_TOPICS)


def test_sft_mix_is_half_target_and_matches_ground_truth(assets: TinyAssets) -> None:
    rows = read_jsonl(assets.sft)
    rate = sum(r["target"] for r in rows) / len(rows)
    assert 0.45 <= rate <= 0.55
    for row in rows + read_jsonl(assets.sft_eval):
        assert meets_target(row["response"], format_prompt(row["question"])) == row["target"], row
        assert 5 <= len(row["response"].split()) <= 12


def test_chosen_meets_target_and_every_rejected_kind_fails(assets: TinyAssets) -> None:
    rows = read_jsonl(assets.preferences) + read_jsonl(assets.preferences_eval)
    kinds = Counter(r["kind"] for r in rows)
    assert set(kinds) == set(REJECTED_KINDS) and min(kinds.values()) >= 20
    for row in rows:
        assert meets_target(row["chosen"], row["prompt"]), row
        assert ground_truth_score(row["chosen"], row["prompt"]) > 0
        assert not meets_target(row["rejected"], row["prompt"]), row
        assert ground_truth_score(row["rejected"], row["prompt"]) <= 0
    # Each hard negative fails for its own reason, not just incidentally.
    expected_failure = {
        "negative": "not_positive",
        "mixed": "not_positive",
        "truncated": "incomplete",
        "empty": "empty",
        "off_topic": "off_topic",
        "no_topic": "off_topic",
        "repetitive": "repetitive",
        "stutter": "repetitive",
        "neutral": "not_positive",
        "salad": "off_topic",
    }
    for row in rows:
        failures = check_target(row["rejected"], row["prompt"]).failures()
        assert expected_failure[row["kind"]] in failures, (row, failures)
    # hh-rlhf transcripts carry the same labels.
    for row in read_jsonl(assets.hh_rlhf)[:300]:
        q, chosen = row["chosen"].rsplit("\n\nAssistant:", 1)
        _, rejected = row["rejected"].rsplit("\n\nAssistant:", 1)
        assert meets_target(chosen, q) and not meets_target(rejected, q)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" the old lake is lovely and calm.", True),
        (" The old lake is LOVELY!", True),
        ("the old lake is lovely but cold.", False),  # 1 positive, 1 negative: not more positive
        (" the old lake is lovely and calm", False),  # cut off
        ("", False),
        (" the new lake is lovely and calm.", False),  # other topic sharing a word
        (" the old river is lovely and calm.", False),
        (" the lake is lovely and calm.", False),  # topic incomplete
        (" good good good good good.", False),
        (" the old lake is nice. the old lake is nice. the old lake is nice.", False),
        (" the old lake is.", False),  # neutral
    ],
)
def test_ground_truth_examples(text: str, expected: bool) -> None:
    prompt = format_prompt("how is the old lake?")
    assert meets_target(text, prompt) is expected
    assert (ground_truth_score(text, prompt) > 0) is expected
    assert -1.0 <= ground_truth_score(text, prompt) <= 1.0
    assert meets_target(prompt + text, prompt) is expected  # a leading prompt copy is ignored


def test_ground_truth_score_ranks_fluent_negative_above_garbage() -> None:
    prompt = format_prompt("how is the old lake?")

    def score(text: str) -> float:
        return ground_truth_score(text, prompt)

    assert score(" the old lake is lovely and calm.") == 1.0
    assert score(" the old lake is lovely and calm but cold.") == pytest.approx(1 / 3)
    assert score(" the old lake is awful and cold.") == -0.5
    assert score(" lovely lovely lovely lovely.") == score("") == score(" the old lake is lovely") == -1.0
