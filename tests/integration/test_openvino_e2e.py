"""The node on ``engines.backend = "openvino"`` (issue 20): DCMTK's storescu pushes a CT, OpenVINO segments
it (BF16 where this CPU has a BF16 unit, after the agreement check; FP32 otherwise), SEG and RTSTRUCT reach
storescp, the BODY agrees with ONNX Runtime's, and a restart imports the compiled model from the state
directory instead of compiling (and checking) it again. The small body-threshold model keeps it quick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from node.assemble.volume import build_volume, read_series
from node.infer.backends.onnxrt import OnnxRuntimeEngine
from node.infer.backends.openvino import status as openvino_status
from node.infer.manifest import discover_bundles
from node.infer.segment import segment_volume
from tests.harness.dcmtk import StoreSCP, storescu, tool_missing_reason
from tests.harness.node_process import NodeProcess
from tests.harness.result_checks import RTSTRUCT_CLASS, SEG_CLASS, check_rtstruct, check_seg, read_sources
from tests.harness.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OPENVINO_TOML = '[engines]\nbundles = ["body-threshold"]\nbackend = "openvino"\nthreads = 1\n'


@pytest.fixture(autouse=True)
def _needs() -> None:
    if reason := tool_missing_reason("storescu", "storescp"):
        pytest.skip(reason)
    found = openvino_status()
    if not found.available:
        pytest.skip(found.detail)


def _done(status: dict[str, Any]) -> bool:
    return bool(status["jobs"]) and all(j["state"] in ("done", "failed") for j in status["jobs"])


def test_openvino_segments_delivers_and_reuses_its_compiled_model(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", slices=24, rows=160, columns=160, pixel_spacing=(2.5, 2.5),
                             slice_thickness=5.0, origin=(-200.0, -200.0, -60.0))
    sources = read_sources(series.files)
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = NodeProcess(tmp_path / "node", destinations=[f"PACS@127.0.0.1:{pacs.port}"], extra_toml=OPENVINO_TOML)
        with node:
            ready = next(line for line in node.log_text().splitlines() if " ready: " in line)
            assert "body-threshold@0.1.0 (OpenVINO " in ready and ", model compiled in " in ready, ready
            storescu("127.0.0.1", node.port, node.ae_title, series.directory)
            status = node.wait_status(_done, timeout=180)
            files = pacs.wait_for_files(2, timeout=120)
            assert [j["state"] for j in status["jobs"]] == ["done"], status["jobs"]
            blobs = list((node.state_dir / "engines" / "openvino" / "body-threshold-0.1.0").glob("*.blob"))
            assert len(blobs) == 1 and blobs[0].with_suffix(".json").is_file()
        offset = len(node.log_text())
        with node:  # a restart: the model comes from the cache, neither compiled nor checked again
            restarted = node.log_text()[offset:]
            assert "body-threshold@0.1.0 (OpenVINO " in restarted and "model from the model cache" in restarted
            assert "compiled the OpenVINO" not in restarted
    results = {str(dcmread(f, stop_before_pixels=True).SOPClassUID): f for f in files}
    assert set(results) == {SEG_CLASS, RTSTRUCT_CLASS}
    check_seg(results[SEG_CLASS], sources, {"BODY"})
    check_rtstruct(results[RTSTRUCT_CLASS], sources, {"BODY"})

    # The BODY OpenVINO delivered against ONNX Runtime FP32 on the same series.
    seg = hd.seg.segread(results[SEG_CLASS])
    uids = [str(u) for u in series.sop_instance_uids]
    delivered = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], combine_segments=False)[..., 0] > 0
    (bundle,) = discover_bundles(REPO / "engines", ("body-threshold",))
    assert bundle.model_file is not None
    volume = build_volume(read_series(series.files))
    reference = OnnxRuntimeEngine(bundle.model_file, input_name=bundle.input_name, output_name=bundle.output_name)
    labels = segment_volume(volume, bundle, reference)
    ours, theirs = int(delivered.sum()), int(np.count_nonzero(labels == 1))
    assert theirs > 0 and abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)
