#!/usr/bin/env python
"""What a scoring option costs the one ``Scorer``: rows/s of AE bundles that differ in one setting only.

    python benchmarks/scorer_cost.py [--rows 1000000] [--width 32] [--repeat 5] [--threads 2]

Two AE bundles are trained on the same rows (the default, ``score="joint"``, and ``score="reconstruction"``,
the score before it; everything else alike), then ``Scorer.score_table`` scores the same Arrow table with
each, alternating A, B, A, B … ``--repeat`` times, so both see the same machine load; the median of each is
kept and their ratio reported. The full output is measured (score, label, top features, version), as the
batch job and the endpoint produce it. Written to ``benchmarks/results/scorer_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import environment, loadavg  # noqa: E402

VARIANTS = {"joint (default)": {}, "reconstruction": {"score": "reconstruction"}}


def table(rng: np.random.Generator, rows: int, width: int) -> pa.Table:
    # Correlated columns (a random linear mix), so the model has structure to learn.
    mix = rng.normal(size=(width, width)) / np.sqrt(width)
    x = rng.normal(size=(rows, width)) @ mix
    return pa.table({f"f{j}": x[:, j].astype(np.float32) for j in range(width)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scorer_cost.json"))
    args = p.parse_args(argv)
    import torch
    from unusual.models import Detector, Scorer

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    train, data = table(rng, 20_000, args.width), table(rng, args.rows, args.width)
    scorers = {}
    for name, params in VARIANTS.items():
        det = Detector("ae", epochs=3, seed=0, verbose=False, **params).fit(train)
        scorers[name] = Scorer(det.bundle_)
        scorers[name].score_table(data.slice(0, 65_536))  # warm-up, unrecorded
    seconds = {name: [] for name in scorers}
    for _ in range(args.repeat):
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            out = scorer.score_table(data)
            seconds[name].append(time.perf_counter() - t0)
            assert out.num_rows == data.num_rows
    rows_per_s = {name: args.rows / statistics.median(s) for name, s in seconds.items()}
    default, before = rows_per_s["joint (default)"], rows_per_s["reconstruction"]
    record = {
        "command": " ".join(["python", "benchmarks/scorer_cost.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(("models", "torch", "numpy", "pyarrow")),
        "load_average_end": loadavg(),
        "rows": args.rows,
        "width": args.width,
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "rows_per_s": rows_per_s,
        "ratio_default_to_reconstruction": default / before,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    for name, r in rows_per_s.items():
        print(f"{name:18s} {r:12,.0f} rows/s")
    print(f"ratio default / reconstruction: {default / before:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
