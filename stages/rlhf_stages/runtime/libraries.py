"""Keep optional libraries that a stage will not use out of its process.

peft imports bitsandbytes whenever it is installed (which imports torch's compiler stack), and TRL
imports wandb whenever it is installed: about 1.4 s of CPU in every stage process (measured on the
SFT stage of the tiny task: 8.1-8.5 s user without this, 6.7-6.8 s with it), paid by every stage
Pod start, retry and torchrun worker, even though only a quantized model needs bitsandbytes and
only a spec with ``wandb`` reports to W&B. A ``None`` entry in ``sys.modules`` makes
``importlib.util.find_spec`` answer "not installed" and ``import`` raise ImportError, which both
libraries' importers handle as an absent optional dependency.

bitsandbytes stays when any model might need it: the spec quantizes somewhere, a model comes from
the hub (it may be saved quantized, and we cannot look before the download), or a model directory
on the volume holds a quantized checkpoint (``quantization_config`` in its config.json).

Done only in a stage's own process (``python -m rlhf_stages``), before anything imports them; never
in a process that runs stages in-process (the tests), whose later stages might need them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rlhf_api import ModelSource
from rlhf_api.layout import StageInvocation


def _quantization_modes(node: Any) -> Iterator[str]:
    """Every ``quantization.mode`` anywhere in the spec (each stage section may have one)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "quantization" and isinstance(value, dict):
                yield str(value.get("mode") or "none")
            else:
                yield from _quantization_modes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _quantization_modes(value)


def _saved_quantized(workspace: Path, source: ModelSource) -> bool:
    if source.path is None:
        return True  # a hub model: unknown until downloaded
    try:
        config = json.loads((workspace / source.path / "config.json").read_text())
    except (OSError, ValueError):
        return False  # not there (yet): an earlier stage's output, saved unquantized by the stages
    return isinstance(config, dict) and "quantization_config" in config


def unused(invocation: StageInvocation) -> list[str]:
    """The optional libraries a stage of this invocation never uses."""
    spec = invocation.spec
    names = []
    models = [s for _, s in spec.input_sources() if isinstance(s, ModelSource)]
    if all(mode == "none" for mode in _quantization_modes(spec.model_dump())) and not any(
        _saved_quantized(Path(invocation.workspace), m) for m in models
    ):
        names.append("bitsandbytes")
    if spec.wandb is None:
        names.append("wandb")
    return names


def _config_path(argv: Sequence[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def leave_out_unused(argv: Sequence[str]) -> list[str]:
    """Hide the libraries this stage never uses; returns their names. A config that cannot be read
    or is invalid hides nothing: the entrypoint then reports what is wrong with it."""
    from rlhf_stages.runtime.context import StageConfigError
    from rlhf_stages.runtime.entrypoint import load_invocation

    path = _config_path(argv)
    if path is None:
        return []
    try:
        invocation = load_invocation(path)
    except StageConfigError:
        return []
    hidden = [name for name in unused(invocation) if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    return hidden
