"""PNG montages for people: axial, coronal and sagittal slices with the contours drawn and a legend.

For PACS that show neither SEG nor RTSTRUCT, the same picture can go out as a DICOM Secondary
Capture in the source study (``build_preview_sc``).
"""

from __future__ import annotations

from io import BytesIO

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from scipy import ndimage

from node.model.bundle import Label
from node.model.enums import ObjectKind
from node.model.volume import Volume
from node.write.provenance import MANUFACTURER, Provenance
from node.write.result import label_mask
from node.write.series import result_series

#: CT display window (level, width) in HU: a soft-tissue window.
WINDOW = (40.0, 400.0)
PANEL_PX = 384


def _window(image: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2
    return (np.clip((image - lo) / width, 0.0, 1.0) * 255).astype(np.uint8)


def _panel(image: np.ndarray, labels: np.ndarray, found: list[Label], pixel_mm: tuple[float, float]) -> Image.Image:
    """One slice, windowed, resized to square pixels, with each structure's outline in its colour."""
    grey = _window(image, *WINDOW)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for label in found:
        mask = label_mask(labels, label)
        if mask.any():
            edge = mask & ~ndimage.binary_erosion(mask)
            edge = ndimage.binary_dilation(edge)  # two pixels wide: visible after downscaling
            rgb[edge] = label.color_rgb
    h_mm, w_mm = image.shape[0] * pixel_mm[0], image.shape[1] * pixel_mm[1]
    scale = PANEL_PX / max(h_mm, w_mm)
    size = (max(1, round(w_mm * scale)), max(1, round(h_mm * scale)))
    panel = Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST)
    framed = Image.new("RGB", (PANEL_PX, PANEL_PX))
    framed.paste(panel, ((PANEL_PX - size[0]) // 2, (PANEL_PX - size[1]) // 2))
    return framed


def render_montage(volume: Volume, labels: np.ndarray, found: list[Label], title: str) -> Image.Image:
    """Three orthogonal panels through the centre of the segmented structures, and a legend.

    Planes are taken along the volume's own axes (for an axial CT: axial, coronal, sagittal), the
    slice through the centroid of everything segmented, scaled to the real pixel spacing.
    """
    seg = labels > 0
    centre = [int(round(c)) for c in ndimage.center_of_mass(seg)] if seg.any() else [s // 2 for s in labels.shape]
    k, i, j = centre
    dz, dy, dx = volume.geometry.spacing
    vox = volume.voxels
    panels = [
        _panel(vox[k], labels[k], found, (dy, dx)),
        _panel(vox[::-1, i, :], labels[::-1, i, :], found, (dz, dx)),
        _panel(vox[::-1, :, j], labels[::-1, :, j], found, (dz, dy)),
    ]
    legend_h = 28 + 22 * len(found)
    canvas = Image.new("RGB", (3 * PANEL_PX, PANEL_PX + legend_h), (0, 0, 0))
    for n, panel in enumerate(panels):
        canvas.paste(panel, (n * PANEL_PX, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((8, PANEL_PX + 6), title, fill=(255, 255, 255), font=font)
    for n, label in enumerate(found):
        y = PANEL_PX + 28 + 22 * n
        draw.rectangle((8, y, 24, y + 14), fill=label.color_rgb)
        voxels = int(label_mask(labels, label).sum())
        ml = voxels * dz * dy * dx / 1000.0
        draw.text((32, y), f"{label.name} ({label.rt_roi_type}) {ml:,.0f} mL", fill=(255, 255, 255), font=font)
    return canvas


def montage_png(volume: Volume, labels: np.ndarray, found: list[Label], title: str) -> bytes:
    buffer = BytesIO()
    render_montage(volume, labels, found, title).save(buffer, format="PNG")
    return buffer.getvalue()


def build_preview_sc(
    volume: Volume, montage: Image.Image, *, series_uid: str, instance_uid: str, provenance: Provenance,
    bundle_name: str,
) -> Dataset:
    """The montage as a Secondary Capture Image in the source study, for viewers without SEG/RTSTRUCT."""
    source = volume.headers[0]
    series = result_series(source, bundle_name, ObjectKind.SC)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.asarray(montage.convert("RGB")),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        # The axial panel's directions (the montage mixes planes; each panel is labelled by position).
        patient_orientation=("L", "P"),
        series_instance_uid=series_uid,
        sop_instance_uid=instance_uid,
        series_number=series.number,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=series.description,
    )
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = source.get("Laterality", "")  # Type 2C in General Series: present, maybe empty
    sc.ContentDate = provenance.date  # type: ignore[assignment]
    sc.ContentTime = provenance.time  # type: ignore[assignment]
    return sc
