"""DICOM-SEG (BINARY) with highdicom: one object per job holding every structure found.

Empty frames are kept (``omit_empty_frames=False``): each source slice has its frame in every
segment, so viewers that index frames by source slice (OHIF has shifted overlays when frames were
omitted) place the overlay on the right slice. The cost is size, which bit-packing keeps small
(a 512×512 frame is 32 KiB).
"""

from __future__ import annotations

from collections.abc import Iterable

import highdicom as hd
import numpy as np
from pydicom import Dataset

from node.errors import WriteError
from node.infer.bundle import Code
from node.write.provenance import MANUFACTURER
from node.write.result import Result

SEG_SERIES_NUMBER = 9901


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _mark_explicit_little_endian(sequence: Iterable[Dataset]) -> None:
    """Tell pydicom the per-frame items are already in the output encoding.

    Otherwise it re-checks every element of every item for ambiguous VRs while writing (a third of
    the SEG's write time for 1,200 frames); highdicom gives every element an explicit VR.
    """
    for item in sequence:
        item.set_original_encoding(False, True, item._character_set)
        for element in item:
            if element.VR == "SQ":
                _mark_explicit_little_endian(element.value)


def build_seg(result: Result, *, seg_type: str = "BINARY") -> Dataset:
    """Build the SEG for ``result`` (labels in the same shape and slice order as its volume)."""
    volume, labels, bundle, found = result.volume, result.labels, result.bundle, result.found
    uids, provenance = result.uids, result.provenance
    algorithm = hd.AlgorithmIdentificationSequence(
        name=bundle.algorithm_name, family=_concept(bundle.algorithm_family), version=bundle.version
    )
    descriptions = []
    segment_map = np.zeros(256, dtype=np.uint8)
    for number, label in enumerate(found, start=1):
        segment_map[label.value] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label.name,
                segmented_property_category=_concept(label.category),
                segmented_property_type=_concept(label.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=label.name,
                display_color=hd.color.CIELabColor.from_rgb(*label.color_rgb),
            )
        )
    # Segment numbers are 1..n in manifest order; when the label values already are, skip the remap.
    identity = all(label.value == number for number, label in enumerate(found, start=1)) and \
        int(labels.max()) <= len(found)
    segments = labels if identity else segment_map[labels]
    try:
        seg = hd.seg.Segmentation(
            source_images=volume.headers,
            pixel_array=segments,
            segmentation_type=hd.seg.SegmentationTypeValues(seg_type),
            segment_descriptions=descriptions,
            series_instance_uid=uids.seg_series,
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=uids.seg_instance,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=bundle.name,
            software_versions=f"{provenance.software_version} {bundle.name} {bundle.version}",
            device_serial_number=provenance.device_serial_number,
            content_description=f"{bundle.algorithm_name} segmentation",
            content_label="AUTOSEG",
            series_description=f"AI SEG {bundle.name}",
            omit_empty_frames=False,
            content_date=provenance.created.date(),
            content_time=provenance.created.time(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise WriteError(f"highdicom could not build the SEG: {exc}") from exc
    _mark_explicit_little_endian(seg.PerFrameFunctionalGroupsSequence)
    seg.StationName = provenance.station_name
    if volume.headers[0].get("Laterality"):  # Type 2C: required for paired body parts
        seg.Laterality = volume.headers[0].Laterality
    return seg
