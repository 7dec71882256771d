"""``python -m rlhf_stages.tiny --out DIR [--judge]``: build the tiny task's assets, and its judge.

The command lives here, above ``assets`` and ``judge``, so that the judge (which trains on the
assets) is the only one of the two that imports the other.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from rlhf_stages.tiny.assets import build_tiny_assets, build_tiny_data
from rlhf_stages.tiny.judge import build_tiny_judge


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_stages.tiny",
        description="Build a tiny tokenizer, Llama model and synthetic RLHF datasets (offline).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for data sampling and model init")
    parser.add_argument("--data-only", action="store_true", help="write only the jsonl files")
    parser.add_argument(
        "--judge", action="store_true", help="also train the tiny RLAIF judge into OUT/judge (rlhf_stages.tiny.judge)"
    )
    args = parser.parse_args(argv)
    build = build_tiny_data if args.data_only else build_tiny_assets
    assets = build(args.out, args.seed)
    print(json.dumps({k: str(v) for k, v in vars(assets).items()}, indent=2))
    if args.judge:
        print(json.dumps({"judge": build_tiny_judge(args.out, seed=args.seed)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
