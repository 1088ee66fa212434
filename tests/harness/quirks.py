"""Real series made quirky the way real data is, written to a test's own folder (never to ../shared).

- :func:`per_instance_frames`: every instance its own FrameOfReferenceUID (what de-identification
  tools that replace each UID independently produce).
- :func:`uneven_stack`: slices moved to an uneven spacing — by default a GE head protocol's 13 gaps
  of 4 mm, one of 1.08 mm, then 13 of 7 mm (28 slices, as many as ``ct/philips-head-5mm`` has).

Pixel data and every other attribute stay the scanner's; the files are written in slice order
(``slice_NNN.dcm``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread

#: The GE head protocol of issue 16: 13 gaps of 4 mm, one of 1.08 mm, 13 of 7 mm.
GE_HEAD_GAPS: tuple[float, ...] = (4.0,) * 13 + (1.08,) + (7.0,) * 13


def read_in_slice_order(folder: Path, prefix: str = "I") -> list[Dataset]:
    """The folder's instances (files whose name starts with ``prefix``), sorted along the slice normal."""
    datasets = [dcmread(p) for p in sorted(folder.iterdir()) if p.name.startswith(prefix)]
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda ds: float(np.array([float(v) for v in ds.ImagePositionPatient]) @ normal))


def _uid(*parts: object) -> str:
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(map(str, parts))).int}"


def per_instance_frames(datasets: Sequence[Dataset], seed: str = "quirk") -> list[str]:
    """Give each instance its own (deterministic) FrameOfReferenceUID; return them in order."""
    uids = []
    for k, ds in enumerate(datasets):
        ds.FrameOfReferenceUID = _uid(seed, "frame", ds.SOPInstanceUID, k)
        uids.append(str(ds.FrameOfReferenceUID))
    return uids


def uneven_stack(datasets: Sequence[Dataset], gaps: Sequence[float] = GE_HEAD_GAPS) -> np.ndarray:
    """Move the slices (in slice order) along their normal so that neighbours are ``gaps`` mm apart,
    the first staying where it is; SliceLocation follows. Returns the new positions (n, 3)."""
    if len(gaps) != len(datasets) - 1:
        raise ValueError(f"{len(gaps)} gaps given for {len(datasets)} slices")
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    offsets = np.concatenate([[0.0], np.cumsum(gaps)])
    positions = origin + offsets[:, None] * normal
    for ds, position, offset in zip(datasets, positions, offsets, strict=True):
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        if "SliceLocation" in ds:
            ds.SliceLocation = f"{float(datasets[0].SliceLocation) + offset:.4f}"
    return positions


def write_series(datasets: Sequence[Dataset], folder: Path, *, new_series: str | None = None) -> list[Path]:
    """Write the instances to ``folder``; with ``new_series``, under new (derived) Series and SOP
    Instance UIDs so the quirky copy is a series of its own next to the original."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    series_uid = _uid(new_series, "series") if new_series else None
    for k, ds in enumerate(datasets):
        if series_uid:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = _uid(new_series, "sop", k)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"slice_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
