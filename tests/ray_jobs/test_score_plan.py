"""The batch-scoring job's plan is a typed payload: made on the driver from the files' footers (no Ray),
written to ``_unusual/job.json``, read back equal by a rerun (resume) and by the evaluation, and a plan
that is not this format's is named, not a KeyError."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from unusual.models import Detector
from unusual.ray_jobs import sample_data
from unusual.ray_jobs.evaluate import _job_spec
from unusual.ray_jobs.score import previous_plan
from unusual.ray_jobs.score_plan import BundleInfo, ReadUnit, ScorePlan, plan
from unusual.ray_jobs.storage import JOB_DIR, SPEC_FILE, Output

from unusual.config import ScoreJob


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    cardio = sample_data.load("cardio")
    Detector("ae", epochs=1).fit(cardio.drop_columns(["label"]).slice(0, 400)).save(root / "ae")
    data = root / "data"
    data.mkdir()
    pq.write_table(cardio.slice(0, 900), data / "a.parquet", row_group_size=100)
    pq.write_table(cardio.slice(900), data / "b.parquet", row_group_size=100)
    pq.write_table(pa.table({"label": [0, 0, 1]}), data / "c.parquet")  # no features: quarantined whole
    job = ScoreJob(checkpoint=str(root / "ae"), data=str(data), output=str(root / "out"), keep_columns=["label"],
                   unit_rows=300)
    return job, plan(job, BundleInfo.read(job.checkpoint))


def test_the_plan_cuts_files_into_units_of_whole_row_groups_and_quarantines_what_cannot_be_scored(planned):
    job, spec = planned
    assert spec.rows_in == 1831 + 3 and spec.file_rows == [900, 931, 3]
    assert [u.rows for u in spec.units if u.file == 0] == [300, 300, 300]
    assert all(u.rg[1] - u.rg[0] == 3 for u in spec.units if u.file == 0)
    assert sum(u.rows for u in spec.units) == spec.rows_in
    [bad] = [i for i, u in enumerate(spec.units) if u.quarantine]
    assert spec.units[bad] == ReadUnit(file=2, rg=(0, 1), base=0, rows=3, quarantine=spec.units[bad].quarantine)
    assert spec.units[bad].quarantine.startswith("missing column(s)")
    assert spec.quarantine_units == {bad: bad} and spec.out_units == len(spec.units) and not spec.sequence
    assert spec.schema().names == ["label", "anomaly_score", "is_anomaly", "top_features", "model_version"]


def test_job_json_round_trips_for_a_rerun_and_the_evaluation(planned):
    job, spec = planned
    out = Output(job.output)
    assert previous_plan(out) is None
    out.write_json(spec.model_dump(mode="json"), JOB_DIR, SPEC_FILE)
    again = previous_plan(out)
    assert again == spec and again.same_job(spec)
    assert not again.same_job(spec.model_copy(update={"top_k": 5}))
    record = _job_spec(job.output)
    assert (record.checkpoint, record.threshold, record.kind) == (spec.checkpoint, spec.threshold, "ae")
    # JSON object keys are strings: the quarantined units' map comes back keyed by int
    doc = json.loads(out.fs.cat_file(out.join(JOB_DIR, SPEC_FILE)))
    assert set(doc["quarantine_units"]) == {str(k) for k in spec.quarantine_units}


def test_a_plan_of_another_format_is_named_not_a_key_error(planned, tmp_path):
    job, spec = planned
    out = Output(str(tmp_path / "old"))
    out.write_json({"model_version": spec.model_version, "units": [{"file": 0}]}, JOB_DIR, SPEC_FILE)
    why = previous_plan(out)
    assert isinstance(why, str) and why.startswith(f"{JOB_DIR}/{SPEC_FILE}: ")
    with pytest.raises(ValueError, match="extra_field"):
        ScorePlan.model_validate({**spec.model_dump(), "extra_field": 1})
