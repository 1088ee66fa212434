"""The jobs of one series, claimed together and run on one volume (issue 16, item 8).

A settled series gets one job per bundle; a worker claims them together (each on its own row, each attempt
counted), reads and assembles the series once and runs every bundle on that volume, one after the other on a
small machine, at once where cores allow. Here on a real index and real bundles (body-lungs, and the small
ONNX body-threshold through ONNX Runtime), with a synthetic CT; the killed-worker cases run against the real
service in tests/integration/test_crash_durability.py and tests/integration/test_orphan_workers.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from node.config import NodeConfig
from node.errors import VolumeError
from node.infer.backends.loader import EngineLoader
from node.infer.manifest import discover_bundles
from node.jobs.pipeline import SeriesVolume
from node.jobs.series import PARALLEL_MIN_CPUS, parallel_jobs, run_series
from node.jobs.worker import MAX_JOB_ATTEMPTS, WorkerSpec, _Worker
from node.model.enums import EngineBackend
from node.model.records import InstanceMeta, JobState
from node.spool.index import Index
from tests.harness.synthetic_ct import write_ct_series

NOW = 1_700_000_000.0
CT = "1.2.840.10008.5.1.4.1.1.2"


def _index(tmp_path: Path, *series: str) -> Index:
    index = Index(NodeConfig(state_dir=tmp_path).index_path)
    for uid in series:
        for k in range(3):
            meta = InstanceMeta(f"{uid}.{k}", CT, "1.2", uid, "CT", "1.2.840.10008.1.2.1")
            index.add_instance(meta, path=tmp_path / f"{uid}.{k}", size=1, calling_ae="X", quiet_period_s=0,
                               now=NOW + k)
    return index


# ------------------------------------------------------------------------------------------------ claims
def test_the_queued_jobs_of_a_series_are_claimed_together_each_on_its_own_row(tmp_path: Path) -> None:
    index = _index(tmp_path, "1.2.3", "1.2.4")
    ids = index.dispatch("1.2.3", ["a@1", "b@1", "c@1"], now=NOW)
    (other,) = index.dispatch("1.2.4", ["a@1"], now=NOW)
    claimed = index.claim_series_jobs("worker-0-1", now=NOW + 1)
    assert [j.id for j in claimed] == ids
    for job in claimed:
        row = index.job(job.id)
        assert row is not None and row.state is JobState.RUNNING and row.attempts == 1
    other_row = index.job(other)
    assert other_row is not None and other_row.state is JobState.QUEUED  # another series is not taken along
    (alone,) = index.claim_series_jobs("worker-0-1", now=NOW + 2)
    assert alone.id == other
    assert index.claim_series_jobs("worker-0-1", now=NOW + 3) == []


def test_after_a_crash_each_job_is_counted_and_then_claimed_alone(tmp_path: Path) -> None:
    index = _index(tmp_path, "1.2.3")
    ids = index.dispatch("1.2.3", ["a@1", "b@1"], now=NOW)
    assert len(index.claim_series_jobs("worker-0-1", now=NOW + 1)) == 2
    assert sorted(index.requeue_running(worker="worker-0-1", max_attempts=MAX_JOB_ATTEMPTS,
                                        reason="worker died")) == ids
    rows = [index.job(i) for i in ids]
    assert all(r is not None and r.state is JobState.QUEUED for r in rows)
    # one crash counted against each: the one that caused it cannot use up the other's attempts
    first = index.claim_series_jobs("worker-0-2", now=NOW + 2)
    assert [j.id for j in first] == ids[:1]
    second = index.claim_series_jobs("worker-0-2", now=NOW + 3)
    assert [j.id for j in second] == ids[1:]


def test_claim_job_still_takes_one_and_qa_jobs_never_join_a_batch(tmp_path: Path) -> None:
    index = _index(tmp_path, "1.2.3")
    ids = index.dispatch("1.2.3", ["a@1", "b@1", "c@1"], now=NOW)
    db = sqlite3.connect(index.path)
    db.execute("UPDATE jobs SET kind='qa' WHERE id=?", (ids[2],))
    db.commit()
    db.close()
    one = index.claim_job("worker-0-1", now=NOW + 1)
    assert one is not None and one.id == ids[0]
    assert [j.id for j in index.claim_series_jobs("worker-0-1", now=NOW + 2)] == [ids[1]]  # not the QA job
    assert [j.id for j in index.claim_series_jobs("worker-0-1", now=NOW + 3)] == [ids[2]]


def test_parallel_only_where_cores_allow() -> None:
    assert parallel_jobs(2, cpus=1) == 1
    assert parallel_jobs(2, cpus=PARALLEL_MIN_CPUS) == 2
    assert parallel_jobs(3, cpus=2) == 2
    assert parallel_jobs(5, cpus=16) == 5
    assert parallel_jobs(5, cpus=6) == 3
    assert parallel_jobs(1, cpus=16) == 1


# ------------------------------------------------------------------------------------------------ volume
def test_a_series_volume_is_read_once_and_shared_read_only(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=6, rows=32, columns=32)
    looked_up: list[int] = []

    def paths() -> list[Path]:
        looked_up.append(1)
        return list(series.files)

    shared = SeriesVolume(paths)
    volume, first = shared.get()
    again, second = shared.get()
    assert again is volume and looked_up == [1]
    assert set(first) == {"read", "assemble"} and set(second) == {"shared_volume"}
    assert volume.voxels.shape == (6, 32, 32)
    with pytest.raises(ValueError, match="read-only"):
        volume.voxels[0, 0, 0] = 1  # a bundle changing its input would change every other bundle's


def test_a_series_volume_that_cannot_be_built_fails_every_job_the_same_way(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=6, rows=32, columns=32)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM at all")
    shared = SeriesVolume([*series.files, broken])
    messages = []
    for _ in range(2):
        with pytest.raises(VolumeError) as caught:
            shared.get()
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "broken.dcm: not a readable DICOM file" in messages[0]


# ------------------------------------------------------------------------------------------------ worker
def _worker(tmp_path: Path, *, stop: bool = False) -> tuple[_Worker, Index, NodeConfig]:
    cfg = dataclasses.replace(NodeConfig(state_dir=tmp_path / "state"), engine_backend=EngineBackend.CPU,
                              bundles=("body-lungs", "body-threshold"), destinations=())
    index = Index(cfg.index_path)
    bundles = {b.id: b for b in discover_bundles(cfg.bundles_dir, cfg.bundles)}
    factory = EngineLoader.from_config(cfg)
    spec = WorkerSpec(cfg=cfg, name="worker-0-1", log_level=logging.INFO)
    return _Worker(spec, index, bundles, factory, lambda: stop), index, cfg


def _received(index: Index, tmp_path: Path) -> tuple[str, list[str]]:
    series = write_ct_series(tmp_path / "ct", slices=24, rows=96, columns=96, pixel_spacing=(4.0, 4.0),
                             slice_thickness=5.0)
    for n, path in enumerate(series.files):
        meta = InstanceMeta(f"9.{n}", CT, series.study_uid, series.series_uid, "CT", "1.2.840.10008.1.2.1")
        index.add_instance(meta, path=path, size=path.stat().st_size, calling_ae="X", quiet_period_s=0, now=NOW + n)
    return series.series_uid, sorted(b.id for b in discover_bundles(NodeConfig().bundles_dir,
                                                                       ("body-lungs", "body-threshold")))


@pytest.mark.parametrize("cpus", [1, PARALLEL_MIN_CPUS], ids=["one-after-the-other", "at-once"])
def test_a_worker_runs_the_bundles_of_a_series_on_one_volume(tmp_path: Path, cpus: int) -> None:
    worker, index, cfg = _worker(tmp_path)
    series_uid, bundles = _received(index, tmp_path)
    ids = index.dispatch(series_uid, bundles)
    jobs = index.claim_series_jobs("worker-0-1")
    assert [j.id for j in jobs] == ids
    run_series(worker, jobs, lambda: index.instance_paths(series_uid), cpus=cpus)
    ended = [index.job(i) for i in ids]
    assert all(j is not None and j.state is JobState.DONE for j in ended), [j and (j.state, j.error) for j in ended]
    timings = [json.loads(index.job_timings(i)) for i in ids]
    built = [t for t in timings if "read" in t]
    assert len(built) == 1 and "assemble" in built[0], timings  # one job read and assembled the series ...
    assert sum("shared_volume" in t for t in timings) == 1, timings  # ... the other used its volume
    for job in ended:
        assert job is not None and sorted(p.name for p in Path(job.result_dir).iterdir() if p.suffix == ".dcm")
    body = np.asarray([s.volume_ml for j in ended if j for s in j.structures if s.name == "BODY"])
    assert len(body) == 2 and np.all(body > 0)


def test_jobs_not_started_when_the_worker_stops_go_back_to_the_queue_uncounted(tmp_path: Path) -> None:
    worker, index, _ = _worker(tmp_path, stop=True)
    series_uid, bundles = _received(index, tmp_path)
    ids = index.dispatch(series_uid, bundles)
    jobs = index.claim_series_jobs("worker-0-1")
    run_series(worker, jobs, lambda: index.instance_paths(series_uid), cpus=1)
    for job_id in ids:
        job = index.job(job_id)
        assert job is not None and job.state is JobState.QUEUED and job.attempts == 0, job
        assert "stopped before it started this job" in job.error
    assert [j.id for j in index.claim_series_jobs("worker-0-1")] == ids  # due at once
