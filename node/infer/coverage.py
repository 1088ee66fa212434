"""Whether a series is one a bundle's model can be trusted on; if not, :class:`Declined` with the reason.

Checked before any inference (from the geometry alone) so a declined series costs nothing; the
anatomical check (body width) is made by the crop, which is where the body is first measured.
"""

from __future__ import annotations

from node.errors import Declined
from node.infer.orient import normal_angle_to
from node.model.bundle import Bundle
from node.model.enums import ModelKind
from node.model.volume import Geometry, UnevenSlices


def check_coverage(bundle: Bundle, geometry: Geometry) -> None:
    """Raise :class:`Declined` naming the value when ``geometry`` is outside ``bundle``'s coverage.

    On an unevenly spaced stack the widest gap is what the slice spacing limit judges, and a network
    bundle whose manifest does not resample such stacks declines it, naming the gaps."""
    cov = bundle.coverage
    slices, spacing = geometry.shape[0], geometry.spacing[0]
    extent = slices * spacing
    uneven = "" if geometry.is_uniform else geometry.gap_summary()
    if uneven and bundle.model_kind is ModelKind.ONNX and \
            bundle.preprocess.uneven_slices is UnevenSlices.DECLINE:  # parts: each part's own manifest says
        raise Declined(
            f"{bundle.name} needs evenly spaced slices (its network runs on a regular grid and its manifest does "
            f"not resample uneven stacks); this series has {uneven}"
        )
    if extent < cov.min_extent_mm:
        raise Declined(
            f"{bundle.name} needs at least {cov.min_extent_mm:g} mm along the slices; this series covers "
            f"{extent:.0f} mm ({slices} slices × {spacing:.2f} mm), a slab that cannot hold the whole organ"
        )
    widest = float(geometry.gaps().max()) if uneven else spacing
    if cov.max_slice_spacing_mm and widest > cov.max_slice_spacing_mm + 1e-3:
        raise Declined(
            f"{bundle.name} needs slices at most {cov.max_slice_spacing_mm:g} mm apart; "
            + (f"this series has gaps of up to {widest:.2f} mm ({uneven})" if uneven else
               f"this series has {spacing:.2f} mm")
        )
    angle = normal_angle_to(geometry, "S")
    if angle > cov.max_obliquity_deg:
        raise Declined(
            f"{bundle.name} needs axial slices (normal within {cov.max_obliquity_deg:g}° of the patient's "
            f"head-foot axis); this series' normal is {angle:.0f}° from it"
        )


def check_body_width(bundle: Bundle, width_mm: float) -> None:
    if width_mm < bundle.coverage.min_body_width_mm:
        raise Declined(
            f"{bundle.name} needs the trunk in the field: the body is at most {width_mm:.0f} mm wide here "
            f"(a head or a limb), less than {bundle.coverage.min_body_width_mm:g} mm"
        )
