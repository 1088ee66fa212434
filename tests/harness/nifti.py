"""A small NIfTI-1 reader (no nibabel): header, affine, voxels, and a CT as a node ``Geometry``.

Only what the tests need: single-file NIfTI-1 (``.nii`` or ``.nii.gz``, magic ``n+1``), either byte
order, the common integer/float datatypes, ``scl_slope``/``scl_inter``, and the voxel → world affine
from the sform (preferred when ``sform_code > 0``), else the qform quaternion, else pixdim alone.

NIfTI world coordinates are RAS+ (x towards patient left is *negative*); DICOM patient coordinates
are LPS+. :func:`nifti_to_volume` turns a 3-D image into ``(voxels, Geometry)`` exactly like
:func:`node.assemble.volume.build_volume` would have built it from the DICOM series: voxels are
``(slices, rows, columns)`` with rows along NIfTI j, columns along NIfTI i and slices along NIfTI k,
reordered if needed so that slices step along the positive normal ``row_dir × col_dir`` (the order
``build_volume`` sorts into). Label maps passed through the same function come out in the same
voxel order.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.model.volume import Geometry

#: NIfTI-1 datatype code → numpy dtype (without byte order).
_DTYPES: dict[int, str] = {
    2: "u1",  # UINT8
    4: "i2",  # INT16
    8: "i4",  # INT32
    16: "f4",  # FLOAT32
    64: "f8",  # FLOAT64
    256: "i1",  # INT8
    512: "u2",  # UINT16
    768: "u4",  # UINT32
    1024: "i8",  # INT64
    1280: "u8",  # UINT64
}

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Nifti:
    """A NIfTI-1 image: data indexed ``[i, j, k]`` (NIfTI voxel order) and its RAS affine."""

    data: np.ndarray
    affine: np.ndarray  # 4×4, voxel (i, j, k, 1) → RAS mm
    datatype: int
    sform_code: int
    qform_code: int


def _quaternion_affine(b: float, c: float, d: float, qfac: float, pixdim: tuple[float, float, float],
                       offset: tuple[float, float, float]) -> np.ndarray:
    a2 = 1.0 - (b * b + c * c + d * d)
    a = float(np.sqrt(a2)) if a2 > 1e-7 else 0.0
    rot = np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])
    scale = np.array([pixdim[0], pixdim[1], pixdim[2] * qfac])
    affine = np.eye(4)
    affine[:3, :3] = rot * scale[None, :]
    affine[:3, 3] = offset
    return affine


def read_nifti(path: Path) -> Nifti:
    """Read a single-file NIfTI-1 image; raise ValueError with a sentence for what is not supported."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 348:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for a NIfTI-1 header (348 bytes)")
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", raw[:4])[0] == 348:
            break
    else:
        raise ValueError(f"{path}: sizeof_hdr is not 348 in either byte order; not a NIfTI-1 file")
    magic = raw[344:348]
    if magic not in (b"n+1\x00", b"ni1\x00"):
        raise ValueError(f"{path}: magic {magic!r} is not NIfTI-1")
    if magic == b"ni1\x00":
        raise ValueError(f"{path}: a two-file (.hdr/.img) NIfTI pair is not supported")
    dim = struct.unpack(endian + "8h", raw[40:56])
    datatype, _bitpix = struct.unpack(endian + "2h", raw[70:74])
    pixdim = struct.unpack(endian + "8f", raw[76:108])
    vox_offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    scl_slope, scl_inter = struct.unpack(endian + "2f", raw[112:120])
    qform_code, sform_code = struct.unpack(endian + "2h", raw[252:256])
    qb, qc, qd, qx, qy, qz = struct.unpack(endian + "6f", raw[256:280])
    srow = np.array(struct.unpack(endian + "12f", raw[280:328]), dtype=np.float64).reshape(3, 4)

    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise ValueError(f"{path}: dim[0] = {ndim} is not a valid number of dimensions")
    shape = tuple(int(n) for n in dim[1:1 + ndim])
    if datatype not in _DTYPES:
        raise ValueError(f"{path}: NIfTI datatype {datatype} is not supported (supported: {sorted(_DTYPES)})")
    dtype = np.dtype(endian + _DTYPES[datatype])
    count = int(np.prod(shape))
    if len(raw) < vox_offset + count * dtype.itemsize:
        raise ValueError(f"{path}: the file holds fewer bytes than its {shape} {dtype} voxels need")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=vox_offset).reshape(shape, order="F")
    if scl_slope not in (0.0, 1.0) or scl_inter != 0.0:
        slope = scl_slope if scl_slope != 0.0 else 1.0
        data = data.astype(np.float32) * np.float32(slope) + np.float32(scl_inter)
    else:
        data = data.astype(dtype.newbyteorder("="))

    if sform_code > 0:
        affine = np.eye(4)
        affine[:3] = srow
    elif qform_code > 0:
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        affine = _quaternion_affine(qb, qc, qd, qfac, (pixdim[1], pixdim[2], pixdim[3]), (qx, qy, qz))
    else:
        affine = np.diag([pixdim[1], pixdim[2], pixdim[3], 1.0])
    return Nifti(data=data, affine=affine, datatype=int(datatype), sform_code=int(sform_code),
                 qform_code=int(qform_code))


def nifti_to_volume(image: Nifti) -> tuple[np.ndarray, Geometry]:
    """A 3-D NIfTI image → ``(voxels (slices, rows, cols), Geometry in LPS)`` like ``build_volume`` makes.

    Voxels keep the image's dtype (cast CT to float32 yourself). Rows follow NIfTI j, columns NIfTI
    i, slices NIfTI k; the slice order is reversed when NIfTI k runs against ``row_dir × col_dir``.
    """
    if image.data.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {image.data.shape}")
    lps = _RAS_TO_LPS @ image.affine[:3, :3]
    origin = _RAS_TO_LPS @ image.affine[:3, 3]
    di, dj = float(np.linalg.norm(lps[:, 0])), float(np.linalg.norm(lps[:, 1]))
    row_dir = lps[:, 0] / di
    col_dir = lps[:, 1] / dj
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    slice_step = lps[:, 2].copy()
    voxels = np.ascontiguousarray(np.transpose(image.data, (2, 1, 0)))  # [k, j, i]
    nk = voxels.shape[0]
    if float(slice_step @ normal) < 0:
        origin = origin + (nk - 1) * slice_step
        slice_step = -slice_step
        voxels = np.ascontiguousarray(voxels[::-1])
    geometry = Geometry(
        origin=origin,
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        slice_step=slice_step,
        spacing=(float(slice_step @ normal), dj, di),
        shape=(int(voxels.shape[0]), int(voxels.shape[1]), int(voxels.shape[2])),
    )
    return voxels, geometry


def load_nifti_volume(path: Path) -> tuple[np.ndarray, Geometry]:
    """Read ``path`` and return ``nifti_to_volume`` of it."""
    return nifti_to_volume(read_nifti(path))


def _voxel_to_patient(geometry: Geometry) -> np.ndarray:
    """4×4 matrix: (k, i, j, 1) → LPS mm."""
    matrix = np.eye(4)
    matrix[:3, 0] = geometry.slice_step
    matrix[:3, 1] = np.asarray(geometry.col_dir) * geometry.spacing[1]
    matrix[:3, 2] = np.asarray(geometry.row_dir) * geometry.spacing[2]
    matrix[:3, 3] = geometry.origin
    return matrix


def labels_on_grid(labels: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume from ``source`` onto ``target``'s voxels
    (0 where a target voxel falls outside the source)."""
    from scipy import ndimage

    mapping = np.linalg.inv(_voxel_to_patient(source)) @ _voxel_to_patient(target)
    return ndimage.affine_transform(labels, mapping[:3, :3], offset=mapping[:3, 3], output_shape=target.shape,
                                    order=0, mode="constant", cval=0)
