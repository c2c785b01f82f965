"""The README's first-hour walk-through, run as written (a bash block): fit, train, info, score,
evaluate, serve and curl on the shipped sample data, in a temporary folder and on a free port."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from unusual.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]


def first_hour_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The first hour, on local files") :]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_first_hour_walk_through_runs_as_written(tmp_path):
    block = first_hour_block()
    port = free_port()
    script = (
        block.replace("source .venv/bin/activate\n", "")
        .replace("W=artifacts/first-hour", f"W={tmp_path}")
        .replace("--epochs 20", "--epochs 3")  # the walk-through's commands, a shorter training
        .replace("xdg-open ", "test -s ")
        .replace("localhost:8000", f"localhost:{port}")
        .replace("--port 8000", f"--port {port}")
        .replace("curl -s localhost", "until curl -sf localhost", 1)
    )
    script = script.replace("# 200 once every model is loaded", "")
    script = re.sub(r"(until curl -sf localhost:\d+/readyz)\s*\n", r"\1 >/dev/null; do sleep 1; done\n", script)
    out = tmp_path / "answer.json"
    script = f"set -euo pipefail\n{script.rstrip()} > {out}\nkill %1\nwait\n"
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{p.stderr[-4000:]}\n--- script:\n{script}"
    answer = json.loads(out.read_text())
    assert answer["model"] == "ae" and len(answer["rows"]) == 3
    assert all(isinstance(r["anomaly_score"], float) for r in answer["rows"])
    metrics = json.loads((tmp_path / "eval" / "ae" / "metrics.json").read_text())
    assert metrics["rows"] == 1831 and metrics["positives"] == 176
    # Trained on all of cardio, anomalies included (README: 0.926 measured; the ae before the defaults for
    # data with anomalies had 0.63), and the walk-through's IsolationForest line for comparison.
    assert metrics["roc_auc"] >= 0.85, metrics["roc_auc"]
    iforest = re.search(r"IsolationForest ROC-AUC (\d\.\d+)", p.stdout)
    assert iforest and 0.85 <= float(iforest.group(1)) <= 1.0, p.stdout[-2000:]


def test_the_parameter_table_is_the_one_generated_from_the_config_classes():
    """README's "Parameters" table is :func:`unusual.models.params.parameter_table`'s, word for word: the
    config classes' declarations (every family's, the features', the training's, the threshold's) are
    the one definition of each parameter, its default and its meaning."""
    from unusual.models.params import parameter_keys, parameter_table

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin = text.index("<!-- the parameter table")
    table = text[text.index("\n", begin) + 1 : text.index("<!-- end of the parameter table -->")]
    assert table == parameter_table(), (
        "README's parameter table is out of date: paste unusual.models.params.parameter_table() between its markers"
    )
    named = set(re.findall(r"^\| [^|]* \| `(\w+)`", table, flags=re.M))
    assert named == set(parameter_keys())


def test_the_scikit_learn_snippet_runs_as_written_without_a_warning():
    """README's scikit-learn snippet on cardio (X: the first 1,500 rows as a DataFrame, X_new the rest):
    no warning (it warned about feature names when the last step was called on the raw DataFrame)."""
    import warnings

    pytest.importorskip("sklearn")
    from unusual.ray_jobs import sample_data

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### scikit-learn and PyOD habits") :]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start : section.index("```\n", start)]
    frame = sample_data.load("cardio").to_pandas().drop(columns="label")
    scope = {"X": frame.iloc[:1500], "X_new": frame.iloc[1500:]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)
        exec(compile(snippet, "README.md (scikit-learn)", "exec"), scope)
    assert scope["det"].anomaly_score(scope["pipe"][:-1].transform(scope["X_new"])).shape == (331,)
