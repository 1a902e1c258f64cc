"""One vocabulary for "do not retry" (issue 16, item 6), applied by a real worker.

A weights file that does not fit its network will not fit next time, and a series an
algorithm cannot use is the same series next time: both fail their job at the first attempt,
with the reason at ERROR and no patient data. Anything else may be passing and is retried.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dicom_node.config import NodeConfig
from dicom_node.database import SqliteDatabase, database_path
from dicom_node.infer import Worker
from dicom_node.jobs import InferencePayload, JobKind, JobState, SqliteJobStore

pytestmark = pytest.mark.unit

# A UID as a modality makes them (its root is a manufacturer's, its tail a date and a
# patient's visit): what must not reach a log line above DEBUG.
SERIES_UID = "1.2.826.0.1.3680043.8.498.19230417.4711"


def _run(tmp_path: Path, algorithm: str, settings: dict[str, object], caplog) -> list[JobState]:
    """Queue one job of ``algorithm`` (its series never stored) and let a worker with
    ``worker.max_attempts`` 3 take it until it is not queued; the job's state after each."""
    config = NodeConfig.model_validate(
        {
            "store": {"data_dir": str(tmp_path)},
            "worker": {"device": "cpu", "max_attempts": 3},
            "algorithms": {algorithm: settings},
        }
    )
    db = SqliteDatabase(database_path(tmp_path))
    store = SqliteJobStore(db)
    with db.transaction() as conn:
        job_id = store.enqueue(
            conn,
            JobKind.INFERENCE,
            SERIES_UID,
            1,
            InferencePayload(algorithm, {"series": SERIES_UID}, "series"),
        )
    worker = Worker(config, name="w")
    caplog.set_level(logging.DEBUG)
    states = []
    try:
        while (job := store.get(job_id)) is not None and job.state is JobState.QUEUED:
            assert worker.work_once() is not None
            states.append(store.get(job_id).state)  # type: ignore[union-attr]
        final = store.get(job_id)
        assert final is not None and final.attempts == len(states)
    finally:
        worker.db.close()
        db.close()
    above_debug = " ".join(r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG)
    assert SERIES_UID not in above_debug and "19230417" not in above_debug
    return states


def _errors(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and r.name == "dicom_node.infer"
    ]


def test_weights_that_do_not_fit_fail_the_job_at_the_first_attempt(tmp_path, caplog) -> None:
    torch = pytest.importorskip("torch")
    xrv = pytest.importorskip("torchxrayvision")
    small = xrv.models.DenseNet(num_classes=1, growth_rate=8, block_config=(2, 2, 2, 2))
    weights = tmp_path / "small.pt"
    torch.save(small.state_dict(), weights)
    states = _run(tmp_path, "pneumonia-cxr", {"weights": str(weights)}, caplog)
    assert states == [JobState.FAILED]
    (error,) = _errors(caplog)
    assert "WeightsMismatch" in error and "does not fit" in error
    assert "not retried" in error and "setup" in error


def test_a_series_the_algorithm_cannot_use_fails_at_the_first_attempt(
    tmp_path, caplog, example_plugins
) -> None:
    states = _run(tmp_path, "example-threshold", {}, caplog)
    assert states == [JobState.FAILED]
    (error,) = _errors(caplog)
    # The reason, with the series named as the store names it on disk (hashed).
    assert "InputError: series" in error and "has no stored instances" in error
    assert "not retried: the same input fails the same way" in error


def test_a_failure_that_may_be_passing_is_retried(tmp_path, caplog, example_plugins) -> None:
    """A plugin's own exception (here float('not a number') in its load) is no verdict on
    the input or the setup: the job is tried worker.max_attempts times."""
    states = _run(tmp_path, "example-threshold", {"threshold": "not a number"}, caplog)
    assert states == [JobState.QUEUED, JobState.QUEUED, JobState.FAILED]
    errors = _errors(caplog)
    assert len(errors) == 3 and all("ValueError at " in e for e in errors)
    assert not any("not retried" in e or "not a number" in e for e in errors)
