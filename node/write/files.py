"""Writing a result to disk: SEG, RTSTRUCT and previews, each saved tmp → fsync → rename."""

from __future__ import annotations

import logging
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.model.enums import SegType
from node.spool.store import durable_write
from node.write.contour_check import RoiCheck, check_contours, describe
from node.write.preview import build_preview_sc, render_montage
from node.write.result import Result
from node.write.rtstruct import build_rtstruct, trace_contours
from node.write.seg import build_seg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenObject:
    kind: str  # "SEG", "RTSTRUCT" or "PREVIEW"
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    #: An RTSTRUCT's check of its contours, per ROI (node/write/contour_check.py); empty for other objects.
    contour_checks: tuple[RoiCheck, ...] = ()
    #: The structure selection it was written for (None: every structure; node/config_output.py), and whether that
    #: is the site's selection, which destinations without their own ``structures`` get.
    structures: tuple[str, ...] | None = None
    site: bool = True


_PIXEL_DATA = 0x7FE00010
#: Pixel data at least this large is written straight from its buffer (see encode_dataset).
DIRECT_PIXEL_BYTES = 1 << 20


def encode_dataset(ds: Dataset) -> list[bytes]:
    """The DICOM file of ``ds`` (preamble, file meta, data set), as chunks to write one after another.

    A large native PixelData that is the data set's last element (a SEG's 40 MB of frames) is not
    copied through pydicom's buffers, which took three copies of it: pydicom encodes everything
    before it, its explicit-VR header is packed here, and its value is written as it is.
    """
    pixel = ds.get(_PIXEL_DATA)
    buffer = BytesIO()
    if pixel is None or not (
        ds.file_meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian
        and pixel.VR in ("OB", "OW")
        and isinstance(pixel.value, bytes)
        and len(pixel.value) >= DIRECT_PIXEL_BYTES
        and len(pixel.value) % 2 == 0
        and max(ds.keys()) == _PIXEL_DATA
    ):
        ds.save_as(buffer, enforce_file_format=True)
        return [buffer.getvalue()]
    del ds[_PIXEL_DATA]
    try:
        ds.save_as(buffer, enforce_file_format=True)
    finally:
        ds[_PIXEL_DATA] = pixel
    header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, pixel.VR.encode("ascii"), 0, len(pixel.value))
    return [buffer.getvalue(), header, pixel.value]


def save_dataset(ds: Dataset, path: Path) -> None:
    durable_write(path, encode_dataset(ds), tmp_dir=path.parent)


def _write_seg(result: Result, out_dir: Path, seg_type: SegType) -> WrittenObject:
    seg = build_seg(result, seg_type=seg_type)
    path = out_dir / f"SEG_{result.uids.seg_instance}.dcm"
    save_dataset(seg, path)
    return WrittenObject("SEG", path, result.uids.seg_instance, str(seg.SOPClassUID))


def write_results(
    result: Result, out_dir: Path, *, write_seg: bool = True, write_rtstruct: bool = True,
    seg_type: SegType = SegType.BINARY,
) -> list[WrittenObject]:
    """Build and durably save the SEG and the RTSTRUCT of one result.

    The SEG is built on a second thread while the RTSTRUCT is traced here: much of both is numpy
    work that releases the GIL, so the two take little longer than the slower one. The RTSTRUCT's
    object carries the check of its contours (and it is logged).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    objects: list[WrittenObject] = []
    if write_seg:
        _ = result.boxes  # the structures' boxes: found once here, before both writers use them
    with ThreadPoolExecutor(max_workers=1) as pool:
        seg_future = pool.submit(_write_seg, result, out_dir, seg_type) if write_seg else None
        if write_rtstruct:
            traced = trace_contours(result)
            rt = build_rtstruct(result, traced)
            path = out_dir / f"RTSTRUCT_{result.uids.rtstruct_instance}.dcm"
            save_dataset(rt, path)
            checks = tuple(check_contours(result.found, traced, result.bundle, result.volume.geometry))
            tiny = sum(check.tiny for check in checks)
            log.log(logging.WARNING if tiny else logging.INFO, "RTSTRUCT %s contours: %s",
                    result.uids.rtstruct_instance, describe(checks))
            objects.append(WrittenObject("RTSTRUCT", path, result.uids.rtstruct_instance, str(rt.SOPClassUID),
                                         checks))
        if seg_future is not None:
            objects.insert(0, seg_future.result())
    return objects


def write_preview(result: Result, out_dir: Path, *, png: bool, secondary_capture: bool) -> list[WrittenObject]:
    """preview.png and/or the same montage as a Secondary Capture (returned, to be sent)."""
    if not (png or secondary_capture):
        return []
    bundle = result.bundle
    montage = render_montage(result.volume, result.labels, result.found,
                             f"{bundle.algorithm_name} {bundle.version} - not for diagnosis")
    if png:
        buffer = BytesIO()
        montage.save(buffer, format="PNG")
        durable_write(out_dir / "preview.png", buffer.getvalue(), tmp_dir=out_dir)
    if not secondary_capture:
        return []
    uids = result.uids
    sc = build_preview_sc(result.volume, montage, series_uid=uids.preview_series,
                          instance_uid=uids.preview_instance, provenance=result.provenance, bundle_name=bundle.name)
    path = out_dir / f"PREVIEW_{uids.preview_instance}.dcm"
    save_dataset(sc, path)
    return [WrittenObject("PREVIEW", path, uids.preview_instance, str(sc.SOPClassUID))]
