"""Series → volume in patient geometry.

Slices are sorted along the normal of ImageOrientationPatient (not by InstanceNumber or file name),
rescale slope/intercept are applied, and compressed pixel data is decoded (pylibjpeg's openjpeg and
libjpeg plugins; RLE and deflate natively). A series that cannot form a volume raises
:class:`VolumeError` with a sentence that says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node.errors import VolumeError

#: Orientation cosines may differ by this much between slices of one volume.
ORIENTATION_TOLERANCE = 1e-3
#: Slice spacing may vary by this fraction of the median before the series is refused.
SPACING_TOLERANCE = 0.1
#: Largest volume built (≈ 2.4 GiB as float32: a 512×512 CT of 2,300 slices). Larger claims — real or
#: a header lying about Rows/Columns — are refused before any memory is taken.
MAX_VOXELS = 600_000_000
#: No patient is longer or wider than this; a larger extent means broken spacing or positions (and
#: resampling it to a model's grid would take unbounded memory).
MAX_EXTENT_MM = 3000.0


@dataclass(frozen=True)
class Geometry:
    """Voxel (k, i, j) = (slice, row, column) → patient position in mm (LPS).

    position = origin + k*slice_step + i*spacing[1]*col_dir + j*spacing[2]*row_dir
    where row_dir is IOP[0:3] (along a row, increasing column index) and col_dir IOP[3:6].
    ``slice_step`` is the vector from one slice's ImagePositionPatient to the next: along the normal
    for an ordinary stack, with an in-plane component for gantry-tilted CT, whose image planes are
    tilted while the table moves along z (a sheared stack). ``spacing[0]`` is the distance between
    slice planes (along the normal), which is what resampling and voxel volumes use.
    """

    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    slice_step: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    def to_patient(self, kij: np.ndarray) -> np.ndarray:
        """Map (..., 3) arrays of (k, i, j) voxel coordinates (may be fractional) to LPS mm."""
        kij = np.asarray(kij, dtype=np.float64)
        return (
            self.origin
            + kij[..., 0:1] * self.slice_step
            + kij[..., 1:2] * self.spacing[1] * self.col_dir
            + kij[..., 2:3] * self.spacing[2] * self.row_dir
        )

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        return self.origin + k * self.slice_step

    @property
    def is_sheared(self) -> bool:
        """True for gantry-tilted stacks (slices offset within their plane from one to the next)."""
        lateral = self.slice_step - (self.slice_step @ self.normal) * self.normal
        return bool(np.linalg.norm(lateral) > 1e-3)


@dataclass
class Volume:
    """A series' pixels in Hounsfield units (or the modality's rescaled unit), in slice order."""

    voxels: np.ndarray  # float32, (slices, rows, columns)
    geometry: Geometry
    headers: list[Dataset]  # per slice, pixel data removed, same order as voxels

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(h.SOPInstanceUID) for h in self.headers]


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


def _vector(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    uid = ds.get("SOPInstanceUID", "?")
    if value is None or len(value) != n:
        raise VolumeError(f"instance {uid} has no valid {keyword} (got {value!r}); cannot place it in space")
    try:
        return np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"instance {uid} has a non-numeric {keyword} {value!r}") from exc


def build_volume(datasets: Sequence[Dataset]) -> Volume:
    """Sort, check and stack a single-frame series into a :class:`Volume`."""
    if not datasets:
        raise VolumeError("the series has no instances")
    first = datasets[0]
    for ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(
                f"instance {ds.get('SOPInstanceUID', '?')} is multi-frame "
                f"({ds.NumberOfFrames} frames); enhanced multi-frame series are not supported yet"
            )
        if "PixelData" not in ds:
            raise VolumeError(f"instance {ds.get('SOPInstanceUID', '?')} has no pixel data")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise VolumeError(f"the series mixes image sizes {sorted(sizes)}; one volume needs one size")
    orientations = [_vector(ds, "ImageOrientationPatient", 6) for ds in datasets]
    iop = orientations[0]
    for ds, other in zip(datasets, orientations):
        if np.abs(other - iop).max() > ORIENTATION_TOLERANCE:
            raise VolumeError(
                f"the series mixes orientations: {ds.SOPInstanceUID} has ImageOrientationPatient "
                f"{[round(v, 4) for v in other]} where others have {[round(v, 4) for v in iop]}"
            )
    row_dir = iop[:3] / np.linalg.norm(iop[:3])
    col_dir = iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    spacings = {tuple(_vector(ds, "PixelSpacing", 2)) for ds in datasets}
    if len(spacings) > 1:
        raise VolumeError(f"the series mixes PixelSpacing values {sorted(spacings)}")
    pixel_spacing = next(iter(spacings))
    if min(pixel_spacing) <= 0:
        raise VolumeError(f"PixelSpacing {list(pixel_spacing)} is not positive")

    positions = np.array([_vector(ds, "ImagePositionPatient", 3) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    ordered = [datasets[i] for i in order]
    if len(ordered) > 1:
        steps = np.diff(along)
        dup = np.flatnonzero(steps < 1e-3)
        if dup.size:
            a, b = ordered[dup[0]], ordered[dup[0] + 1]
            raise VolumeError(
                f"instances {a.SOPInstanceUID} and {b.SOPInstanceUID} share the position "
                f"{along[dup[0]]:.2f} mm along the slice normal; duplicate slices cannot form a volume"
            )
        median = float(np.median(steps))
        bad = np.flatnonzero(np.abs(steps - median) > SPACING_TOLERANCE * median)
        if bad.size:
            k = int(bad[0])
            raise VolumeError(
                f"slice spacing is not uniform: {steps[k]:.2f} mm between slices {k} and {k + 1} "
                f"(at {along[k]:.1f} mm along the normal) where the series mostly has {median:.2f} mm"
                + ("; slices are missing" if steps[k] > median else "")
            )
        slice_spacing = median
        # The step from slice to slice must be the same vector throughout. Along the normal for an
        # ordinary stack; gantry tilt adds a constant in-plane component (a sheared stack).
        vectors = np.diff(positions[order], axis=0)
        slice_step = np.median(vectors, axis=0)
        deviation = np.linalg.norm(vectors - slice_step, axis=1)
        if deviation.max() > SPACING_TOLERANCE * np.linalg.norm(slice_step) + 1e-3:
            k = int(np.argmax(deviation))
            raise VolumeError(
                f"slice positions do not form a regular stack: the step from slice {k} to {k + 1} is "
                f"{np.round(vectors[k], 2).tolist()} mm where the series mostly steps {np.round(slice_step, 2).tolist()} mm"
            )
    else:
        slice_spacing = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
        slice_step = slice_spacing * normal

    rows, cols = next(iter(sizes))
    count = len(ordered) * rows * cols
    if count > MAX_VOXELS:
        raise VolumeError(
            f"the series would be {len(ordered)} slices of {rows}×{cols} = {count:,} voxels "
            f"({count * 4 / 2**30:.1f} GiB as float32); the node handles at most {MAX_VOXELS:,}"
        )
    voxels = np.empty((len(ordered), rows, cols), dtype=np.float32)
    headers: list[Dataset] = []
    for k, ds in enumerate(ordered):
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises a variety of decoder errors
            ts = ds.file_meta.get("TransferSyntaxUID", "?")
            raise VolumeError(
                f"the pixel data of instance {ds.SOPInstanceUID} (transfer syntax {ts}) cannot be decoded: {exc}"
            ) from exc
        if pixels.ndim != 2:
            raise VolumeError(
                f"instance {ds.SOPInstanceUID} has pixel array shape {pixels.shape}; only single-sample images are supported"
            )
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        np.multiply(pixels, slope, out=voxels[k], casting="unsafe")
        voxels[k] += intercept
        header = ds.copy()
        del header.PixelData
        headers.append(header)

    extents = (len(ordered) * float(slice_spacing), rows * float(pixel_spacing[0]), cols * float(pixel_spacing[1]))
    if max(extents) > MAX_EXTENT_MM:
        raise VolumeError(
            f"the series spans {extents[0]:.0f} × {extents[1]:.0f} × {extents[2]:.0f} mm (slices × rows × columns), "
            f"more than {MAX_EXTENT_MM:.0f} mm: PixelSpacing {list(pixel_spacing)} or the slice positions are wrong"
        )
    geometry = Geometry(
        origin=positions[order][0],
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        slice_step=slice_step,
        spacing=(float(slice_spacing), float(pixel_spacing[0]), float(pixel_spacing[1])),
        shape=(len(ordered), rows, cols),
    )
    return Volume(voxels=voxels, geometry=geometry, headers=headers)
