"""A destination that is down: results wait in the outbox with backoff and arrive once it is back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.dcmtk import StoreSCP, free_port, storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration


def test_results_survive_an_outage_and_a_restart(tmp_path: Path) -> None:
    if reason := tool_missing_reason("storescu", "storescp"):
        pytest.skip(reason)
    series = write_ct_series(tmp_path / "ct", slices=12, rows=128, columns=128, pixel_spacing=(3.2, 3.2))
    pacs_port = free_port()
    node = NodeProcess(tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs_port}"],
                       extra_toml="max_attempts = 50\nbackoff_max_s = 2.0\n")
    with node:
        storescu("127.0.0.1", node.port, node.ae_title, series.directory)
        status = node.wait_status(
            lambda s: any(o["attempts"] >= 2 for o in s["outbox"]), timeout=120
        )
        assert all(o["state"] == "pending" for o in status["outbox"])
        assert all("could not associate" in o["last_status"] for o in status["outbox"])
        assert "next try in" in node.log_text()
    # The node stops with undelivered results; they are in the index, not in memory.
    with (
        NodeProcess(tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs_port}"],
                    extra_toml="max_attempts = 50\nbackoff_max_s = 2.0\n", port=node.port) as again,
        StoreSCP(tmp_path / "pacs", ae_title="PACS", port=pacs_port) as pacs,
    ):
        pacs.wait_for_files(2, timeout=60)
        status = again.wait_status(lambda s: all(o["state"] == "sent" for o in s["outbox"]), timeout=60)
    assert len(status["outbox"]) == 2
    assert {o["last_status"] for o in status["outbox"]} == {"0x0000 SUCCESS"}
    assert len(status["jobs"]) == 1  # delivered without segmenting again
