"""The abdomen crop for upper-abdominal organ models (the liver): a box around the body from above the liver
dome down to the top of the pelvis, at most the size the model was trained on.

Works on a volume already in "SAR" orientation (axis 0 inferior→superior, 1 posterior→anterior, 2
left→right; see :mod:`node.infer.orient`) and on ~3 mm block means of it, so it takes about a second on a
512×512×300 CT. It follows the crop the liver network was trained with (pyliverlesionseg's
``crop_ct_image``: from the hip − 20 mm up to the liver dome + 70 mm, around the body), with the node's
own landmarks:

1. **BODY and lungs** by the node's rules (:mod:`node.infer.body`, :mod:`node.infer.lungs`): the same
   External the body-lungs bundle contours, and lungs told from bowel gas by their density. The body
   width that the bundle's coverage judges is BODY's widest extent left to right, as BODY gives it.
2. **Top**: the lung base (the lowest slice where the lungs' area is still ``LUNG_BASE_FRACTION`` of its
   maximum) + ``dome_margin_mm``; without lungs in the field (an abdomen series) the top of the series,
   since the liver is the uppermost abdominal organ. The box never reaches above it.
3. **Bottom**: the top of the pelvis − ``pelvis_margin_mm``. Going down from the top, the bone area per
   slice (``BONE_HU``, smoothed over ``BONE_SMOOTH_MM``) falls from the ribs to the lumbar spine and rises
   again at the iliac crests: the pelvis starts where it reaches ``PELVIS_RISE`` times its lowest value
   above (and ``PELVIS_MIN_RISE_CM2`` more), at least ``PELVIS_MIN_DEPTH_MM`` below the top, and stays
   there for ``PELVIS_SUSTAIN_MM`` (or to the end of the series). Without a pelvis in the field the box
   reaches the model's maximum height below the top. The pelvis is left out because the network, trained
   on crops that end there, over-segments without that bound: on TotalSegmentator's 336 mm abdomen CT
   the liver came out 1.25× the reference volume, spilling into the right kidney, the hepatic flexure
   and the small bowel, with the pelvis in the block; 1.04× without it.
4. **In-plane**: the box of BODY's largest component over those slices, less two voxels a side (the
   package's 5×5×5 erosion), trimmed about its centre to the maximum size.

Every step degrades to "keep the whole extent" when its landmark is absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.errors import Declined
from node.infer.anatomy_grid import CONN6, CoarseFrame, downsample
from node.infer.body import body_coarse
from node.infer.lungs import lungs_coarse
from node.infer.transforms import largest_component

#: Voxel size of the grid the landmarks are found on, mm.
GRID_MM = 3.0
#: The lung base: the lowest slice where the lungs' area is at least this fraction of its maximum.
LUNG_BASE_FRACTION = 0.10
#: Bone, HU (on ~3 mm block means: cortical and cancellous bone, not enhanced kidney or vessels).
BONE_HU = 300.0
#: The bone area profile is smoothed over this many mm along the slices.
BONE_SMOOTH_MM = 21.0
#: The pelvis: the bone area rises to this multiple of its lowest value above it ...
PELVIS_RISE = 2.0
#: ... and by at least this much, cm² ...
PELVIS_MIN_RISE_CM2 = 5.0
#: ... at least this far below the top of the box (the lower ribs are not a pelvis), mm ...
PELVIS_MIN_DEPTH_MM = 100.0
#: ... and stays there over this length below (or to the end of the series), mm.
PELVIS_SUSTAIN_MM = 30.0
#: Voxels (native) trimmed off each in-plane side of the body's box: the package's 5×5×5 erosion.
INPLANE_TRIM = 2


@dataclass(frozen=True)
class AbdomenBox:
    box: tuple[slice, slice, slice]  # in the full-resolution, reoriented array
    body_width_mm: float  # widest extent of BODY along axis 2 (left-right for "SAR")
    lung_base_index: int | None  # axis-0 index of the lung base, None when no lungs were found
    pelvis_index: int | None = None  # axis-0 index of the top of the pelvis, None when none was found


def _span(mask_1d: np.ndarray) -> tuple[int, int]:
    hits = np.flatnonzero(mask_1d)
    return int(hits[0]), int(hits[-1]) + 1


def _trim(lo: int, hi: int, max_len: int) -> tuple[int, int]:
    """Shrink [lo, hi) about its centre to at most ``max_len``."""
    excess = (hi - lo) - max_len
    if excess <= 0:
        return lo, hi
    lo += excess // 2
    return lo, lo + max_len


def body_width_mm(body: np.ndarray, spacing: float) -> float:
    """The widest extent of ``body`` (slices, rows, columns) along its columns, mm (whole voxels)."""
    cols = np.asarray(body.any(axis=1))
    widths = [(_span(c)[1] - _span(c)[0]) * spacing for c in cols if c.any()]
    return float(max(widths)) if widths else 0.0


def _lung_base(lungs: np.ndarray) -> int | None:
    """Coarse axis-0 index of the lung base, or None without lungs."""
    area = lungs.sum(axis=(1, 2))
    if not area.any():
        return None
    return int(np.flatnonzero(area >= LUNG_BASE_FRACTION * area.max())[0])


def pelvis_top(bone_cm2: np.ndarray, top: int, step_mm: float) -> int | None:
    """Axis-0 index (of ``bone_cm2``'s grid) where the pelvis starts below ``top``, or None.

    ``bone_cm2`` is the bone area per slice, inferior→superior, one slice every ``step_mm``."""
    size = max(1, int(round(BONE_SMOOTH_MM / step_mm)))
    smooth = ndimage.uniform_filter1d(bone_cm2.astype(np.float64), size=size, mode="nearest")
    sustain = max(1, int(round(PELVIS_SUSTAIN_MM / step_mm)))
    lowest = np.inf
    for z in range(min(top, smooth.size) - 1, -1, -1):
        lowest = min(lowest, float(smooth[z]))
        level = max(PELVIS_RISE * lowest, lowest + PELVIS_MIN_RISE_CM2)
        if (top - z) * step_mm < PELVIS_MIN_DEPTH_MM or smooth[z] < level:
            continue
        if np.all(smooth[max(0, z - sustain):z + 1] >= level):
            return z
    return None


def _coarse_anatomy(hu: np.ndarray, spacing: tuple[float, float, float]) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int], tuple[float, float, float]]:
    """Block means of ``hu`` at ~GRID_MM, BODY and lungs on them, the block sizes and their spacing."""
    stride = tuple(max(1, int(GRID_MM / s)) for s in spacing)
    coarse = downsample(hu, stride)  # type: ignore[arg-type]
    cs = tuple(s * f for s, f in zip(spacing, stride, strict=True))
    # "SAR": axis 2 runs to the patient's right, i.e. towards −x (LPS); only offsets from the midline matter.
    frame = CoarseFrame(factors=stride, order=(0, 1, 2), spacing=cs, x0=0.0,  # type: ignore[arg-type]
                        dx=(0.0, 0.0, -cs[2]))
    body = body_coarse(coarse, frame)
    left, right = lungs_coarse(coarse, body, frame)
    return coarse, body, left | right, stride, cs  # type: ignore[return-value]


def abdomen_box(hu: np.ndarray, spacing: tuple[float, float, float], max_mm: tuple[float, float, float],
                dome_margin_mm: float = 70.0, pelvis_margin_mm: float = 20.0) -> AbdomenBox:
    """Find the crop box of ``hu`` ("SAR": axis 0 inferior→superior) for an upper-abdomen model.

    Raises :class:`Declined` when no body is found."""
    coarse, body, lungs, stride, cs = _coarse_anatomy(hu, spacing)
    if not body.any():
        raise Declined(f"no body found: nothing above the BODY threshold forms a patient in this {hu.shape} volume")
    width = body_width_mm(body, cs[2])

    n0 = hu.shape[0]
    height = max(1, int(round(max_mm[0] / spacing[0])))
    base = _lung_base(lungs)
    lung_base = None if base is None else base * stride[0]
    top = n0 if lung_base is None else min(n0, lung_base + int(round(dome_margin_mm / spacing[0])))
    bone = ((coarse > BONE_HU) & body).sum(axis=(1, 2)) * (cs[1] * cs[2] / 100.0)
    pelvis_c = pelvis_top(bone, -(-top // stride[0]), cs[0])
    pelvis = None if pelvis_c is None else pelvis_c * stride[0]
    lo0 = max(0, top - height)
    if pelvis is not None:
        lo0 = max(lo0, pelvis - int(round(pelvis_margin_mm / spacing[0])))
    hi0 = top
    del coarse

    in_range = body[lo0 // stride[0]:max(lo0 // stride[0] + 1, -(-hi0 // stride[0]))]
    in_range = largest_component(in_range, CONN6) if in_range.any() else body
    boxes = []
    for axis, drop in ((1, (0, 2)), (2, (0, 1))):
        lo, hi = _span(np.asarray(in_range.any(axis=drop)))
        lo, hi = lo * stride[axis], min(hu.shape[axis], hi * stride[axis])
        if hi - lo > 2 * INPLANE_TRIM + 1:
            lo, hi = lo + INPLANE_TRIM, hi - INPLANE_TRIM
        boxes.append(_trim(lo, hi, int(round(max_mm[axis] / spacing[axis]))))
    (lo1, hi1), (lo2, hi2) = boxes
    return AbdomenBox(
        box=(slice(lo0, hi0), slice(lo1, hi1), slice(lo2, hi2)),
        body_width_mm=width,
        lung_base_index=lung_base,
        pelvis_index=pelvis,
    )
