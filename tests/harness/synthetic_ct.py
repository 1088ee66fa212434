"""Synthetic CT series generator for tests and benchmarks.

This module writes realistic, fully valid CT Image Storage DICOM series of an
analytic phantom. The phantom is defined in DICOM patient coordinates (LPS,
millimetres), and every pixel is sampled at its own patient-space position.
Axial, tilted (gantry-tilt-like) and sagittal/coronal acquisitions of the same
phantom therefore show the same anatomy in the same place, and a volume
assembler can be checked against the analytic truth.

Phantom (Hounsfield units; LPS: +x = patient left, +y = posterior, +z = head):

* air, -1000 HU, everywhere outside the patient;
* an elliptic-cylinder **body** whose semi-axes vary smoothly with z (and taper
  to a "neck" above z = 230 mm). The posterior skin line is fixed at
  ``y = Y_BACK`` (the patient lies on the table). It is made of soft tissue
  (40 HU) with a 10 mm subcutaneous fat layer (-90 HU);
* two **lungs** (-850 HU), ellipsoids for z in about [-90, 210] mm (the "chest");
* a **spine**: vertebral bodies (+700 HU) every 32 mm, separated by 6 mm
  intervertebral discs (80 HU), with a bony posterior arch around a spinal
  canal (15 HU);
* a **patient table** (couch, +200 HU): an 8 mm thick, gently curved (cradle)
  plate that sits ``TABLE_GAP_MM`` (5 mm) of air away from the body on the side
  given by the patient position (posterior for supine, anterior for prone,
  lateral for decubitus). It is *not* part of the body, so a body-contouring
  algorithm has to exclude it.

Gaussian noise (``noise_hu``, default 10 HU, deterministic from ``seed``) is
added to the sampled image only; :func:`phantom_hu` is noise free.

Pixel storage follows what common CT scanners write: unsigned 16-bit pixels,
BitsStored 12 / HighBit 11, RescaleSlope 1, RescaleIntercept -1024 (so stored
values 0..4095 cover -1024..3071 HU).

Public API:

* :func:`write_ct_series` - write a series, returns :class:`SyntheticSeries`;
* :func:`phantom_hu` - analytic (noise-free) HU at LPS points;
* :func:`body_mask_lps` - ground-truth body mask (table excluded) at LPS points;
* :func:`phantom_landmarks` - points well inside each structure at a height z,
  with their expected HU (handy for spot checks of a read-back volume).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "HU_AIR",
    "HU_BONE",
    "HU_CSF",
    "HU_DISC",
    "HU_FAT",
    "HU_LUNG",
    "HU_SOFT_TISSUE",
    "HU_TABLE",
    "PATIENT_POSITIONS",
    "TABLE_GAP_MM",
    "Y_BACK",
    "SyntheticSeries",
    "body_mask_lps",
    "phantom_hu",
    "phantom_landmarks",
    "write_ct_series",
]

FloatArray: TypeAlias = npt.NDArray[np.float32]
BoolArray: TypeAlias = npt.NDArray[np.bool_]
# Coordinates may be Python/NumPy scalars or arrays that broadcast together.
_Coord: TypeAlias = "float | np.floating | FloatArray"
_Mask: TypeAlias = "bool | np.bool_ | BoolArray"

# --------------------------------------------------------------------------
# Phantom constants (millimetres, Hounsfield units)
# --------------------------------------------------------------------------
HU_AIR: Final = -1000.0
HU_SOFT_TISSUE: Final = 40.0
HU_FAT: Final = -90.0
HU_LUNG: Final = -850.0
HU_BONE: Final = 700.0
HU_DISC: Final = 80.0
HU_CSF: Final = 15.0
HU_TABLE: Final = 200.0

#: Posterior skin line (y, LPS mm) of the body: the body's back is flat on the table.
Y_BACK: Final = 125.0

# Body cross-section: semi-axes a(z) (left-right) and b(z) (anterior-posterior).
_A0, _A1, _A_PERIOD = 160.0, 12.0, 420.0
_B0, _B1, _B_PERIOD, _B_PHASE = 105.0, 10.0, 560.0, 0.9
_A_MAX: Final = _A0 + _A1  # upper bounds used to place the table
_B_MAX: Final = _B0 + _B1
_NECK_Z0, _NECK_LEN = 230.0, 70.0  # taper towards a neck above this height
_NECK_A_SHRINK, _NECK_B_SHRINK = 0.55, 0.40
_FAT_MM: Final = 10.0

# Lungs: ellipsoids centred at +-_LUNG_DX * a(z), within the chest z range.
_LUNG_Z_CENTER, _LUNG_HALF_HEIGHT = 60.0, 150.0
_LUNG_DX, _LUNG_DY = 0.42, -0.05  # centre, as fractions of a(z) / b(z)
_LUNG_AX, _LUNG_AY = 0.30, 0.62  # semi-axes at the widest level, fractions of a/b

# Spine (distances measured anteriorly from the posterior skin line Y_BACK).
_VERT_DY, _VERT_AX, _VERT_AY = 45.0, 17.0, 14.0
_CANAL_DY, _CANAL_R, _ARCH_R = 24.0, 7.0, 11.5
_VERT_PERIOD, _DISC_MM, _VERT_Z0 = 32.0, 6.0, 0.0

# Table (couch).
TABLE_GAP_MM: Final = 5.0
_TABLE_THICKNESS = 8.0
_TABLE_CURVE_RADIUS = 800.0  # cradle: edges rise towards the patient
_TABLE_HALF_WIDTH = 200.0
_BODY_CENTER_Y_NOMINAL = Y_BACK - _B0  # lateral centre of the table for decubitus

#: Supported PatientPosition values -> (axis, sign, lateral axis): the table
#: lies on the side ``sign * axis`` of the patient.
PATIENT_POSITIONS: Final[dict[str, tuple[int, int, int]]] = {
    "HFS": (1, +1, 0),
    "FFS": (1, +1, 0),
    "HFP": (1, -1, 0),
    "FFP": (1, -1, 0),
    "HFDR": (0, -1, 1),
    "FFDR": (0, -1, 1),
    "HFDL": (0, +1, 1),
    "FFDL": (0, +1, 1),
}

_F32 = np.float32


# --------------------------------------------------------------------------
# Analytic phantom
# --------------------------------------------------------------------------
def _smoothstep(u: _Coord) -> _Coord:
    t = np.clip(u, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _body_axes(z: _Coord) -> tuple[_Coord, _Coord]:
    """Semi-axes (a, b) of the body ellipse at height ``z``."""
    taper = _smoothstep((z - _NECK_Z0) / _NECK_LEN)
    a = (_A0 + _A1 * np.sin(z * (2.0 * math.pi / _A_PERIOD))) * (1.0 - _NECK_A_SHRINK * taper)
    b = (_B0 + _B1 * np.sin(z * (2.0 * math.pi / _B_PERIOD) + _B_PHASE)) * (
        1.0 - _NECK_B_SHRINK * taper
    )
    return a, b


def _lung_envelope(z: _Coord) -> _Coord:
    """Lung size factor in [0, 1] (ellipsoidal profile along z)."""
    u = (z - _LUNG_Z_CENTER) / _LUNG_HALF_HEIGHT
    return np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))


def _is_disc(z: _Coord) -> _Mask:
    return np.mod(z - _VERT_Z0, _VERT_PERIOD) < _DISC_MM


def _table_side(patient_position: str) -> tuple[int, int, int, float]:
    """Return (axis, sign, lateral axis, s0) of the table for a patient position.

    ``s = sign * coord[axis]`` grows away from the patient towards the table;
    ``s0`` is the largest value of ``s`` reached by the body over all z.
    """
    try:
        axis, sign, lateral = PATIENT_POSITIONS[patient_position.upper()]
    except KeyError:
        raise ValueError(
            f"unsupported patient position {patient_position!r}; "
            f"expected one of {sorted(PATIENT_POSITIONS)}"
        ) from None
    s0 = (Y_BACK if sign > 0 else 2.0 * _B_MAX - Y_BACK) if axis == 1 else _A_MAX
    return axis, sign, lateral, s0


def _evaluate(
    x: _Coord,
    y: _Coord,
    z: _Coord,
    shape: tuple[int, ...],
    patient_position: str,
    want_hu: bool = True,
) -> tuple[FloatArray | None, BoolArray]:
    """Evaluate the phantom at broadcastable coordinates.

    ``x``, ``y`` and ``z`` are scalars or float32 arrays broadcastable to
    ``shape`` (axis-aligned images pass 1-D row/column vectors and a scalar
    z, which roughly halves the work). Returns ``(hu, body)`` of ``shape``;
    ``hu`` is ``None`` when ``want_hu`` is False.
    """
    a, b = _body_axes(z)
    inv_a = _F32(1.0) / np.asarray(a, dtype=_F32)
    inv_b = _F32(1.0) / np.asarray(b, dtype=_F32)
    yc = Y_BACK - np.asarray(b, dtype=_F32)
    dy = y - yc
    u = x * inv_a
    v = dy * inv_b
    body = np.broadcast_to(u * u + v * v <= 1.0, shape)
    if not want_hu:
        return None, np.ascontiguousarray(body)

    hu = np.full(shape, HU_AIR, dtype=_F32)
    np.copyto(hu, _F32(HU_SOFT_TISSUE), where=body)

    # Subcutaneous fat: the shell between the body and an ellipse inset by _FAT_MM.
    inv_ai = _F32(1.0) / (np.asarray(a, dtype=_F32) - _F32(_FAT_MM))
    inv_bi = _F32(1.0) / (np.asarray(b, dtype=_F32) - _F32(_FAT_MM))
    ui = x * inv_ai
    vi = dy * inv_bi
    np.copyto(hu, _F32(HU_FAT), where=body & (ui * ui + vi * vi > 1.0))

    # Lungs (only where the chest envelope is open).
    env = _lung_envelope(z)
    if np.any(env > 0.0):
        env32 = np.maximum(np.asarray(env, dtype=_F32), _F32(1e-6))
        inv_lx = _F32(1.0) / (_F32(_LUNG_AX) * np.asarray(a, dtype=_F32) * env32)
        inv_ly = _F32(1.0) / (_F32(_LUNG_AY) * np.asarray(b, dtype=_F32) * env32)
        ly = (dy - _F32(_LUNG_DY) * np.asarray(b, dtype=_F32)) * inv_ly
        ly2 = ly * ly
        for side in (-1.0, 1.0):
            lx = (x - _F32(side * _LUNG_DX) * np.asarray(a, dtype=_F32)) * inv_lx
            np.copyto(hu, _F32(HU_LUNG), where=lx * lx + ly2 <= 1.0)

    # Spine: vertebral body / disc, posterior arch, spinal canal.
    x2 = x * x
    vy = (y - _F32(Y_BACK - _VERT_DY)) * _F32(1.0 / _VERT_AY)
    vert = x2 * _F32(1.0 / (_VERT_AX * _VERT_AX)) + vy * vy <= 1.0
    disc = _is_disc(z)
    if np.ndim(disc) == 0:
        np.copyto(hu, _F32(HU_DISC if disc else HU_BONE), where=vert)
    else:
        np.copyto(hu, np.where(disc, _F32(HU_DISC), _F32(HU_BONE)), where=vert)
    cy = y - _F32(Y_BACK - _CANAL_DY)
    r2 = x2 + cy * cy
    np.copyto(hu, _F32(HU_BONE), where=r2 <= _F32(_ARCH_R * _ARCH_R))
    np.copyto(hu, _F32(HU_CSF), where=r2 <= _F32(_CANAL_R * _CANAL_R))

    # Table (outside the body by construction).
    axis, sign, lateral, s0 = _table_side(patient_position)
    coords = (x, y, z)
    s = coords[axis] * _F32(sign)
    t = coords[lateral]
    if lateral == 1:
        t = t - _F32(_BODY_CENTER_Y_NOMINAL)
    s_top = _F32(s0 + TABLE_GAP_MM) - t * t * _F32(0.5 / _TABLE_CURVE_RADIUS)
    ds = s - s_top
    table = (ds >= 0.0) & (ds <= _F32(_TABLE_THICKNESS)) & (np.abs(t) <= _F32(_TABLE_HALF_WIDTH))
    np.copyto(hu, _F32(HU_TABLE), where=table)
    return hu, np.ascontiguousarray(body)


def _split_points(points_lps: npt.ArrayLike) -> tuple[FloatArray, FloatArray, _Coord, tuple[int, ...]]:
    pts = np.asarray(points_lps, dtype=_F32)
    if pts.ndim == 0 or pts.shape[-1] != 3:
        raise ValueError(f"points must have shape (..., 3), got {pts.shape}")
    shape = pts.shape[:-1]
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    # A constant z (axial plane) is evaluated once as a scalar.
    z_out: _Coord = z
    if z.size and float(z.min()) == float(z.max()):
        z_out = _F32(z.flat[0])
    return x, y, z_out, shape


def phantom_hu(points_lps: npt.ArrayLike, *, patient_position: str = "HFS") -> FloatArray:
    """Noise-free phantom value (HU, float32) at LPS points of shape ``(..., 3)`` (mm).

    ``patient_position`` only decides on which side of the patient the table
    lies (posterior for HFS/FFS, anterior for HFP/FFP, right for *DR, left for
    *DL). The result has shape ``points_lps.shape[:-1]``.
    """
    x, y, z, shape = _split_points(points_lps)
    hu, _ = _evaluate(x, y, z, shape, patient_position)
    assert hu is not None
    return hu


def body_mask_lps(points_lps: npt.ArrayLike) -> BoolArray:
    """Ground-truth body mask (True inside the patient, table excluded).

    ``points_lps`` has shape ``(..., 3)`` (LPS, mm); the result has shape
    ``points_lps.shape[:-1]``. Lungs and spine are inside the body.
    """
    x, y, z, shape = _split_points(points_lps)
    _, body = _evaluate(x, y, z, shape, "HFS", want_hu=False)
    return body


def phantom_landmarks(
    z: float, *, patient_position: str = "HFS"
) -> dict[str, tuple[tuple[float, float, float], float]]:
    """Points well inside each phantom structure near height ``z``.

    Returns ``{name: ((x, y, z), expected_hu)}`` with names ``air``,
    ``soft_tissue``, ``fat``, ``spine`` (z moved to the centre of the nearest
    vertebral body), ``canal``, ``table`` and, where the chest is large enough
    at ``z``, ``lung_left`` / ``lung_right``. Each point lies at least ~3.5 mm
    inside its structure (5 mm for most), so the nearest voxel of a coarse
    (~3 mm) sampling has the same value.
    """
    a_, b_ = _body_axes(z)
    a, b = float(a_), float(b_)
    yc = Y_BACK - b
    out: dict[str, tuple[tuple[float, float, float], float]] = {}
    axis, sign, _lateral, s0 = _table_side(patient_position)
    # Air: 15 mm outside the skin, on the side away from the table.
    if axis == 1:
        air = (0.0, yc - b - 15.0, z) if sign > 0 else (0.0, Y_BACK + 15.0, z)
        table_mid = s0 + TABLE_GAP_MM + 0.5 * _TABLE_THICKNESS
        table = (0.0, sign * table_mid, z)
    else:
        air = (-sign * (a + 15.0), yc, z)
        table_mid = s0 + TABLE_GAP_MM + 0.5 * _TABLE_THICKNESS
        table = (sign * table_mid, _BODY_CENTER_Y_NOMINAL, z)
    out["air"] = (air, HU_AIR)
    out["table"] = (table, HU_TABLE)
    out["fat"] = ((0.0, yc - b + 0.5 * _FAT_MM, z), HU_FAT)
    out["soft_tissue"] = ((0.0, yc - b + 25.0, z), HU_SOFT_TISSUE)
    k = math.floor((z - _VERT_Z0) / _VERT_PERIOD)
    z_vert = _VERT_Z0 + k * _VERT_PERIOD + 0.5 * (_DISC_MM + _VERT_PERIOD)
    out["spine"] = ((0.0, Y_BACK - _VERT_DY, z_vert), HU_BONE)
    out["canal"] = ((0.0, Y_BACK - _CANAL_DY, z), HU_CSF)
    env = float(_lung_envelope(z))
    if _LUNG_AX * a * env >= 12.0 and _LUNG_AY * b * env >= 12.0:
        ly = yc + _LUNG_DY * b
        out["lung_left"] = ((_LUNG_DX * a, ly, z), HU_LUNG)
        out["lung_right"] = ((-_LUNG_DX * a, ly, z), HU_LUNG)
    return out


# --------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticSeries:
    """A synthetic CT series written to disk.

    ``files`` are in file-name (writing) order, which with
    ``shuffle_files=True`` deliberately differs from slice order;
    ``sop_instance_uids``, ``files_in_slice_order`` and ``image_positions``
    are in slice order (increasing position along the slice normal).
    """

    directory: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    #: ``files_in_slice_order[k]`` holds ``sop_instance_uids[k]``.
    files_in_slice_order: list[Path] = field(default_factory=list)
    #: ImagePositionPatient of each slice (as written), slice order.
    image_positions: list[tuple[float, float, float]] = field(default_factory=list)
    #: Unit row direction, column direction and slice normal (as written).
    row_direction: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_direction: tuple[float, float, float] = (0.0, 1.0, 0.0)
    normal: tuple[float, float, float] = (0.0, 0.0, 1.0)


def _ds(value: float) -> str:
    """Format a float as a DICOM DS string (<= 16 characters)."""
    if abs(value) < 5e-11:
        return "0"
    for digits in (12, 11, 10, 9, 8):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot format {value!r} as DS")


def _unit_directions(
    orientation: Sequence[float],
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Normalise the orientation, format it as DS and parse it back.

    Returns the DS strings and the row/column unit vectors exactly as a reader
    of the file will see them, so pixel content and header agree.
    """
    if len(orientation) != 6:
        raise ValueError("orientation must have 6 values (row cosines, column cosines)")
    o = np.asarray(orientation, dtype=np.float64)
    row, col = o[:3], o[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr < 1e-9 or nc < 1e-9:
        raise ValueError("orientation vectors must be non-zero")
    row, col = row / nr, col / nc
    if abs(float(row @ col)) > 1e-6:
        raise ValueError("orientation row and column directions must be orthogonal")
    text = tuple(_ds(float(v)) for v in (*row, *col))
    parsed = np.array([float(t) for t in text], dtype=np.float64)
    return text, parsed[:3], parsed[3:]


def _uid(root: str, *parts: object) -> str:
    return generate_uid(prefix=root, entropy_srcs=["synthetic_ct", *map(str, parts)])


def _file_order(slices: int, seed: int, shuffle: bool) -> list[int]:
    """Slice index written to each file counter position."""
    order = list(range(slices))
    if not shuffle or slices < 2:
        return order
    rng = np.random.default_rng([seed, 0x5F11E5])
    perm = [int(i) for i in rng.permutation(slices)]
    if perm == order or (slices > 2 and perm == order[::-1]):
        perm = perm[1:] + perm[:1]  # rotate: never identity (nor reversed for n > 2)
        if perm == order[::-1]:
            perm[0], perm[1] = perm[1], perm[0]
    return perm


def _coordinate(
    base: float, row_step: float, col_step: float, rows: int, columns: int
) -> _Coord:
    """One patient coordinate over the image, in the cheapest broadcast form.

    ``row_step``/``col_step`` are the coordinate increments per row/column.
    """
    if row_step == 0.0 and col_step == 0.0:
        return _F32(base)
    col_part = (base + np.arange(columns, dtype=np.float64) * col_step).astype(_F32)[None, :]
    if row_step == 0.0:
        return col_part
    row_part = (np.arange(rows, dtype=np.float64) * row_step).astype(_F32)[:, None]
    if col_step == 0.0:
        return row_part + _F32(base)
    return col_part + row_part


def write_ct_series(
    directory: Path,
    *,
    slices: int = 40,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    slice_thickness: float = 2.5,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    origin: tuple[float, float, float] = (-204.8, -204.8, -100.0),
    patient_position: str = "HFS",
    seed: int = 0,
    shuffle_files: bool = True,
    patient_id: str = "SYN0001",
    patient_name: str = "Synthetic^Phantom",
    uid_root: str | None = None,
    noise_hu: float = 10.0,
) -> SyntheticSeries:
    """Write a synthetic CT series of the analytic phantom into ``directory``.

    Geometry: slice ``k`` (0-based, slice order) has ImagePositionPatient
    ``origin + k * slice_thickness * normal`` with ``normal = row_dir x col_dir``
    from ``orientation`` (ImageOrientationPatient: row cosines then column
    cosines). ``pixel_spacing`` is DICOM PixelSpacing, i.e. (spacing between
    rows, spacing between columns); pixel (row r, column c) lies at
    ``IPP + c*pixel_spacing[1]*row_dir + r*pixel_spacing[0]*col_dir`` and
    holds the phantom value there plus Gaussian noise of ``noise_hu`` HU
    (deterministic from ``seed``; pass 0 for an exact phantom). The header
    values are written with <= 12 significant digits and the pixels are
    sampled at the positions a reader parses back from them.

    Files are named ``CT000000.dcm``, ``CT000001.dcm``, ... by an opaque
    counter; with ``shuffle_files`` the counter order is a (seeded) permutation
    of slice order that is never the identity, so receivers must sort by
    geometry. InstanceNumber follows slice order (1-based).

    UIDs are deterministic: the StudyInstanceUID and FrameOfReferenceUID
    depend on ``seed``, ``patient_id`` and ``uid_root`` only (series of the
    same phantom with different geometry share the study and the frame of
    reference, as they should), while the SeriesInstanceUID and
    SOPInstanceUIDs also depend on every geometry/content parameter.
    ``uid_root`` defaults to pydicom's root.

    Returns a :class:`SyntheticSeries` describing what was written.
    """
    if slices < 1 or rows < 1 or columns < 1 or rows > 65535 or columns > 65535:
        raise ValueError("slices, rows and columns must be positive (rows/columns <= 65535)")
    ps_row, ps_col = (float(v) for v in pixel_spacing)
    if ps_row <= 0 or ps_col <= 0 or slice_thickness <= 0:
        raise ValueError("pixel spacing and slice thickness must be positive")
    position = patient_position.upper()
    _table_side(position)  # validates
    root = uid_root or PYDICOM_ROOT_UID
    if not root.endswith("."):
        root += "."

    iop_text, row_dir, col_dir = _unit_directions(orientation)
    normal = np.cross(row_dir, col_dir)
    ps_text = (_ds(ps_row), _ds(ps_col))
    ps_row, ps_col = float(ps_text[0]), float(ps_text[1])
    origin_v = np.asarray(origin, dtype=np.float64)
    ipp_text = [
        tuple(_ds(float(v)) for v in origin_v + k * slice_thickness * normal) for k in range(slices)
    ]
    ipps = [(float(x), float(y), float(z)) for x, y, z in ipp_text]

    params = (
        slices, rows, columns, ps_text, _ds(slice_thickness), iop_text, ipp_text[0],
        position, patient_name, noise_hu,
    )
    study_uid = _uid(root, "study", seed, patient_id)
    for_uid = _uid(root, "frame-of-reference", seed, patient_id)
    series_uid = _uid(root, "series", seed, patient_id, *params)
    sop_uids = [_uid(root, "sop", series_uid, k) for k in range(slices)]

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    order = _file_order(slices, seed, shuffle_files)  # order[i]: slice in file i
    files = [directory / f"CT{i:06d}.dcm" for i in range(slices)]
    slice_files: list[Path] = [Path()] * slices
    for i, k in enumerate(order):
        slice_files[k] = files[i]

    header = _SeriesHeader(
        study_uid=study_uid,
        series_uid=series_uid,
        for_uid=for_uid,
        patient_id=patient_id,
        patient_name=patient_name,
        patient_position=position,
        seed=seed,
        rows=rows,
        columns=columns,
        pixel_spacing=ps_text,
        slice_thickness=_ds(slice_thickness),
        orientation=iop_text,
    )

    def make_slice(k: int) -> None:
        ipp = ipps[k]
        shape = (rows, columns)
        coords = [
            _coordinate(ipp[i], ps_row * col_dir[i], ps_col * row_dir[i], rows, columns)
            for i in range(3)
        ]
        hu, _ = _evaluate(coords[0], coords[1], coords[2], shape, position)
        assert hu is not None
        if noise_hu > 0:
            rng = np.random.default_rng([seed, 0xC7, k])
            noise = rng.standard_normal(shape, dtype=_F32)
            noise *= _F32(noise_hu)
            hu += noise
        hu += _F32(1024.5)  # stored = HU - intercept, rounded half up by the floor
        np.clip(hu, 0.0, 4095.0, out=hu)
        stored = hu.astype("<u2")  # truncation of values >= 0 == floor
        location = _ds(float(np.dot(ipp, normal)))
        ds = header.dataset(
            sop_uid=sop_uids[k],
            instance_number=k + 1,
            ipp=ipp_text[k],
            slice_location=location,
            pixel_bytes=stored.tobytes(),
        )
        dcmwrite(slice_files[k], ds, enforce_file_format=True)

    workers = max(1, min(4, os.cpu_count() or 1, slices))
    if workers == 1:
        for k in range(slices):
            make_slice(k)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(make_slice, range(slices)):
                pass

    return SyntheticSeries(
        directory=directory,
        files=files,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=for_uid,
        sop_instance_uids=sop_uids,
        files_in_slice_order=slice_files,
        image_positions=ipps,
        row_direction=(float(row_dir[0]), float(row_dir[1]), float(row_dir[2])),
        column_direction=(float(col_dir[0]), float(col_dir[1]), float(col_dir[2])),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
    )


@dataclass(frozen=True)
class _SeriesHeader:
    """Series-constant header values; builds one complete dataset per slice."""

    study_uid: str
    series_uid: str
    for_uid: str
    patient_id: str
    patient_name: str
    patient_position: str
    seed: int
    rows: int
    columns: int
    pixel_spacing: tuple[str, str]
    slice_thickness: str
    orientation: tuple[str, ...]

    def dataset(
        self,
        *,
        sop_uid: str,
        instance_number: int,
        ipp: tuple[str, ...],
        slice_location: str,
        pixel_bytes: bytes,
    ) -> Dataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "SYNTH_CT_1"

        date, time = "20240315", "093000"
        ds = Dataset()
        ds.file_meta = meta
        # SOP Common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate = date
        ds.InstanceCreationTime = time
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        # General Study / Series / Image dates
        ds.StudyDate = date
        ds.SeriesDate = date
        ds.AcquisitionDate = date
        ds.ContentDate = date
        ds.StudyTime = time
        ds.SeriesTime = "093100"
        ds.AcquisitionTime = "093105"
        ds.ContentTime = "093105"
        ds.AccessionNumber = f"SYN{self.seed % 10**8:08d}"
        ds.Modality = "CT"
        # General Equipment
        ds.Manufacturer = "SyntheticCT"
        ds.InstitutionName = "Synthetic Test Hospital"
        ds.ReferringPhysicianName = ""
        ds.StationName = "SYNCT01"
        ds.StudyDescription = "Synthetic CT phantom"
        ds.SeriesDescription = f"Phantom {self.slice_thickness}mm"
        ds.ManufacturerModelName = "Analytic Phantom"
        # Patient
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        # CT acquisition
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = self.slice_thickness
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.SoftwareVersions = "synthetic_ct 1"
        ds.ReconstructionDiameter = _ds(self.columns * float(self.pixel_spacing[1]))
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = self.patient_position
        # Relationship
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance_number
        # Image Plane / Frame of Reference
        ds.ImagePositionPatient = list(ipp)
        ds.ImageOrientationPatient = list(self.orientation)
        ds.FrameOfReferenceUID = self.for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = slice_location
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = self.rows
        ds.Columns = self.columns
        ds.PixelSpacing = list(self.pixel_spacing)
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        # VOI LUT and CT Image rescale
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.add_new(0x7FE00010, "OW", pixel_bytes)
        return ds
