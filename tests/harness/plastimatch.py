"""Rasterize an RTSTRUCT with Debian's plastimatch, as an independent check of our contours.

:func:`rtstruct_to_masks` runs::

    plastimatch convert --input RTSTRUCT.dcm --referenced-ct CT_DIR \\
        --output-prefix OUT_DIR --prefix-format mha

and reads the one-mask-per-ROI MetaImage files it writes with a small reader of
our own (no SimpleITK / pynrrd dependency). Each mask comes back with the grid it
is on (:class:`Grid`), so a caller can compare it with another mask by patient
coordinates. :func:`plastimatch_missing_reason` gives a pytest skip reason.

What plastimatch 1.9.4 (Debian) does, found by running it (and reading
``rasterizer.cxx`` / ``rtss.cxx`` of the plastimatch sources):

* With ``--referenced-ct`` the output grid is the CT's *image* grid as
  plastimatch understands it ("Setting PIH from RDD"): origin = the
  ImagePositionPatient of the first slice along the normal, size
  columns x rows x slices, in-plane spacing = PixelSpacing, and direction =
  (row cosines, column cosines, normal). The third spacing is the distance
  between slice *planes* measured along the normal.
* For an ordinary axial series that grid is exactly the CT grid.
* For a gantry-tilted series (oblique ImageOrientationPatient, table moving
  along z, so successive slices are offset *within* their planes: a sheared
  stack) plastimatch still writes an orthogonal, non-sheared grid: it keeps
  the tilted direction cosines and the along-normal spacing but drops the
  in-plane offset between slices. Its voxel (i, j, k) therefore lies
  ``k * (slice_step - (slice_step . n) n)`` away from the CT voxel (i, j, k)
  (0.79 mm per slice for the Philips 18.5 degree series). The header it writes
  is self-consistent, though: each contour is rasterized into the grid slice
  its first vertex falls on, at in-plane positions computed from the contour's
  patient coordinates. So the masks are right *in patient space*; only the
  grid is not the CT's. Compare by patient coordinates, not by index.
* File names are the ROI names; :func:`rtstruct_to_masks` maps them back to
  the RTSTRUCT's ROI names (plastimatch may replace non-alphanumeric
  characters by ``_``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread

PLASTIMATCH_TIMEOUT_S = 300

_MET_TYPES = {
    "MET_UCHAR": np.uint8,
    "MET_CHAR": np.int8,
    "MET_USHORT": np.uint16,
    "MET_SHORT": np.int16,
    "MET_UINT": np.uint32,
    "MET_INT": np.int32,
    "MET_ULONG": np.uint64,
    "MET_LONG": np.int64,
    "MET_FLOAT": np.float32,
    "MET_DOUBLE": np.float64,
}

_NRRD_TYPES = {
    "uchar": np.uint8, "unsigned char": np.uint8, "uint8": np.uint8, "uint8_t": np.uint8,
    "signed char": np.int8, "int8": np.int8, "int8_t": np.int8, "char": np.int8,
    "short": np.int16, "int16": np.int16, "int16_t": np.int16, "signed short": np.int16,
    "ushort": np.uint16, "unsigned short": np.uint16, "uint16": np.uint16, "uint16_t": np.uint16,
    "int": np.int32, "int32": np.int32, "int32_t": np.int32, "signed int": np.int32,
    "uint": np.uint32, "unsigned int": np.uint32, "uint32": np.uint32, "uint32_t": np.uint32,
    "float": np.float32, "double": np.float64,
}


def plastimatch_path() -> Path | None:
    found = shutil.which("plastimatch")
    if found:
        return Path(found)
    default = Path("/usr/bin/plastimatch")
    return default if default.exists() else None


def plastimatch_missing_reason() -> str | None:
    """A pytest skip reason when plastimatch cannot be run, else None."""
    exe = plastimatch_path()
    if exe is None:
        return "plastimatch not found (apt-get install plastimatch)"
    try:
        proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"plastimatch at {exe} does not run: {exc}"
    if "plastimatch version" not in proc.stdout + proc.stderr:
        return f"{exe} --version printed no version: {(proc.stdout + proc.stderr)[-200:]!r}"
    return None


def plastimatch_version() -> str:
    exe = plastimatch_path()
    if exe is None:
        return "?"
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
    match = re.search(r"plastimatch version (\S+)", proc.stdout + proc.stderr)
    return match.group(1) if match else "?"


@dataclass(frozen=True)
class Grid:
    """An image grid as ITK/MetaImage describe it, for arrays indexed [k, i, j] = [z, y, x].

    ``spacing`` and the columns of ``direction`` follow ITK's axis order (x, y, z), i.e.
    (column, row, slice) of the numpy array; ``shape`` is the numpy shape (nz, ny, nx).
    Physical point of index (x, y, z) = origin + direction @ (spacing * (x, y, z)), in
    DICOM patient coordinates (LPS, mm) — ITK's convention, which plastimatch follows.
    """

    origin: np.ndarray  # (3,)
    spacing: np.ndarray  # (3,) x, y, z
    direction: np.ndarray  # (3, 3), column c = direction of index axis c
    shape: tuple[int, int, int]  # (nz, ny, nx)

    def index_to_lps(self, kij: np.ndarray) -> np.ndarray:
        """(..., 3) array of (k, i, j) numpy indices → LPS mm."""
        kij = np.asarray(kij, dtype=np.float64)
        xyz = kij[..., ::-1] * self.spacing
        return self.origin + xyz @ self.direction.T

    def lps_to_index(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) LPS mm → fractional (k, i, j) numpy indices."""
        points = np.asarray(points, dtype=np.float64)
        xyz = (points - self.origin) @ np.linalg.inv(self.direction).T / self.spacing
        return xyz[..., ::-1]

    def sample_nearest(self, volume: np.ndarray, points: np.ndarray, fill: bool | float = False) -> np.ndarray:
        """Nearest-neighbour lookup of ``volume`` (on this grid) at LPS ``points``; ``fill`` outside."""
        idx = np.rint(self.lps_to_index(points)).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.array(self.shape)), axis=-1)
        out = np.full(idx.shape[:-1], fill, dtype=volume.dtype)
        k, i, j = (idx[..., a][inside] for a in range(3))
        out[inside] = volume[k, i, j]
        return out

    def contains(self, points: np.ndarray, margin: float = 0.5) -> np.ndarray:
        """True where LPS ``points`` fall within the grid (``margin`` voxels beyond the centres)."""
        idx = self.lps_to_index(points)
        return np.all((idx >= -margin) & (idx <= np.array(self.shape) - 1 + margin), axis=-1)

    def same_as(self, other: Grid, tol: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.origin, other.origin, atol=tol * 10)
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )


def _parse_floats(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.replace(",", " ").split()], dtype=np.float64)


def read_mha(path: Path) -> tuple[np.ndarray, Grid]:
    """Read a 3-D MetaImage (.mha with LOCAL data, or .mhd + raw). Returns (array[z, y, x], grid)."""
    blob = Path(path).read_bytes()
    header: dict[str, str] = {}
    pos = 0
    while True:
        end = blob.index(b"\n", pos)
        line = blob[pos:end].decode("ascii", "replace").strip()
        pos = end + 1
        if not line:
            continue
        key, _, value = line.partition("=")
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    ndims = int(header["NDims"])
    if ndims != 3:
        raise ValueError(f"{path}: NDims {ndims}, expected 3")
    if int(header.get("ElementNumberOfChannels", "1")) != 1:
        raise ValueError(f"{path}: multi-channel MetaImage not supported")
    dims = [int(v) for v in header["DimSize"].split()]
    dtype = np.dtype(_MET_TYPES[header["ElementType"]])
    if header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB", "False")).lower() == "true":
        dtype = dtype.newbyteorder(">")
    spacing = _parse_floats(header.get("ElementSpacing", header.get("ElementSize", "1 1 1")))
    origin = _parse_floats(header.get("Offset", header.get("Origin", header.get("Position", "0 0 0"))))
    matrix = header.get("TransformMatrix", header.get("Rotation", header.get("Orientation", "1 0 0 0 1 0 0 0 1")))
    # MetaIO writes the direction of index axis c as the c-th group of three numbers.
    direction = _parse_floats(matrix).reshape(3, 3).T
    source = header["ElementDataFile"]
    data = blob[pos:] if source == "LOCAL" else (Path(path).parent / source).read_bytes()
    if header.get("CompressedData", "False").lower() == "true":
        data = zlib.decompress(data)
    count = dims[0] * dims[1] * dims[2]
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(dims[2], dims[1], dims[0])
    return array.copy(), Grid(origin, spacing, direction, (dims[2], dims[1], dims[0]))


def read_nrrd(path: Path) -> tuple[np.ndarray, Grid]:
    """Read a 3-D NRRD (raw or gzip, attached data) as plastimatch writes it."""
    import gzip

    blob = Path(path).read_bytes()
    sep = blob.index(b"\n\n")
    fields: dict[str, str] = {}
    for line in blob[:sep].decode("ascii", "replace").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    dims = [int(v) for v in fields["sizes"].split()]
    if len(dims) != 3:
        raise ValueError(f"{path}: sizes {dims}, expected 3-D")
    dtype = np.dtype(_NRRD_TYPES[fields["type"].lower()])
    if fields.get("endian", "little") == "big":
        dtype = dtype.newbyteorder(">")
    vectors = re.findall(r"\(([^)]*)\)", fields["space directions"])
    axes = np.array([_parse_floats(v) for v in vectors])  # row a = step of index axis a
    spacing = np.linalg.norm(axes, axis=1)
    direction = (axes / spacing[:, None]).T
    origin = _parse_floats(fields.get("space origin", "(0,0,0)").strip("()"))
    space = fields.get("space", "left-posterior-superior").lower()
    if space in ("right-anterior-superior", "ras"):  # to LPS
        flip = np.diag([-1.0, -1.0, 1.0])
        origin, direction = flip @ origin, flip @ direction
    data = blob[sep + 2:]
    if fields.get("encoding", "raw") in ("gzip", "gz"):
        data = gzip.decompress(data)
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(dims))).reshape(dims[2], dims[1], dims[0])
    return array.copy(), Grid(origin, spacing, direction, (dims[2], dims[1], dims[0]))


def read_image(path: Path) -> tuple[np.ndarray, Grid]:
    suffix = Path(path).suffix.lower()
    if suffix in (".mha", ".mhd"):
        return read_mha(path)
    if suffix in (".nrrd", ".nhdr"):
        return read_nrrd(path)
    raise ValueError(f"{path}: not an MHA/NRRD file")


class RoiMasks(dict[str, np.ndarray]):
    """ROI name → boolean mask (numpy [k, i, j]); ``grids`` gives each mask's grid.

    ``grid`` is the grid common to all masks (plastimatch writes every ROI on the same
    grid). ``log`` is plastimatch's stdout+stderr; ``warnings`` the lines of it that look
    like complaints about the input.
    """

    grid: Grid
    grids: dict[str, Grid]
    log: str
    warnings: list[str]
    command: list[str]


_WARNING_RE = re.compile(r"warn|error|cannot|can't|could not|fail|invalid|unequal|skipp|not found|mismatch",
                         re.IGNORECASE)


def _plastimatch_name(name: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in name.strip())


def rtstruct_to_masks(
    rtstruct: Path,
    ct_dir: Path,
    out_dir: Path,
    *,
    prefix_format: str = "mha",
    timeout: float = PLASTIMATCH_TIMEOUT_S,
) -> RoiMasks:
    """Rasterize ``rtstruct`` on the grid plastimatch derives from ``ct_dir``; read the masks back.

    ``ct_dir`` should hold only the referenced CT series (plastimatch loads the whole folder).
    Raises RuntimeError (with plastimatch's output) when it fails or writes no masks.
    """
    exe = plastimatch_path()
    if exe is None:
        raise RuntimeError(plastimatch_missing_reason())
    out_dir = Path(out_dir)
    prefix = out_dir / "masks"
    if prefix.exists():
        shutil.rmtree(prefix)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [str(exe), "convert", "--input", str(rtstruct), "--referenced-ct", str(ct_dir),
               "--output-prefix", str(prefix), "--prefix-format", prefix_format]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=out_dir)
    log = proc.stdout + proc.stderr
    (out_dir / "plastimatch.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"plastimatch exited {proc.returncode}: {' '.join(command)}\n{log[-4000:]}")
    files = sorted(p for p in prefix.glob(f"*.{prefix_format}")) if prefix.is_dir() else []
    if not files:
        raise RuntimeError(f"plastimatch wrote no .{prefix_format} masks: {' '.join(command)}\n{log[-4000:]}")

    rt = dcmread(rtstruct, stop_before_pixels=True)
    roi_names = [str(item.ROIName) for item in rt.get("StructureSetROISequence", [])]
    by_file_stem: dict[str, str] = {}
    for name in roi_names:
        by_file_stem.setdefault(name.strip(), name)
        by_file_stem.setdefault(_plastimatch_name(name), name)

    masks = RoiMasks()
    masks.grids, masks.log, masks.command = {}, log, command
    masks.warnings = [line.strip() for line in log.splitlines() if _WARNING_RE.search(line)]
    for path in files:
        array, grid = read_image(path)
        name = by_file_stem.get(path.stem, path.stem)
        masks[name] = array != 0
        masks.grids[name] = grid
    masks.grid = next(iter(masks.grids.values()))
    return masks
