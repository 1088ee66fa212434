"""Series → volume in patient geometry.

Slices are sorted along the normal of ImageOrientationPatient (not by InstanceNumber or file name),
rescale slope/intercept are applied, and compressed pixel data is decoded (pylibjpeg's openjpeg and
libjpeg plugins; RLE and deflate natively). A series that cannot form a volume raises
:class:`VolumeError` with a sentence that says why and names the attribute and value: a missing,
non-numeric, NaN/infinite or wrongly encoded (VR) geometry or rescale attribute, direction cosines
that are not unit-length and orthogonal, a RescaleSlope of 0, instances of several studies,
patients, SOP classes or modalities in one series, slices that do not form one stack
(``node.assemble.stack``: duplicates, missing slices, two stacks) and lossy-compressed images (their
values are not the scanner's: JPEG baseline changes 16-bit CT by thousands of HU; the node does not
segment them, the sender can send the lossless original). Unevenly spaced slices form a volume whose
geometry keeps every slice's position; several frames of reference in one regular stack are settled
by ``node.assemble.frames`` (one chosen by a stated rule, in the volume's notes, or declined).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from node.assemble.frames import settle_frame_of_reference
from node.assemble.stack import stack_of
from node.errors import VolumeError
from node.model.volume import Geometry, MixedFrames, Volume

log = logging.getLogger(__name__)

#: Orientation cosines may differ by this much between slices of one volume.
ORIENTATION_TOLERANCE = 1e-3
#: Row and column direction cosines may be this far from unit length, and their dot product this far
#: from 0 (real headers round them to 4-6 decimals).
DIRECTION_TOLERANCE = 0.01
#: Largest volume built (≈ 2.4 GiB as float32: a 512×512 CT of 2,300 slices). Larger claims — real or
#: a header lying about Rows/Columns — are refused before any memory is taken.
MAX_VOXELS = 600_000_000
#: No patient is longer or wider than this; a larger extent means broken spacing or positions (and
#: resampling it to a model's grid would take unbounded memory).
MAX_EXTENT_MM = 3000.0

#: Transfer syntaxes whose pixel data is lossy-compressed (PS3.5 Annex A, 10): JPEG lossy processes
#: (including the retired ones), JPEG-LS near-lossless, MPEG-2/MPEG-4/HEVC video, JPEG XL recompressed
#: JPEG.
LOSSY_TRANSFER_SYNTAXES = {
    **{f"1.2.840.10008.1.2.4.{n}": "JPEG lossy" for n in (50, 51, 52, 53, 54, 55, 56, 59, 60, 61, 62, 63, 64)},
    "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless",
    **{f"1.2.840.10008.1.2.4.{n}": "MPEG/HEVC video" for n in range(100, 109)},
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG recompression",
}
#: Transfer syntaxes that allow lossy or lossless coding: treated as lossy unless the dataset's
#: LossyImageCompression says "00" (PS3.3 C.7.6.1.1.5 makes it required once an image was lossy coded).
LOSSY_CAPABLE_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.93": "JPEG 2000 Part 2 multi-component",
    "1.2.840.10008.1.2.4.94": "JPIP referenced",
    "1.2.840.10008.1.2.4.95": "JPIP referenced deflate",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000",
}
#: Attributes the pixel data decoder reads (Image Pixel module).
PIXEL_DESCRIPTION = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
)
#: Attributes every instance of one volume must share, and what they identify. (Several
#: FrameOfReferenceUIDs in one regular stack are settled by node.assemble.frames instead.)
SAME_IN_SERIES = (
    ("StudyInstanceUID", "one study"),
    ("PatientID", "one patient"),
    ("SOPClassUID", "one SOP class"),
    ("Modality", "one modality"),
)


def read_series(paths: Sequence[Path]) -> list[Dataset]:
    """Read every file of a series (with pixel data); unreadable files raise VolumeError."""
    datasets: list[Dataset] = []
    for path in paths:
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise VolumeError(f"{path.name}: not a readable DICOM file ({exc})") from exc
        # Some real files carry their SOP UIDs only in the file meta (the dataset's are empty).
        if not str(ds.get("SOPInstanceUID", "") or "") and "MediaStorageSOPInstanceUID" in ds.file_meta:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        if not str(ds.get("SOPClassUID", "") or "") and "MediaStorageSOPClassUID" in ds.file_meta:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        datasets.append(ds)
    return datasets


def _uid_of(ds: Dataset) -> str:
    try:
        return str(ds.get("SOPInstanceUID", "?") or "?")
    except Exception:  # noqa: BLE001 - a broken SOPInstanceUID must not hide the real error
        return "?"


def _element(ds: Dataset, keyword: str) -> DataElement | None:
    """The element, its value converted; VolumeError naming it when its VR is not the one DICOM
    defines for it (the bytes would be read as something else) or its value cannot be read."""
    if keyword not in ds:
        return None
    raw = ds.get_item(keyword)
    vr = str(getattr(raw, "VR", "") or "")
    allowed = dictionary_VR(keyword).split(" or ")
    if vr and vr != "UN" and vr not in allowed:
        value = getattr(raw, "value", b"")
        shown = bytes(value[:40]) if isinstance(value, (bytes, bytearray)) else value
        raise VolumeError(
            f"instance {_uid_of(ds)} has {keyword} with VR {vr} where DICOM defines {' or '.join(allowed)}; "
            f"its value {shown!r} cannot be read as intended"
        )
    try:
        return ds[keyword]
    except Exception as exc:  # pydicom: BytesLengthException, ValueError, NotImplementedError...
        raise VolumeError(f"instance {_uid_of(ds)} has a {keyword} that cannot be read: {exc}") from exc


def _values(elem: DataElement | None) -> list[Any]:
    if elem is None or elem.value is None or elem.value == "":
        return []
    value = elem.value
    return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]


def _floats(ds: Dataset, keyword: str, values: list[Any]) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"instance {_uid_of(ds)} has a non-numeric {keyword} {values!r}") from exc
    if not all(math.isfinite(v) for v in out):
        raise VolumeError(f"instance {_uid_of(ds)} has a {keyword} that is not finite: {out}")
    return out


def _vector(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    """``n`` finite numbers, or VolumeError naming the instance, the attribute and what it holds."""
    values = _values(_element(ds, keyword))
    if len(values) != n:
        got = values if values else None
        raise VolumeError(
            f"instance {_uid_of(ds)} has no valid {keyword} (got {got!r}: {len(values)} values, {n} needed); "
            "cannot place it in space"
        )
    return np.array(_floats(ds, keyword, values), dtype=np.float64)


def _number(ds: Dataset, keyword: str, default: float | None = None) -> float | None:
    """One finite number, ``default`` when absent or empty."""
    values = _values(_element(ds, keyword))
    if not values:
        return default
    if len(values) != 1:
        raise VolumeError(f"instance {_uid_of(ds)} has {len(values)} values in {keyword} ({values!r}); it needs one")
    return _floats(ds, keyword, values)[0]


def _count(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """A positive whole number (Rows, Columns, NumberOfFrames)."""
    value = _number(ds, keyword, None if default is None else float(default))
    if value is None:
        raise VolumeError(f"instance {_uid_of(ds)} has no {keyword}; the size of its image is unknown")
    if value < 1 or value != int(value):
        raise VolumeError(f"instance {_uid_of(ds)} has {keyword} {value:g}; it must be a whole number of at least 1")
    return int(value)


def _text(ds: Dataset, keyword: str) -> str:
    values = _values(_element(ds, keyword))
    return "\\".join(str(v) for v in values).strip()


def _lossy(ds: Dataset) -> str | None:
    """Why this instance's pixel data is (or may be) lossy-compressed, or None."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else "")
    flag = _text(ds, "LossyImageCompression")
    if ts in LOSSY_TRANSFER_SYNTAXES:
        return f"transfer syntax {ts} ({LOSSY_TRANSFER_SYNTAXES[ts]})"
    if ts in LOSSY_CAPABLE_TRANSFER_SYNTAXES and flag != "00":
        return (
            f"transfer syntax {ts} ({LOSSY_CAPABLE_TRANSFER_SYNTAXES[ts]}, lossy unless LossyImageCompression "
            f"is 00; it is {flag or 'absent'})"
        )
    if flag == "01":
        method = _text(ds, "LossyImageCompressionMethod")
        return "LossyImageCompression 01" + (f" ({method})" if method else "") + ": it was lossy-compressed before"
    return None


def _describe(values: Counter[str]) -> str:
    shown = [f"{v or '(empty)'!r} ({n} instance{'s' if n > 1 else ''})" for v, n in values.most_common(3)]
    more = len(values) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


#: Attributes whose values identify a patient: an error (which is logged and stored) counts them, never shows them.
PATIENT_IDENTIFIERS = {"PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"}


def check_series_identity(datasets: Sequence[Dataset]) -> None:
    """Every instance of one volume comes from one study, patient, SOP class and modality."""
    for keyword, what in SAME_IN_SERIES:
        values = Counter(_text(ds, keyword) for ds in datasets)
        if len(values) > 1:
            if keyword in PATIENT_IDENTIFIERS:  # no patient data in logs or job records
                counts = " and ".join(str(n) for _, n in values.most_common())
                shown = f"{len(values)} different values ({counts} instances)"
            else:
                shown = f"values {_describe(values)}"
            raise VolumeError(f"the series mixes {keyword} {shown}; one volume must come from {what}")


def _direction_cosines(ds: Dataset) -> np.ndarray:
    iop = _vector(ds, "ImageOrientationPatient", 6)
    row, col = iop[:3], iop[3:]
    shown = [round(float(v), 4) for v in iop]
    for name, v in (("row", row), ("column", col)):
        if abs(float(np.linalg.norm(v)) - 1.0) > DIRECTION_TOLERANCE:
            raise VolumeError(
                f"instance {_uid_of(ds)} has ImageOrientationPatient {shown}: its {name} direction has length "
                f"{float(np.linalg.norm(v)):.3f}, not 1"
            )
    dot = float(row @ col)
    if abs(dot) > DIRECTION_TOLERANCE:
        raise VolumeError(
            f"instance {_uid_of(ds)} has ImageOrientationPatient {shown}: its row and column directions are not "
            f"orthogonal (cosine {dot:.3f}{', parallel' if abs(dot) > 0.999 else ''})"
        )
    return iop


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope = _number(ds, "RescaleSlope", 1.0)
    intercept = _number(ds, "RescaleIntercept", 0.0)
    assert slope is not None and intercept is not None
    if slope == 0:
        raise VolumeError(
            f"instance {_uid_of(ds)} has RescaleSlope 0: every voxel would be the intercept {intercept:g}; "
            "the header is broken"
        )
    return slope, intercept


def _voxel_dtype(datasets: Sequence[Dataset], rescale: Sequence[tuple[float, float]]) -> type:
    """int16 when every slice's stored values, rescaled, are integers within int16 (CT in HU), else float32.

    Decided from BitsStored, PixelRepresentation and the rescale before any pixel is decoded."""
    for ds, (slope, intercept) in zip(datasets, rescale, strict=True):
        bits = ds.get("BitsStored")
        if not isinstance(bits, int) or not 1 <= bits <= 16 or slope != int(slope) or intercept != int(intercept):
            return np.float32
        signed = ds.get("PixelRepresentation") == 1
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        ends = (low * slope + intercept, high * slope + intercept)
        if min(ends) < -32768 or max(ends) > 32767:
            return np.float32
    return np.int16


def build_volume(datasets: Sequence[Dataset], *, mixed_frames: MixedFrames = MixedFrames.SEGMENT) -> Volume:
    """Sort, check and stack a single-frame series into a :class:`Volume`.

    ``mixed_frames`` says what a regular stack whose instances carry several FrameOfReferenceUIDs
    becomes (see :mod:`node.assemble.frames`)."""
    if not datasets:
        raise VolumeError("the series has no instances")
    first = datasets[0]
    for ds in datasets:
        frames = _count(ds, "NumberOfFrames", 1)
        if frames > 1:
            raise VolumeError(
                f"instance {_uid_of(ds)} is multi-frame ({frames} frames); enhanced multi-frame series are "
                "not supported yet"
            )
        if "PixelData" not in ds:
            raise VolumeError(f"instance {_uid_of(ds)} has no pixel data")
        for keyword in PIXEL_DESCRIPTION:
            _element(ds, keyword)  # a wrong VR here makes the decoder fail obscurely: name it
        if lossy := _lossy(ds):
            raise VolumeError(
                f"instance {_uid_of(ds)} is lossy-compressed ({lossy}); its values are not the scanner's, and the "
                "node does not segment lossy images: send the series uncompressed or losslessly compressed"
            )
    check_series_identity(datasets)
    sizes = {(_count(ds, "Rows"), _count(ds, "Columns")) for ds in datasets}
    if len(sizes) > 1:
        raise VolumeError(f"the series mixes image sizes {sorted(sizes)}; one volume needs one size")
    rescale = [_rescale(ds) for ds in datasets]
    orientations = [_direction_cosines(ds) for ds in datasets]
    iop = orientations[0]
    for ds, other in zip(datasets, orientations, strict=True):
        if np.abs(other - iop).max() > ORIENTATION_TOLERANCE:
            raise VolumeError(
                f"the series mixes orientations: {_uid_of(ds)} has ImageOrientationPatient "
                f"{[round(float(v), 4) for v in other]} where others have {[round(float(v), 4) for v in iop]}"
            )
    row_dir = iop[:3] / np.linalg.norm(iop[:3])
    col_dir = iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    spacings = {tuple(float(v) for v in _vector(ds, "PixelSpacing", 2)) for ds in datasets}
    if len(spacings) > 1:
        raise VolumeError(f"the series mixes PixelSpacing values {sorted(spacings)}")
    pixel_spacing = next(iter(spacings))
    if min(pixel_spacing) <= 0:
        raise VolumeError(f"PixelSpacing {list(pixel_spacing)} is not positive")

    positions = np.array([_vector(ds, "ImagePositionPatient", 3) for ds in datasets])
    stack = None
    if len(datasets) > 1:
        stack = stack_of(positions, normal, [_uid_of(ds) for ds in datasets])
        order = stack.order
        slice_spacing, slice_step = stack.spacing, stack.step
    else:
        order = np.zeros(1, dtype=np.int64)
        slice_spacing = _number(first, "SpacingBetweenSlices") or _number(first, "SliceThickness") or 1.0
        if slice_spacing <= 0:
            slice_spacing = 1.0
        slice_step = slice_spacing * normal
    ordered = [datasets[i] for i in order]
    frame_uid, frame_note = settle_frame_of_reference(
        [_text(ds, "FrameOfReferenceUID") for ds in ordered], uniform=stack is None or stack.uniform,
        spacing_mm=float(slice_spacing), policy=mixed_frames)

    if not frame_uid:
        raise VolumeError(
            "the series has no FrameOfReferenceUID: its images are not placed in a patient frame of reference, "
            "so results could not be either"
        )
    rows, cols = next(iter(sizes))
    count = len(ordered) * rows * cols
    if count > MAX_VOXELS:
        raise VolumeError(
            f"the series would be {len(ordered)} slices of {rows}×{cols} = {count:,} voxels "
            f"({count * 4 / 2**30:.1f} GiB as float32); the node handles at most {MAX_VOXELS:,}"
        )
    voxels: np.ndarray = np.empty((len(ordered), rows, cols), dtype=_voxel_dtype(ordered, [rescale[i] for i in order]))
    headers: list[Dataset] = []
    for k, ds in enumerate(ordered):
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises a variety of decoder errors
            ts = ds.file_meta.get("TransferSyntaxUID", "?")
            raise VolumeError(
                f"the pixel data of instance {_uid_of(ds)} (transfer syntax {ts}) cannot be decoded: {exc}"
            ) from exc
        if pixels.ndim != 2:
            raise VolumeError(
                f"instance {_uid_of(ds)} has pixel array shape {pixels.shape}; only single-sample images are supported"
            )
        if pixels.shape != (rows, cols):
            raise VolumeError(
                f"the pixel data of instance {_uid_of(ds)} decodes to {pixels.shape[0]}×{pixels.shape[1]} pixels "
                f"where Rows and Columns say {rows}×{cols}"
            )
        slope, intercept = rescale[order[k]]
        if voxels.dtype == np.float32:
            np.multiply(pixels, slope, out=voxels[k], casting="unsafe")
            voxels[k] += intercept
        else:
            values = pixels * slope + intercept if (slope, intercept) != (1.0, 0.0) else pixels
            if values.size and (values.min() < -32768 or values.max() > 32767):  # bits above BitsStored set
                voxels = voxels.astype(np.float32)
                voxels[k] = values
            else:
                voxels[k] = values
        header = ds.copy()
        del header.PixelData
        if frame_note:
            header.FrameOfReferenceUID = frame_uid
        if stack is not None and not stack.uniform and "SpacingBetweenSlices" in header:
            del header.SpacingBetweenSlices  # one value cannot describe it; results must not copy it
        headers.append(header)

    extents = (len(ordered) * float(slice_spacing), rows * float(pixel_spacing[0]), cols * float(pixel_spacing[1]))
    if max(extents) > MAX_EXTENT_MM:
        raise VolumeError(
            f"the series spans {extents[0]:.0f} × {extents[1]:.0f} × {extents[2]:.0f} mm (slices × rows × columns), "
            f"more than {MAX_EXTENT_MM:.0f} mm: PixelSpacing {list(pixel_spacing)} or the slice positions are wrong"
        )
    if frame_note:
        log.warning("series %s: %s", _text(first, "SeriesInstanceUID") or "?", frame_note)
    geometry = Geometry(
        origin=positions[order][0],
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        slice_step=slice_step,
        spacing=(float(slice_spacing), float(pixel_spacing[0]), float(pixel_spacing[1])),
        shape=(len(ordered), rows, cols),
        positions=None if stack is None or stack.uniform else stack.positions,
    )
    return Volume(voxels=voxels, geometry=geometry, headers=headers, notes=[frame_note] if frame_note else [])
