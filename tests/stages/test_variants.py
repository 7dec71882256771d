"""Stage variants, run in-process with a few steps: QLoRA on CPU, chat data with LoRA, encoder reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import read_result, run_dir, tiny_spec, write_invocation
from rlhf_stages.runtime.entrypoint import main
from rlhf_stages.tiny.assets import read_jsonl

pytestmark = pytest.mark.training

FEW_STEPS = {"maxSteps": 3, "saveSteps": 100, "loggingSteps": 1, "perDeviceTrainBatchSize": 4}


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_qlora_on_cpu_with_the_allow_switch(
    workspace: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    from transformers import AutoConfig

    monkeypatch.setenv("RLHF_ALLOW_CPU_QUANTIZATION", "1")
    run = f"qlora-{mode}"
    spec = tiny_spec(
        sft={
            "lora": {"enabled": True, "r": 4, "alpha": 8},
            "quantization": {"mode": mode, "computeDtype": "float32"},
            "dataset": {"maxSamples": 64},
            "training": FEW_STEPS,
        }
    )
    assert main(["sft", "--config", str(write_invocation(workspace, "sft", run, spec))]) == 0, read_result(in_process)
    out = run_dir(workspace, run) / "sft"
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "assets/base-model"  # not this machine's path
    config = AutoConfig.from_pretrained(out / "model")
    assert getattr(config, "quantization_config", None) is None  # standalone, loads without bitsandbytes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["details"]["quantization"] == mode and manifest["step"] == 3


def test_chat_messages_with_lora(workspace: Path, in_process: Path) -> None:
    rows = read_jsonl(workspace / "assets" / "data" / "sft.jsonl")[:64]
    chats = [
        {
            "conversation": [
                {"role": "system", "content": r["system_prompt"]},
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["response"]},
            ]
        }
        for r in rows
    ]
    path = workspace / "data" / "chat.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    spec = tiny_spec(
        sft={
            "dataset": {"path": "data/chat.jsonl", "evalFraction": 0.1},
            "messagesColumn": "conversation",
            "lora": {"enabled": True, "r": 4, "alpha": 8},
            "training": FEW_STEPS,
        }
    )
    config = write_invocation(workspace, "sft", "chat", spec)
    assert main(["sft", "--config", str(config)]) == 0, read_result(in_process)
    out = run_dir(workspace, "chat") / "sft"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "model.safetensors").is_file()
    assert read_result(in_process)["metrics"]["eval_loss"] > 0


def _tiny_bert(workspace: Path) -> str:
    """A DeBERTa-style encoder stand-in: tiny BERT with a WordPiece tokenizer (no EOS token)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from rlhf_stages.tiny.ground_truth import words

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", ":", "!", "human", "assistant"]
    for row in read_jsonl(workspace / "assets" / "data" / "hh_rlhf.jsonl")[:500]:
        for word in words(row["chosen"] + " " + row["rejected"]):
            if word not in vocab:
                vocab.append(word)
    target = workspace / "assets" / "tiny-bert"
    target.mkdir(parents=True, exist_ok=True)
    (target / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(target / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return "assets/tiny-bert"


def test_encoder_reward_model_on_hh_transcripts(workspace: Path, in_process: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    spec = tiny_spec(
        reward={
            "model": {"path": _tiny_bert(workspace)},
            "dataset": {"path": "assets/data/hh_rlhf.jsonl", "maxSamples": 200, "evalFraction": 0.1},
            "lora": {"enabled": True, "r": 4, "alpha": 8, "targetModules": ["query", "value"]},
            "training": FEW_STEPS | {"learningRate": 1e-3},
        }
    )
    assert main(["reward", "--config", str(write_invocation(workspace, "reward", "encoder", spec))]) == 0
    out = run_dir(workspace, "encoder") / "reward"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["details"]["eosAppended"] is False  # an encoder ends with [SEP], not EOS
    assert manifest["inputs"]["model"] == "assets/tiny-bert" and manifest["inputs"]["evalPairs"] == 20
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.num_labels == 1 and type(model).__name__ == "BertForSequenceClassification"
    # The classifier scores the last non-pad token: the merged model must keep the pad id.
    assert model.config.pad_token_id is not None
    assert (out / "adapter" / "tokenizer_config.json").exists()  # the adapter loads on its own, as SFT's does
    assert 0.0 <= read_result(in_process)["metrics"]["eval_accuracy"] <= 1.0


def test_wandb_offline_when_the_spec_asks(workspace: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    spec = tiny_spec(
        wandb={"project": "tiny", "mode": "offline"}, sft={"dataset": {"maxSamples": 32}, "training": FEW_STEPS}
    )
    assert main(["sft", "--config", str(write_invocation(workspace, "sft", "wandb", spec))]) == 0
    runs = list((run_dir(workspace, "wandb") / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run on the volume"
