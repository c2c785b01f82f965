"""``unusual fit``: train one detector in this process (no Ray) and write its bundle.

    unusual fit --model ae --data events.parquet --output models/ae-1 --exclude label
    python -m unusual.ray_jobs.fit ...        (the same flags)

For data that fits in memory; ``unusual train`` is the distributed twin with the same
parameters and the same bundle format.
"""

from __future__ import annotations

import json
import sys

from ..config import FitJob, main_for
from ..runtime import progress, verbose

__all__ = ["FitJob", "command", "main", "run"]


def run(job: FitJob) -> dict:
    """Fit the detector on ``job.data`` and write it to ``job.output``; returns a summary."""
    from ..models import Detector
    from .local_io import read_table, refuse_existing_bundle

    kind, params = job.detector()
    refuse_existing_bundle(job.output, job.overwrite)
    # unknown or invalid parameters: an error before the data is read
    detector = Detector(kind, verbose=True if verbose() else None, **params)
    table = read_table(job.data)
    progress(f"read {table.num_rows:,} rows x {table.num_columns} columns from {job.data}")
    det = detector.fit(table)
    version = det.save(job.output, overwrite=job.overwrite)
    h = det.history_
    return {
        "output": job.output,
        "model_version": version,
        "threshold": det.threshold_,
        "rows": table.num_rows,  # read; the model trained on train_samples of them, validated on the rest
        "train_samples": h.train_samples,
        "epochs_run": len(h.val_loss),
        "best_val_loss": min(h.val_loss),
        "seconds": round(h.seconds, 2),
    }


def command(job: FitJob) -> int:
    print(json.dumps(run(job), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for("fit", command, argv)


if __name__ == "__main__":
    sys.exit(main())
