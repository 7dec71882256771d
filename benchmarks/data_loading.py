"""Benchmark: peak memory of sampling ``maxSamples`` rows from a local deeplake dataset, through
``rlhf_stages.runtime.data.load_rows`` (reads only the chosen rows) against the whole-dataset read
that data.py did before (``ds[column][:]`` for every column, then shuffle and select).

    PYTHONPATH=operator:stages python benchmarks/data_loading.py [--dir DIR] [--rows 300000]
        [--max-samples 1000] [--row-chars 2000] [--keep]

Builds a deeplake dataset of ``--rows`` rows (two text columns of ``--row-chars`` characters and
an id) under DIR (a temporary directory unless given; reused if already built there), then loads
it once per way in a fresh process, each with an empty datasets cache, and prints one line of
JSON per way and a table. RSS is read from the kernel: ``base`` after the imports, ``peak`` the
process's maximum (ru_maxrss). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMPLETE = ".benchmark-complete"


def build(lake: Path, rows: int, row_chars: int) -> float:
    """Write the dataset in batches (never all rows in memory); seconds taken."""
    import deeplake
    import numpy as np

    started = time.monotonic()
    rng = np.random.default_rng(0)
    # Rows are slices of one pool of random words: text-like (lz4 compresses it about as much as
    # prose) and fast to make.
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(2000)]
    pool = " ".join(rng.choice(words, 3_000_000))
    shutil.rmtree(lake, ignore_errors=True)
    ds = deeplake.create(str(lake))
    ds.add_column("question", deeplake.types.Text())
    ds.add_column("response", deeplake.types.Text())
    ds.add_column("id", deeplake.types.Int64())
    batch = 10_000
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        offsets = rng.integers(0, len(pool) - row_chars, size=(n, 2))
        ds.append(
            {
                "question": [pool[o : o + row_chars] for o in offsets[:, 0]],
                "response": [pool[o : o + row_chars] for o in offsets[:, 1]],
                "id": np.arange(start, start + n),
            }
        )
    ds.commit()
    (lake / COMPLETE).write_text(json.dumps({"rows": rows, "row_chars": row_chars}))
    return time.monotonic() - started


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _whole_then_sample(location: str, max_samples: int, seed: int) -> Any:
    """data.py before lazy sampling (commit 5343192): every column read whole, then sampled."""
    import deeplake
    from datasets import Dataset

    ds = deeplake.open_read_only(location)
    columns: dict[str, list[Any]] = {}
    for column in ds.schema.columns:
        values: Any = ds[column.name][:]
        columns[column.name] = values.tolist() if hasattr(values, "tolist") else list(values)
    rows = Dataset.from_dict(columns)
    return rows.shuffle(seed=seed).select(range(max_samples))


def measure(way: str, workspace: Path, max_samples: int, seed: int) -> dict[str, Any]:
    """Load in this process (a fresh one per way) and report its memory."""
    import deeplake  # noqa: F401  (imported before the baseline, as both ways need it)
    import yaml
    from datasets import Dataset  # noqa: F401

    from rlhf_api import DatasetSource
    from rlhf_api.layout import RunRef, StageInvocation
    from rlhf_stages.runtime import data
    from rlhf_stages.runtime.context import StageContext

    spec = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())["spec"]
    ctx = StageContext.create(
        StageInvocation(stage="sft", run=RunRef(name="bench"), workspace=str(workspace), spec=spec)  # type: ignore[arg-type]
    )
    base = _rss_mib()
    started = time.monotonic()
    if way == "lazy":
        source = DatasetSource.model_validate({"format": "deeplake", "path": "lake", "maxSamples": max_samples})
        rows = data.load_rows(ctx, source, seed)
    else:
        rows = _whole_then_sample(str(workspace / "lake"), max_samples, seed)
    seconds = time.monotonic() - started
    ids = rows["id"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "way": way,
        "rows": len(ids),
        "distinct": len(set(ids)),
        "seconds": round(seconds, 2),
        "base_rss_mib": round(base, 1),
        "peak_rss_mib": round(peak, 1),
        "growth_mib": round(peak - base, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where the dataset is built (kept); default: a temporary directory")
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--row-chars", type=int, default=2000, help="characters per text cell (two per row)")
    parser.add_argument("--max-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", choices=["lazy", "whole"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, args.dir, args.max_samples, args.seed)))
        return

    workspace = args.dir or Path(tempfile.mkdtemp(prefix="data-loading-"))
    lake = workspace / "lake"
    marker = lake / COMPLETE
    wanted = {"rows": args.rows, "row_chars": args.row_chars}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"reusing {lake}")
    else:
        print(f"building {lake}: {args.rows} rows, 2 x {args.row_chars} characters each")
        print(f"  built in {build(lake, args.rows, args.row_chars):.1f} s")
    size = sum(f.stat().st_size for f in lake.rglob("*") if f.is_file())
    print(f"  on disk: {size / 2**20:.0f} MiB; text in the rows: {args.rows * 2 * args.row_chars / 2**20:.0f} MiB")

    results = []
    for way in ("lazy", "whole"):
        with tempfile.TemporaryDirectory(prefix="hf-datasets-") as cache:
            env = {**os.environ, "HF_DATASETS_CACHE": cache, "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'stages'}"}
            child = [sys.executable, __file__, "--measure", way, "--dir", str(workspace)]
            out = subprocess.run(
                [*child, "--max-samples", str(args.max_samples), "--seed", str(args.seed)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(result))
        results.append(result)
    print(f"\n{'way':6} {'rows':>6} {'seconds':>8} {'base MiB':>9} {'peak MiB':>9} {'growth MiB':>11}")
    for r in results:
        print(
            f"{r['way']:6} {r['rows']:>6} {r['seconds']:>8} {r['base_rss_mib']:>9}"
            f" {r['peak_rss_mib']:>9} {r['growth_mib']:>11}"
        )
    if args.dir is None:
        shutil.rmtree(workspace)


if __name__ == "__main__":
    main()
