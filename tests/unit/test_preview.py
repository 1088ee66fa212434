"""Preview montages: a PNG a person can look at, and the same as a valid Secondary Capture."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from node.config import NodeConfig
from node.infer.backends.loader import make_engine
from node.infer.manifest import discover_bundles
from node.jobs.pipeline import run_job
from node.write.preview import PANEL_PX
from node.write.provenance import Provenance
from tests.harness.dcmtk import dciodvfy, tool_missing_reason
from tests.harness.synthetic_ct import write_ct_series

BUNDLE = discover_bundles(Path(__file__).resolve().parents[2] / "engines", ("body-threshold",))[0]


def test_preview_png_and_secondary_capture(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=16, rows=128, columns=128, pixel_spacing=(3.2, 3.2))
    outcome = run_job(series.files, BUNDLE, make_engine(BUNDLE, NodeConfig()), tmp_path / "out",
                      provenance=Provenance(created=dt.datetime(2026, 1, 1)), preview_png=True, preview_sc=True)
    png = Image.open(tmp_path / "out" / "preview.png")
    assert png.size[0] == 3 * PANEL_PX and png.size[1] > PANEL_PX
    pixels = np.asarray(png.convert("RGB"))
    assert (pixels[:PANEL_PX] == BUNDLE.labels[0].color_rgb).all(axis=-1).sum() > 100  # outlines drawn
    (preview,) = [o for o in outcome.objects if o.kind == "PREVIEW"]
    sc = dcmread(preview.path)
    assert sc.StudyInstanceUID == series.study_uid and sc.Modality == "OT" or sc.Modality
    assert sc.BurnedInAnnotation == "YES" and "not for diagnosis" in sc.SeriesDescription
    assert sc.pixel_array.shape == (png.size[1], png.size[0], 3)
    if not tool_missing_reason("dciodvfy"):
        report = dciodvfy(preview.path)
        assert report.ok, report.errors
