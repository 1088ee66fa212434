"""Completeness from the source's counts: DCMTK's storescu sends a series in two halves with a 15 s pause,
longer than the node's quiet period; Orthanc (the PACS) holds the whole series and answers the node's C-FIND
at SERIES level. The node must not segment the first half (the source says more are coming), and once the
second half is in it segments the whole series at once, without waiting out the quiet period again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.harness.dcmtk import storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.orthanc import OrthancServer, orthanc_missing_reason
from tests.harness.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration

QUIET_S = 8.0


def test_a_paused_modality_is_waited_for_and_the_whole_series_segmented_once(tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescu") or orthanc_missing_reason():
        pytest.skip(reason)
    series = write_ct_series(tmp_path / "ct", slices=12, rows=128, columns=128, pixel_spacing=(3.2, 3.2), seed=8)
    ordered = series.files_in_slice_order
    with OrthancServer(workdir=tmp_path / "orthanc") as pacs:
        pacs.upload(series.directory, strict=True)
        toml = (f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
                f'port = {pacs.dicom_port}\nobjects = ["SEG"]\n'
                '[completeness]\nsource = "pacs"\ncheck_after_s = 1\nrecheck_s = 1\nmax_wait_s = 120\n')
        with NodeProcess(tmp_path / "node", quiet_period_s=QUIET_S, release_settle_s=QUIET_S, extra_toml=toml) as node:
            storescu("127.0.0.1", node.port, node.ae_title, ordered[:6])
            deadline = time.time() + 15
            waited = node.wait_status(lambda s: "waiting: 6 of 12 instances per pacs" in s["series"][0]["note"],
                                      timeout=15)
            assert waited["jobs"] == []
            while time.time() < deadline:  # a pause longer than the quiet period: still nothing is segmented
                status = node.status()
                assert status["jobs"] == [] and status["series"][0]["state"] == "receiving", status["series"]
                time.sleep(1)
            storescu("127.0.0.1", node.port, node.ae_title, ordered[6:])
            last_in = time.time()
            status = node.wait_status(lambda s: bool(s["jobs"]), timeout=QUIET_S)  # sooner than the quiet period
            dispatched_after = time.time() - last_in
            (row,) = status["series"]
            assert row["state"] == "dispatched" and row["instance_count"] == 12
            assert row["note"].startswith("complete: 12 of 12 instances per pacs"), row["note"]
            assert dispatched_after < QUIET_S - 2, dispatched_after
            done = node.wait_status(lambda s: s["jobs"] and s["jobs"][0]["state"] == "done", timeout=120)
            assert len(done["jobs"]) == 1  # one job, for the whole series
