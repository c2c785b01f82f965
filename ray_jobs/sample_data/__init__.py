"""Small real data sets shipped with unusual for the demo, examples and tests.

- ``cardio``: ODDS "cardio" (cardiotocography, UCI), 1,831 rows x 21 features,
  ``label`` True for the 176 pathologic rows. BSD-2-Clause, PyOD's copy of
  ODDS (odds.cs.stonybrook.edu); see ``LICENSE-ODDS``.
- ``nab_machine_temperature_system_failure`` and
  ``nab_ec2_request_latency_system_failure``: Numenta Anomaly Benchmark
  series (``timestamp``, ``value``), ``label`` True inside NAB's labelled
  anomaly windows. MIT, Numenta; see ``LICENSE-NAB``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent
SETS = {
    "cardio": "cardio.parquet",
    "nab_machine_temperature": "nab_machine_temperature_system_failure.parquet",
    "nab_ec2_request_latency": "nab_ec2_request_latency_system_failure.parquet",
}


def path(name: str) -> Path:
    try:
        return HERE / SETS[name]
    except KeyError:
        raise ValueError(f"unknown sample data set {name!r}; choose one of {sorted(SETS)}") from None


def load(name: str) -> pa.Table:
    """A shipped data set as a pyarrow Table with a boolean ``label`` column."""
    return pq.read_table(path(name))
