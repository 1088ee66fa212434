"""Retention and replay on a real node: DCMTK's storescu pushes CT in, DCMTK's storescp receives the results.

A delivered series disappears (spool files, index rows, results) once older than ``keep_days``; a
series whose results could not be delivered (dead letters) stays, and ``retry`` still resends it.
``replay`` sends a finished series' results again with the same SOP Instance UIDs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from node.spool.store import Spool
from tests.harness.dcmtk import StoreSCP, free_port, storescu, tool_missing_reason
from tests.harness.node_process import REPO, NodeProcess
from tests.harness.synthetic_ct import SyntheticSeries, write_ct_series

pytestmark = pytest.mark.integration

KEEP_DAYS = 0.0001  # 8.6 s


@pytest.fixture(autouse=True)
def _tools() -> None:
    if reason := tool_missing_reason("storescu", "storescp"):
        pytest.skip(reason)


def _ct(directory: Path, root: str) -> SyntheticSeries:
    return write_ct_series(directory, slices=12, rows=128, columns=128, pixel_spacing=(3.2, 3.2), uid_root=root)


def _series_jobs(status: dict[str, Any], series_uid: str) -> list[dict[str, Any]]:
    return [j for j in status["jobs"] if j["series_uid"] == series_uid]


def _outbox_of(status: dict[str, Any], series_uid: str) -> list[dict[str, Any]]:
    job_ids = {j["id"] for j in _series_jobs(status, series_uid)}
    return [o for o in status["outbox"] if o["job_id"] in job_ids]


def _has_series(status: dict[str, Any], series_uid: str) -> bool:
    return any(s["series_uid"] == series_uid for s in status["series"])


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args, "--state-dir", str(node.state_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def test_delivered_series_are_deleted_and_dead_letters_kept_for_retry(tmp_path: Path) -> None:
    held = _ct(tmp_path / "held", "1.2.826.0.1.3680043.10.1001")
    gone = _ct(tmp_path / "gone", "1.2.826.0.1.3680043.10.1002")
    pacs_port = free_port()
    node = NodeProcess(tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs_port}"],
                       extra_toml=f"max_attempts = 1\n[retention]\nkeep_days = {KEEP_DAYS}\ninterval_s = 1\n")
    spool = Spool(node.state_dir / "spool")
    with node:
        # The destination is down: one failed attempt makes the results dead letters.
        storescu("127.0.0.1", node.port, node.ae_title, held.directory)
        status = node.wait_status(lambda s: len(_outbox_of(s, held.series_uid)) == 2
                                  and all(o["state"] == "dead" for o in _outbox_of(s, held.series_uid)), timeout=120)
        (held_job,) = _series_jobs(status, held.series_uid)
        held_results = Path(held_job["result_dir"])
        with StoreSCP(tmp_path / "pacs", ae_title="PACS", port=pacs_port) as pacs:
            storescu("127.0.0.1", node.port, node.ae_title, gone.directory)
            gone_files = [spool.path_for(uid) for uid in gone.sop_instance_uids]
            assert all(p.is_file() for p in gone_files)  # acknowledged, so spooled
            pacs.wait_for_files(2, timeout=120)
            # Retention deletes the rows (journalling the files) and then the files, so the rows can be
            # gone a moment before the files: wait for both.
            status = node.wait_status(lambda s: not _has_series(s, gone.series_uid)
                                      and not any(p.exists() for p in gone_files), timeout=120)
            # The delivered series is gone everywhere: spool files, index rows, results.
            assert _series_jobs(status, gone.series_uid) == []
            assert {o["job_id"] for o in status["outbox"]} == {held_job["id"]}
            assert status["retention"]["instance_count"] == len(held.files)
            assert [p.name for p in (node.state_dir / "results").iterdir()] == [held_results.name]
            assert f"retention: deleted series {gone.series_uid}" in node.log_text()
            # The older series with dead letters is kept, whole, well past keep_days.
            assert _has_series(status, held.series_uid)
            assert all(spool.path_for(uid).is_file() for uid in held.sop_instance_uids)
            assert held_results.is_dir() and all(Path(o["path"]).is_file() for o in _outbox_of(status, held.series_uid))
            assert status["retention"]["held_dead_letters"] == 1
            # `retry` resends them; once delivered, the series is deleted in turn.
            assert "2 dead-lettered object(s) queued" in _cli(node, "retry").stdout
            pacs.wait_for_files(4, timeout=120)
            node.wait_status(lambda s: not _has_series(s, held.series_uid), timeout=120)
    assert not any(spool.path_for(uid).exists() for uid in held.sop_instance_uids)
    assert not held_results.exists()


def test_replay_sends_the_same_sop_instances_again(tmp_path: Path) -> None:
    series = _ct(tmp_path / "ct", "1.2.826.0.1.3680043.10.1003")
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs, \
            NodeProcess(tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"]) as node:
        storescu("127.0.0.1", node.port, node.ae_title, series.directory)
        first = pacs.wait_for_files(2, timeout=120)
        status = node.wait_status(lambda s: len(s["outbox"]) == 2 and all(o["state"] == "sent" for o in s["outbox"]),
                                  timeout=60)
        sent_uids = sorted(o["sop_instance_uid"] for o in status["outbox"])

        refused = _cli(node, "replay", "--series", series.series_uid, "--destination", "nowhere")
        assert refused.returncode == 2 and "'nowhere' unknown" in refused.stderr and "['pacs']" in refused.stderr
        unknown = _cli(node, "replay", "--series", "1.2.3.4.5")
        assert unknown.returncode == 2 and "series 1.2.3.4.5 is not in the index" in unknown.stderr

        done = _cli(node, "replay", "--series", series.series_uid)
        assert done.returncode == 0, done.stderr
        assert "2 object(s)" in done.stdout
        files = pacs.wait_for_files(4, timeout=60)
        again = node.wait_status(lambda s: all(o["state"] == "sent" for o in s["outbox"]), timeout=60)
    second = [f for f in files if f not in first]
    assert sorted(str(dcmread(f).SOPInstanceUID) for f in second) == sent_uids
    assert sorted(str(dcmread(f).SOPInstanceUID) for f in first) == sent_uids
    by_uid = {str(dcmread(f).SOPInstanceUID): dcmread(f) for f in first}
    for f in second:  # the same objects, not rebuilt ones
        ds = dcmread(f)
        assert ds == by_uid[str(ds.SOPInstanceUID)]
    assert {o["attempts"] for o in again["outbox"]} == {1}  # reset by replay, then one successful send
    assert len(again["jobs"]) == 1  # nothing was segmented again
