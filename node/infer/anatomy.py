"""Rule-based BODY (the External contour) and left/right lungs on CT, in voxel space.

What a planning system does to make an External, and the lungs, with thresholds and morphology:

1. **Coarse grid.** Block means bring each axis to about ``COARSE_MM`` (a 512×512 slice at 0.98 mm
   becomes 256×256), coarser for large volumes so that the grid holds at most
   ``COARSE_MAX_VOXELS`` (300 slices of 3 mm at 0.98 mm pixels: 300×171×171); every rule below runs
   there. The grid is transposed so that the voxel axis closest to the patient's head–feet axis
   comes first: "in-plane" then means the (near-)axial plane whatever the acquisition (axial,
   gantry-tilted, sagittal, coronal), and 2-D rules run on all planes in one 3-D call with an
   in-plane structuring element.
2. **BODY.** Tissue is ``HU > BODY_HU``. An in-plane opening (a ``COUCH_OPEN_MM`` square) cuts the
   couch, its shells and immobilisation boards and the bridges that join them to the patient. Of
   the 3-D components left, the largest is the patient; others are kept when body-like (at least
   ``EXTRA_MIN_FRACTION`` of the largest, ``EXTRA_MIN_AREA_CM2`` of cross-section per plane and
   not flat): arms at the sides and separate legs are part of the External, couch rails and boards
   are not. What the opening shaved off comes back when it touches the kept body and is either a
   detail (within ``DETAIL_MAX_MM`` in-plane: nose tip, ears, fingers) or a shell around it,
   touching it or not (a skull phantom's wall, a thin-walled phantom round free-standing inserts;
   with it the pieces it encloses, and its dome above them plane after plane); a long one-sided
   piece (a couch touching the back, a head cradle) stays out. Holes are filled plane by plane
   (lungs, bowel gas, trachea, sinuses; not a mouth open to the outside), and so is air that
   reaches the outside only through gaps narrower than ``GAP_MAX_MM`` while wider inside (an
   air-filled skull whose thin bone partial volume brings below ``BODY_HU``, a sinus behind a thin
   wall); where the patient meets the image's edge, the edge is a wall. Slits (between an arm and
   the trunk) are narrow everywhere and stay out.
3. **Lungs.** Air (``HU < LUNG_HU``) inside the filled BODY. Small pure-air blobs near the midline in
   a plane (trachea, main bronchi, oesophageal air) are removed, then 3-D components are lungs when
   big (``LUNG_MIN_ML``) and of lung density: fewer than ``LUNG_MAX_PURE_FRACTION`` of their voxels
   are pure air (below ``PURE_AIR_HU``, raised when the air around the patient reads high); bowel
   gas is nearly all pure air, sinus air is small. From the lung components, wide pure-air regions
   with their rim (gas behind a thin diaphragm, the airway lumen) are carved off and small leftover
   pieces dropped. Each lung component is patient-left or patient-right by the side of the body's
   midline it lies on (LPS +x is patient left); a component on both sides (lungs touching at the
   anterior junction) is eroded in-plane until it falls apart, the parts are grown back and the
   rest goes by the midline (a component that never falls apart is one lung across the midline).
   A lung's centre lies at least ``LUNG_MIN_OFFSET_MM`` to its side (the nasal cavity does not).
   Lungs are filled plane by plane, each side alone (vessels and bronchi inside are lung; the
   mediastinum between the lungs is not).
4. **Full resolution.** Coarse labels are repeated onto the source grid; on a one-coarse-voxel band
   around each boundary the source voxel decides by its own threshold, so edges are not staircased.
   Blocks that the source voxels enclose (a shell that closes only at full resolution, air pockets
   at the edge) are filled, judged per block at coarse resolution.

Everything is in voxel space; patient geometry only decides which axis is head–feet and where
patient left is. Nothing here raises for a volume without a patient or without lungs. Known
limits: a couch plate in direct contact with the skin keeps a fillet about the opening's size at
the contact; single voxels of air within a coarse voxel of the skin can stay as holes; bowel gas
merged with a lung through a thin diaphragm takes the lung with it when the gas dominates the
merged component; lungs with more than half their voxels below ``PURE_AIR_HU`` (severe emphysema)
are taken for gas.

The steps live in their own modules: the label values, the coarse grid and in-plane morphology in
``node.infer.anatomy_grid``, BODY in ``node.infer.body``, the lungs in ``node.infer.lungs``, the way
back to full resolution in ``node.infer.anatomy_refine``; this module runs them. The tunables are
constants of the module of their step and are importable from here too.
"""

from __future__ import annotations

import numpy as np

from node.errors import InferenceError
from node.infer.anatomy_grid import (
    BACKGROUND,
    BODY,
    COARSE_MAX_VOXELS,
    COARSE_MM,
    LEFT_LUNG,
    MAX_FACTOR,
    RIGHT_LUNG,
    CoarseFrame,
    coarse_frame,
    downsample,
)
from node.infer.anatomy_refine import coarse_bands, to_full
from node.infer.body import (
    BODY_HU,
    COUCH_OPEN_MM,
    DETAIL_MAX_MM,
    EXTRA_MAX_ELONGATION,
    EXTRA_MIN_AREA_CM2,
    EXTRA_MIN_FRACTION,
    GAP_MAX_MM,
    HOLE_MIN_THICK_RIM,
    SHELL_MIN_COVERAGE,
    SHELL_MIN_PLANES,
    body_coarse,
)
from node.infer.lungs import (
    AIRWAY_MAX_AREA_CM2,
    AIRWAY_MEAN_HU,
    AIRWAY_MIDLINE_MM,
    LUNG_HU,
    LUNG_MAX_PURE_FRACTION,
    LUNG_MIN_ML,
    LUNG_MIN_OFFSET_MM,
    LUNG_MIN_PIECE,
    PURE_AIR_HU,
    PURE_AIR_MAX_HU,
    SPLIT_MAX_EROSION,
    lungs_coarse,
)
from node.model.volume import Geometry

__all__ = [
    "AIRWAY_MAX_AREA_CM2",
    "AIRWAY_MEAN_HU",
    "AIRWAY_MIDLINE_MM",
    "BACKGROUND",
    "BODY",
    "BODY_HU",
    "COARSE_MAX_VOXELS",
    "COARSE_MM",
    "COUCH_OPEN_MM",
    "DETAIL_MAX_MM",
    "EXTRA_MAX_ELONGATION",
    "EXTRA_MIN_AREA_CM2",
    "EXTRA_MIN_FRACTION",
    "GAP_MAX_MM",
    "HOLE_MIN_THICK_RIM",
    "LEFT_LUNG",
    "LUNG_HU",
    "LUNG_MAX_PURE_FRACTION",
    "LUNG_MIN_ML",
    "LUNG_MIN_OFFSET_MM",
    "LUNG_MIN_PIECE",
    "MAX_FACTOR",
    "PURE_AIR_HU",
    "PURE_AIR_MAX_HU",
    "RIGHT_LUNG",
    "SHELL_MIN_COVERAGE",
    "SHELL_MIN_PLANES",
    "SPLIT_MAX_EROSION",
    "body_mask",
    "lung_masks",
    "segment_body_lungs",
]


def _check(voxels: np.ndarray, geometry: Geometry) -> None:
    if voxels.ndim != 3:
        raise InferenceError(f"BODY/lungs need a (slices, rows, columns) volume; got shape {voxels.shape}")
    if tuple(voxels.shape) != tuple(geometry.shape):
        raise InferenceError(f"the voxels have shape {voxels.shape} but the geometry describes {geometry.shape}")


def _coarse_result(voxels: np.ndarray, geometry: Geometry, lungs: bool) -> tuple[np.ndarray, np.ndarray, CoarseFrame]:
    """Coarse labels and refinement bands (see ``to_full``) on the source axes, and the frame."""
    frame = coarse_frame(geometry, tuple(voxels.shape))
    hu = downsample(voxels, frame.factors)
    hu = np.ascontiguousarray(hu.transpose(frame.order))
    body = body_coarse(hu, frame)
    labels = body.astype(np.uint8)
    left = right = np.zeros(body.shape, dtype=bool)
    if lungs:
        left, right = lungs_coarse(hu, body, frame)
        labels[left] = LEFT_LUNG
        labels[right] = RIGHT_LUNG
    del hu
    if frame.factors == (1, 1, 1):
        bands = np.zeros(body.shape, dtype=np.uint8)
    else:
        # The band spans the axes that were reduced.
        size = tuple(3 if frame.factors[a] > 1 else 1 for a in frame.order)
        bands = coarse_bands(body, left, right, size)  # type: ignore[arg-type]
    inverse = tuple(int(a) for a in np.argsort(frame.order))
    return (np.ascontiguousarray(labels.transpose(inverse)), np.ascontiguousarray(bands.transpose(inverse)), frame)


def segment_body_lungs(voxels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(slices, rows, cols) float32 HU on ``geometry`` → uint8 labels: 0 background, 1 BODY,
    2 left lung, 3 right lung (patient left/right: LPS +x is patient LEFT).

    Lungs lie inside BODY and carry their own values; BODY's mask is ``labels > 0``. A volume
    without a patient gives all zeros, one without lungs gives no 2 or 3; nothing raises for either.
    Voxels that do not match the geometry's shape raise :class:`InferenceError`. About 1–2 s and
    300 MB beyond the input for 300×512×512 on two cores (``benchmarks/anatomy_bench.py``).
    """
    _check(voxels, geometry)
    labels, bands, frame = _coarse_result(voxels, geometry, lungs=True)
    return to_full(labels, bands, voxels, frame)


def body_mask(voxels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The External (BODY) as a boolean mask shaped like ``voxels`` (lungs skipped: faster)."""
    _check(voxels, geometry)
    labels, bands, frame = _coarse_result(voxels, geometry, lungs=False)
    return to_full(labels, bands, voxels, frame) > 0


def lung_masks(voxels: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(left lung, right lung) boolean masks shaped like ``voxels`` (patient left: LPS +x)."""
    labels = segment_body_lungs(voxels, geometry)
    return labels == LEFT_LUNG, labels == RIGHT_LUNG
