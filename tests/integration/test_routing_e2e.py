"""Routing with real peers: Orthanc as the PACS takes the SEG only, a DCMTK storescp as the planning system
("TPS") takes the RTSTRUCT only and only from the CT simulator, a second storescp ("ER viewer") takes results
of the emergency scanner only; a study from an unlisted AE is segmented and sent nowhere (status says why),
and a study from the physics QA AE is ignored by a rule (status names the rule). Every series is pushed by
DCMTK's storescu with its own calling AE."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.harness.dcmtk import StoreSCP, storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.orthanc import OrthancServer, orthanc_missing_reason
from tests.harness.result_checks import RTSTRUCT_CLASS, SEG_CLASS, assert_dciodvfy_clean
from tests.harness.synthetic_ct import SyntheticSeries, write_ct_series

_SKIP = "; ".join(r for r in (tool_missing_reason("storescu", "storescp", "dciodvfy"), orthanc_missing_reason()) if r)
pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(_SKIP), reason=_SKIP), pytest.mark.timeout(400)]


def _series(directory: Path, seed: int, study_description: str) -> SyntheticSeries:
    series = write_ct_series(directory, slices=12, rows=96, columns=96, pixel_spacing=(4.0, 4.0), seed=seed,
                             uid_root=f"1.2.826.0.1.3680043.10.4242.{seed}.")
    for f in series.files:
        ds = dcmread(f)
        ds.StudyDescription = study_description
        ds.save_as(f)
    return series


def _classes(paths: list[Path]) -> list[str]:
    return sorted(str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths)


def test_results_go_where_the_rules_say(tmp_path: Path) -> None:
    planning = _series(tmp_path / "planning", 1, "RTP Thorax")
    emergency = _series(tmp_path / "er", 2, "Head trauma")
    unlisted = _series(tmp_path / "unlisted", 3, "Chest")
    qa = _series(tmp_path / "qa", 4, "Daily QA phantom")
    with OrthancServer() as pacs, StoreSCP(tmp_path / "tps", ae_title="ARIA") as tps, \
            StoreSCP(tmp_path / "er-viewer", ae_title="ERVIEW") as er_viewer:
        config = f"""
[[rules]]
name = "physics-qa"
action = "ignore"
[rules.when]
calling_ae = ["QA_PHYS"]

[[rules]]
name = "emergency-first"
action = "segment"
priority = 10
[rules.when]
calling_ae = ["CT_ER"]

[[destinations]]
name = "pacs"
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
objects = ["SEG"]
[destinations.when]
calling_ae = ["CT_SIM1", "CT_ER"]

[[destinations]]
name = "tps"
ae_title = "ARIA"
host = "127.0.0.1"
port = {tps.port}
objects = ["RTSTRUCT"]
bundles = ["body-threshold"]
[destinations.when]
calling_ae = ["CT_SIM1"]
study_description = "(?i)planning|rtp"

[[destinations]]
name = "er-viewer"
ae_title = "ERVIEW"
host = "127.0.0.1"
port = {er_viewer.port}
[destinations.when]
calling_ae = ["CT_ER"]
"""
        with NodeProcess(tmp_path / "node", extra_toml=config) as node:
            for series, aet in ((planning, "CT_SIM1"), (emergency, "CT_ER"), (unlisted, "CT_UNLISTED"),
                                (qa, "QA_PHYS")):
                storescu("127.0.0.1", node.port, node.ae_title, series.files, calling_aet=aet)
            tps_files = tps.wait_for_files(1, timeout=120)
            er_files = er_viewer.wait_for_files(2, timeout=120)
            status = node.wait_status(
                lambda s: len(s["series"]) == 4 and all(x["state"] != "receiving" for x in s["series"])
                and s["jobs"] and all(j["state"] == "done" for j in s["jobs"])
                and all(o["state"] == "sent" for o in s["outbox"]), timeout=120)
            deadline = time.time() + 60
            while len(pacs.instances()) < 2 and time.time() < deadline:
                time.sleep(0.5)
            pacs_classes = sorted(str(pacs.get(f"/instances/{i}/tags?simplify")["SOPClassUID"])
                                  for i in pacs.instances())
            time.sleep(2)  # nothing else may arrive late
            tps_files, er_files = tps.files(), er_viewer.files()
            route_text = node.route_explain(unlisted.series_uid)

    assert pacs_classes == [SEG_CLASS, SEG_CLASS]  # the planning and the emergency SEG, nothing else
    assert _classes(tps_files) == [RTSTRUCT_CLASS]  # the planning RTSTRUCT only
    assert _classes(er_files) == sorted([SEG_CLASS, RTSTRUCT_CLASS])  # everything of the emergency series
    for f in [*tps_files, *er_files]:
        assert_dciodvfy_clean(f)
    assert dcmread(tps_files[0]).StudyInstanceUID == planning.study_uid

    by_series = {s["series_uid"]: s for s in status["series"]}
    assert by_series[qa.series_uid]["state"] == "ignored"
    assert by_series[qa.series_uid]["note"] == "ignored by rule 'physics-qa' (calling AE in ['QA_PHYS'])"
    assert by_series[unlisted.series_uid]["calling_ae"] == "CT_UNLISTED"
    jobs = {j["series_uid"]: j for j in status["jobs"]}
    assert set(jobs) == {planning.series_uid, emergency.series_uid, unlisted.series_uid}
    assert jobs[emergency.series_uid]["priority"] == 10
    # the routing sentence comes first; the writer's contour check follows it ("; contours: BODY …")
    assert jobs[unlisted.series_uid]["note"].startswith(
        "sent nowhere: pacs: calling AE 'CT_UNLISTED' is not one of ['CT_SIM1', 'CT_ER'] | tps: calling AE "
        "'CT_UNLISTED' is not one of ['CT_SIM1'] | er-viewer: calling AE 'CT_UNLISTED' is not one of "
        "['CT_ER']; contours: BODY")
    assert jobs[planning.series_uid]["note"].startswith(
        "sent to pacs (SEG), tps (RTSTRUCT); not to er-viewer: calling AE 'CT_SIM1' is not one of ['CT_ER']; "
        "contours: BODY")
    routes = {(o["destination"], o["sop_class_uid"]): o["route"] for o in status["outbox"]}
    assert routes[("tps", RTSTRUCT_CLASS)].startswith("RTSTRUCT of ['body-threshold'] when calling AE in ['CT_SIM1']")
    assert "decision: no rule matched" in route_text and "pacs (" in route_text
    assert "body-threshold → nothing (calling AE 'CT_UNLISTED' is not one of ['CT_SIM1', 'CT_ER']" in route_text


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[[destinations]]\nae_title = "P"\nhost = "127.0.0.1"\nport = 104\nbundles = ["livr"]\n',
         "key 'destinations[0].bundles' names 'livr', which is not an installed bundle"),
        ('[[rules]]\naction = "segment"\n[rules.when]\nstudy_description = "*planning"\n',
         "key 'rules[0].when.study_description' is '*planning', which is not a valid regular expression"),
    ],
)
def test_bad_routing_stops_the_node_at_start(tmp_path: Path, toml: str, needle: str) -> None:
    node = NodeProcess(tmp_path / "node", extra_toml=toml, startup_timeout=30)
    with pytest.raises(RuntimeError, match="the node exited with 2 at start") as err:
        node.start()
    assert needle in str(err.value)
