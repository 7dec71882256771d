"""Loading models and tokenizers, quantization (bitsandbytes) and LoRA (PEFT).

Rules the stages rely on:

* A model is a hub id or a directory on the volume (:func:`locate`); a hub id the inputs stage
  staged is read from its copy in the input cache (the hub is offline then); stages never trust the
  absolute base path a PEFT adapter records (it was another container's), they resolve the
  base from the run's lineage and pass it explicitly (:func:`merge_adapter`).
* Quantization needs CUDA. Without it a stage fails with a clear configuration error, unless
  ``RLHF_ALLOW_CPU_QUANTIZATION=1`` (tests) lets bitsandbytes run on CPU. Never a silent fallback.
* A standalone model is always saved unquantized, with its tokenizer (:func:`save_standalone`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_api import LoRA, ModelSource, Quantization
from rlhf_stages.runtime import input_cache
from rlhf_stages.runtime.context import StageConfigError, StageContext, StageInputMissing

ALLOW_CPU_QUANTIZATION_ENV = "RLHF_ALLOW_CPU_QUANTIZATION"


@dataclass(frozen=True)
class ModelLocation:
    """Where ``from_pretrained`` finds a model, and how to ask for it."""

    id: str
    """A local directory or a hub id."""
    label: str
    """How manifests name it: the volume-relative path or the hub id."""
    revision: str | None = None
    trust_remote_code: bool = False

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision:
            kw["revision"] = self.revision
        token = os.environ.get("HF_TOKEN")
        if token and not Path(self.id).is_dir():
            kw["token"] = token  # hub downloads only; never logged
        return kw


def locate(ctx: StageContext, source: ModelSource) -> ModelLocation:
    """A model source as ``from_pretrained`` reads it: the inputs stage's copy of a hub id when it made one."""
    staged = input_cache.staged_copy(ctx, source)
    if staged is not None:
        return ModelLocation(str(staged), source.name or "", None, source.trust_remote_code)
    if source.path is not None:
        return ModelLocation(str(ctx.volume_path(source.path)), source.path, None, source.trust_remote_code)
    return ModelLocation(source.name or "", source.name or "", source.revision, source.trust_remote_code)


def local(ctx: StageContext, path: Path) -> ModelLocation:
    """A model directory on the volume, e.g. an earlier stage's output."""
    return ModelLocation(str(path), ctx.relative(path))


def check_model_dir(location: ModelLocation, what: str) -> None:
    """Exit 3 early when a model directory on the volume is missing (hub ids are checked on load)."""
    path = Path(location.id)
    if path.is_absolute() and not (path / "config.json").is_file():
        raise StageInputMissing(f"{what}: no saved model at {location.label} (config.json missing)")


def check_quantization(q: Quantization, what: str, gpus: int) -> None:
    """Cheap check before any import: quantization on a pod without GPUs is a config error."""
    if q.mode != "none" and gpus == 0 and not _cpu_quantization_allowed():
        raise StageConfigError(_no_cuda_message(q, what))


def _cpu_quantization_allowed() -> bool:
    return os.environ.get(ALLOW_CPU_QUANTIZATION_ENV, "") in ("1", "true", "yes")


def _no_cuda_message(q: Quantization, what: str) -> str:
    return (
        f"{what}.quantization.mode: {q.mode} loads the base through bitsandbytes, which needs a CUDA GPU, "
        f"and this stage has none; give the stage GPUs (resources.gpus) or set quantization.mode: none "
        f"({ALLOW_CPU_QUANTIZATION_ENV}=1 forces bitsandbytes on CPU, for tests)"
    )


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def training_dtype(bf16: bool, fp16: bool) -> str:
    """The dtype trained weights are saved in: the mixed-precision dtype if one is used."""
    return "bfloat16" if bf16 else "float16" if fp16 else "float32"


def quantization_config(q: Quantization, what: str) -> Any | None:
    """BitsAndBytesConfig for 4/8 bit, after checking that it can run here."""
    if q.mode == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available() and not _cpu_quantization_allowed():
        raise StageConfigError(_no_cuda_message(q, what))
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
    )


def _device_map() -> dict[str, Any]:
    """Quantized weights are placed at load time: on this process's GPU, or the CPU."""
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def load_tokenizer(location: ModelLocation) -> Any:
    """The tokenizer, with a pad token.

    A missing pad token becomes UNK when there is one, else EOS. Not EOS first: a sequence
    classifier reads its score at the last non-pad token, so with pad == EOS the EOS that ends
    every scored answer would be skipped.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location.id, **location.kwargs())
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise StageConfigError(f"tokenizer of {location.label} has no pad, UNK or EOS token")
        tokenizer.pad_token = fallback
    return tokenizer


def load_model(location: ModelLocation, auto_class: Any, q: Quantization, what: str, dtype: str, **extra: Any) -> Any:
    """``auto_class.from_pretrained`` with quantization when asked for."""
    bnb = quantization_config(q, what)
    kwargs: dict[str, Any] = {**location.kwargs(), **extra}
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = _device_map()
        kwargs["dtype"] = torch_dtype(q.compute_dtype)
    else:
        kwargs["dtype"] = torch_dtype(dtype)
    try:
        return auto_class.from_pretrained(location.id, **kwargs)
    except OSError as exc:
        raise StageInputMissing(f"{what}: cannot load model {location.label}: {exc}") from exc


def lora_config(lora: LoRA, task_type: str) -> Any:
    from peft import LoraConfig

    targets: Any = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=targets,
        task_type=task_type,
    )


def merge_adapter(base: ModelLocation, adapter_dir: Path, auto_class: Any, dtype: str, **extra: Any) -> Any:
    """Load the base unquantized in ``dtype``, apply the adapter and fold it in.

    The base is given explicitly: the path recorded in adapter_config.json belonged to the
    container that trained it.
    """
    from peft import PeftModel

    model = auto_class.from_pretrained(base.id, dtype=torch_dtype(dtype), **base.kwargs(), **extra)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.merge_and_unload()


def record_adapter_base(adapter_dir: Path, base_label: str) -> None:
    """Replace the absolute base path PEFT recorded with the volume-relative one (for humans)."""
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_label
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def save_standalone(
    model: Any, tokenizer: Any, out_dir: Path, dtype: str | None = None, state_dict: dict[str, Any] | None = None
) -> None:
    """Save weights (cast to ``dtype`` when given) and tokenizer side by side. ``state_dict``: the
    weights to write instead of the model's own (FSDP's gathered ones, ``training.weights_to_save``)."""
    if dtype is not None:
        model = model.to(torch_dtype(dtype))
        if state_dict is not None:
            state_dict = {k: v.to(torch_dtype(dtype)) if v.is_floating_point() else v for k, v in state_dict.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), state_dict=state_dict)
    tokenizer.save_pretrained(str(out_dir))


def trainable_state(module: Any) -> dict[str, Any]:
    """The parameters that train (a LoRA adapter, or all weights), not the frozen base weights, on the CPU.

    One owner for "the weights a stage changes": PPO's checkpoints and the watch's kept candidate.
    """
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: Any, state: dict[str, Any]) -> None:
    """Put back what :func:`trainable_state` took; every trainable parameter must be in ``state``."""
    import torch

    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks trained parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
