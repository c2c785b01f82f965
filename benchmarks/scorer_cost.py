"""What a scoring option costs the one ``Scorer``: rows/s of two AE bundles trained on the same rows, alike but
for ``score`` (the default "joint" and "reconstruction"), scoring the same Arrow table alternately, A, B, A, B;
medians and their ratio. benchmarks/README.md, "What the joint score costs the Scorer".

    python benchmarks/scorer_cost.py [--rows 1000000] [--width 32] [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import pyarrow as pa
from harness import RESULTS, loadavg, options, provenance, write_result

VARIANTS = {"joint (default)": {}, "reconstruction": {"score": "reconstruction"}}


def table(rng: np.random.Generator, rows: int, width: int) -> pa.Table:
    mix = rng.normal(size=(width, width)) / np.sqrt(width)  # correlated columns: structure to learn
    x = rng.normal(size=(rows, width)) @ mix
    return pa.table({f"f{j}": x[:, j].astype(np.float32) for j in range(width)})


def main(argv: list[str] | None = None) -> int:
    args = options(__doc__, argv, rows=1_000_000, width=32, repeat=5, threads=(int, None),  # threads: torch's
                   out=RESULTS / "scorer_cost.json")
    import torch
    from unusual.models import Detector, Scorer
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    train, data = table(rng, 20_000, args.width), table(rng, args.rows, args.width)
    scorers = {}
    for name, params in VARIANTS.items():
        scorers[name] = Scorer(Detector("ae", epochs=3, seed=0, verbose=False, **params).fit(train).bundle_)
        scorers[name].score_table(data.slice(0, 65_536))  # warm-up, unrecorded
    seconds: dict = {name: [] for name in scorers}
    for _ in range(args.repeat):
        for name, scorer in scorers.items():  # the full output, as the batch job and the endpoint produce it
            t0 = time.perf_counter()
            out = scorer.score_table(data)
            seconds[name].append(time.perf_counter() - t0)
            assert out.num_rows == data.num_rows
    rows_per_s = {name: args.rows / statistics.median(s) for name, s in seconds.items()}
    ratio = rows_per_s["joint (default)"] / rows_per_s["reconstruction"]
    write_result(args.out, {**provenance("scorer_cost", ("models", "torch", "numpy", "pyarrow")),
                            "load_average_end": loadavg(), "rows": args.rows, "width": args.width,
                            "torch_threads": torch.get_num_threads(), "seconds": seconds, "rows_per_s": rows_per_s,
                            "ratio_default_to_reconstruction": ratio})
    print("\n".join(f"{name:18s} {r:12,.0f} rows/s" for name, r in rows_per_s.items()))
    print(f"ratio default / reconstruction: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
