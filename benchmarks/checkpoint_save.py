"""Benchmark: how long a SIGTERM'd stage needs to save, for models of increasing size, and what that
means for a 7B policy and the default ``runtime.terminationGracePeriodSeconds`` (600 s, read from rlhf_api).

    PYTHONPATH=operator:stages python benchmarks/checkpoint_save.py --dir DIR [--sizes 125m,350m,1.3b]

``DIR`` should be on the storage the stages write checkpoints to (the run's volume). Models are
built locally from OPT configs with random weights (nothing is downloaded), float32 as the stages
load them. For each size it times what a stopped stage writes:

* ``lora+adam``: a LoRA adapter (the API's default LoRA settings) and its AdamW state, written by
  PPO's own checkpoint code (``ppo_checkpoint.write_shared``); GRPO/RLOO (Trainer) write the same
  bytes as an adapter plus ``optimizer.pt``;
* ``model``: the whole model as ``save_pretrained`` writes it (ReST's full-weight checkpoint, and
  the model part of a full-weight Trainer checkpoint);
* ``model+adam``: the model plus AdamW state for every weight (a full-weight GRPO/RLOO checkpoint;
  PPO with all weights saves this for the policy *and* the value model, about twice as much).

Each is timed to the end of writing (``write_s``, the data may still be in the page cache) and to
the end of ``fsync`` of every file (``durable_s``: on the device; the honest number, since a node
can go away with the Pod). Sizes whose model + AdamW state would not fit in the free memory are
skipped. The 7B lines are extrapolated: bytes counted from a Llama-2-7B-shaped model built on the
meta device (no memory), time = bytes / the slowest durable throughput of the saves of 1 GB or
more (the storage's sustained write rate; small saves are dominated by fixed costs).
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path[:0] = [str(REPO / "operator"), str(REPO / "stages")]

# facebook/opt-* shapes (transformers' OPTConfig); 50272 tokens, 2048 positions.
SIZES: dict[str, dict[str, Any]] = {
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072, "num_attention_heads": 12},
    "350m": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "ffn_dim": 4096,
        "num_attention_heads": 16,
        "word_embed_proj_dim": 512,
        "do_layer_norm_before": False,
    },
    "1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192, "num_attention_heads": 32},
    "2.7b": {"hidden_size": 2560, "num_hidden_layers": 32, "ffn_dim": 10240, "num_attention_heads": 32},
    # Not an OPT size: the dry run of benchmarks/gpu.py (seconds on a CPU). Its vocabulary is small for
    # speed but still larger than the tiny tokenizer's, like OPT's 50272 rows over GPT-2's 50265 tokens.
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "ffn_dim": 256,
        "num_attention_heads": 4,
        "vocab_size": 1024,
        "max_position_embeddings": 512,
    },
}
MARGIN = 4 * 2**30  # free memory left to everything else on the machine
MB = 1e6


def grace_period_s() -> int:
    """The default ``runtime.terminationGracePeriodSeconds`` (the API owns it; the chart does not override it)."""
    from rlhf_api.runtime import Runtime

    default = Runtime.model_fields["termination_grace_period_seconds"].default
    assert isinstance(default, int)
    return default


GRACE_S = grace_period_s()


def opt_config(name: str) -> Any:
    """An OPTConfig of one of SIZES (50272 tokens and 2048 positions unless the entry says otherwise)."""
    from transformers import OPTConfig

    return OPTConfig(**{"vocab_size": 50272, "max_position_embeddings": 2048, **SIZES[name]})


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def fits(name: str, what: str, extra: int) -> bool:
    """Whether ``extra`` more bytes leave a margin of free memory (others share this machine)."""
    free = mem_available()
    if extra + MARGIN > free:
        print(f"{name}: {what} skipped, needs {extra / 2**30:.1f} GiB more, {free / 2**30:.1f} GiB free", flush=True)
        return False
    return True


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed_save(target: Path, save: Any) -> tuple[int, float, float]:
    """(bytes, seconds to write, seconds to write and fsync) of ``save(target)``."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    os.sync()  # start from clean page cache: earlier writes must not be flushed inside this timing
    started = time.perf_counter()
    save(target)
    written = time.perf_counter() - started
    fsync_tree(target)
    durable = time.perf_counter() - started
    size = dir_bytes(target)
    shutil.rmtree(target, ignore_errors=True)
    return size, written, durable


def adam_state(optimizer: Any, params: list[Any], torch: Any) -> None:
    """AdamW state for ``params`` as after a step (random moments, so no filesystem can compress them)."""
    for p in params:
        optimizer.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.randn_like(p) * 1e-3,
            "exp_avg_sq": torch.rand_like(p) * 1e-6,
        }


def lora_params_7b() -> tuple[int, int]:
    """(all parameters, LoRA parameters with the default settings) of a Llama-2-7B-shaped model."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf_api import LoRA
    from rlhf_stages.runtime.models import lora_config

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        base = sum(p.numel() for p in model.parameters())
        peft_model = get_peft_model(model, lora_config(LoRA(), "CAUSAL_LM"))
        lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return base, lora


def _record(rows: list[dict[str, Any]], name: str, n: int, what: str, target: Path, save: Any) -> None:
    size, written, durable = timed_save(target, save)
    rows.append({"size": name, "params": n, "what": what, "bytes": size, "write_s": written, "durable_s": durable})


def _save_lora(model: Any, optimizer: Any) -> Any:
    from rlhf_stages.methods.ppo import checkpoint as ppo_checkpoint

    return lambda d: ppo_checkpoint.write_shared(d, model, optimizer, 1, {"history": []})


def _save_full(model: Any, optimizer: Any) -> Any:
    import torch

    def save(d: Path) -> None:
        model.save_pretrained(d)
        torch.save(optimizer.state_dict(), d / "optimizer.pt")

    return save


def measure(name: str, workdir: Path) -> list[dict[str, Any]]:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_api import LoRA
    from rlhf_stages.runtime.models import lora_config

    config = opt_config(name)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if not fits(name, "the model", n * 4):
        return []
    torch.manual_seed(0)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config)  # random initialisation, float32
    print(f"{name}: {n / 1e6:.0f} M parameters, built in {time.perf_counter() - started:.0f} s", flush=True)
    rows: list[dict[str, Any]] = []

    # LoRA adapter + its AdamW state, as PPO writes it (trainable.pt, optimizer.pt, extra.json).
    peft_model = get_peft_model(model, lora_config(LoRA(), "CAUSAL_LM"))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    lora_optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    adam_state(lora_optimizer, trainable, torch)
    _record(rows, name, n, "lora+adam", workdir / "lora", _save_lora(peft_model, lora_optimizer))
    base = peft_model.unload()  # the base model again, without LoRA layers
    peft_model = lora_optimizer = trainable = None
    gc.collect()

    # The whole model (safetensors), then the model plus AdamW state for every weight.
    _record(rows, name, n, "model", workdir / "model", base.save_pretrained)
    if fits(name, "the model and AdamW state", n * 4 * 2):  # the model is already in memory
        params = list(base.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        adam_state(optimizer, params, torch)
        _record(rows, name, n, "model+adam", workdir / "full", _save_full(base, optimizer))
    for row in rows:
        print(_row(row), flush=True)
    return rows


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['size']} | {r['params'] / 1e6:.0f} M | {r['what']} | {r['bytes'] / MB:,.1f} | {r['write_s']:.2f} | "
        f"{r['durable_s']:.2f} | {r['bytes'] / MB / r['durable_s']:,.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where to write (the checkpoints' storage)")
    parser.add_argument("--sizes", default="125m,350m,1.3b", help=f"comma-separated, of {', '.join(SIZES)}")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    workdir = args.dir / f"checkpoint-save-bench-{os.getpid()}"
    rows: list[dict[str, Any]] = []
    try:
        for name in args.sizes.split(","):
            rows += measure(name.strip(), workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("| size | parameters | saved | MB | write s | write+fsync s | MB/s (fsync'd) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(_row(row))
    if not rows:
        return

    # Extrapolation to 7B at the slowest durable throughput of the big saves (>= 1 GB; small ones are
    # dominated by fixed costs): shared or virtual storage varies from one save to the next.
    big = [r for r in rows if r["bytes"] >= 1e9] or rows
    slowest = min(big, key=lambda r: r["bytes"] / r["durable_s"])
    throughput = slowest["bytes"] / slowest["durable_s"]
    base, lora = lora_params_7b()
    fp32 = 4
    cases = [
        ("PPO, LoRA (policy + value adapters, AdamW)", 2 * lora * fp32 * 3),
        ("GRPO/RLOO, LoRA (adapter, AdamW)", lora * fp32 * 3),
        ("ReST, LoRA (adapter)", lora * fp32),
        ("ReST, all weights (model)", base * fp32),
        ("GRPO/RLOO, all weights (model, AdamW)", base * fp32 * 3),
        ("PPO, all weights (policy + value, AdamW)", 2 * base * fp32 * 3),
    ]
    print()
    print(
        f"7B policy (Llama-2-7B shape: {base / 1e9:.2f} B parameters, default LoRA {lora / 1e6:.1f} M), float32, "
        f"at {throughput / MB:,.0f} MB/s (the slowest save of 1 GB or more: {slowest['size']} {slowest['what']}):"
    )
    print()
    print(f"| 7B stage | GB | seconds at {throughput / MB:,.0f} MB/s | MB/s needed to save in {GRACE_S} s |")
    print("|---|---|---|---|")
    for what, size in cases:
        print(f"| {what} | {size / 1e9:,.2f} | {size / throughput:,.1f} | {size / MB / GRACE_S:,.1f} |")


if __name__ == "__main__":
    main()
