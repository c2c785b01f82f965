"""Session fixtures for the detector-core tests (helpers live in modeltestkit.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from modeltestkit import series, tabular


@pytest.fixture(scope="session")
def tab_train() -> np.ndarray:
    return tabular(1500, seed=0)


@pytest.fixture(scope="session")
def seq_train() -> pa.Table:
    return series(("a", "b", "c"), 240, seed=0)
