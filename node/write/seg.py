"""DICOM-SEG (BINARY or LABELMAP) with highdicom: one object per job holding every structure found.

A BINARY SEG of more than OMIT_EMPTY_FRAMES_ABOVE segments keeps only its non-empty frames (highdicom's
``omit_empty_frames``, issue 12): a segment has a frame on each slice it lies on. With a hundred organs on a
300-slice CT, keeping every frame would write 35,100 frames (1.1 GiB) for the ~5,000 that hold anything.
Each frame names its source image (DerivationImageSequence) and its plane position, which is how readers
(highdicom, OHIF 3, 3D Slicer, the node's own reader) place it; the position dimension index counts the
planes kept, as highdicom writes it. A SEG of a few segments (and every LABELMAP, one frame per slice)
keeps every frame: each source slice has its frame in every segment, so viewers that index frames by
source slice (older OHIF shifted overlays when frames were omitted) place the overlay on the right slice,
at a cost in size that bit-packing keeps small (a 512×512 frame is 32 KiB).

How it stays fast (issue 5: SEG + RTSTRUCT of a 512×512×300 CT in under 2 s): highdicom builds the
object for the first two slices only — a template holding every module that does not grow with the
series (patient, study, equipment, segment descriptions, shared functional groups). This module then
writes what does grow with it, the way highdicom would for the whole series: the references to every
source image, the per-frame functional groups (pre-encoded bytes, as the RTSTRUCT's contours are) and
the pixel data (bit-packed with numpy over many frames at once). Every build first encodes the
template's own frames, pixels and references with this code and compares them byte for byte with
highdicom's; on any difference (a highdicom upgrade that changes its output, a source series this
code does not know) it logs why and lets highdicom build the whole series instead.
"""

from __future__ import annotations

import logging
import struct
from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.spatial import (
    VOLUME_INDEX_CONVENTION,
    get_normal_vector,
    get_volume_positions,
)
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.valuerep import DS, format_number_as_ds

from node.errors import WriteError
from node.model.bundle import Code
from node.model.enums import ObjectKind, SegType
from node.write.encoding import Encoder, pydicom_bytes, raw_sequence
from node.write.provenance import MANUFACTURER
from node.write.result import Result
from node.write.seg_frames import Frames, plan_frames
from node.write.seg_frames import pixel_data as _pixel_data  # a module name the tests can patch
from node.write.series import result_series

log = logging.getLogger(__name__)


def _not_the_template_warning(record: logging.LogRecord) -> bool:
    """highdicom warns when the template's two slices hold nothing (then it keeps their frames, as this module
    does); that is the common case for a template and says nothing about the SEG written."""
    return not record.getMessage().startswith('Encoding an empty image with "omit_empty_frames"')


logging.getLogger("highdicom.image").addFilter(_not_the_template_warning)

#: A BINARY SEG of more segments than this keeps only its non-empty frames (fewer: every frame; see above).
OMIT_EMPTY_FRAMES_ABOVE = 8
#: Source slices highdicom builds the template from (two, so that it sees a stack, not a single plane).
TEMPLATE_SLICES = 2

_SOURCE_IMAGES = 0x00082112
_REFERENCED_SERIES = 0x00081115
_PER_FRAME = 0x52009230
_PIXEL_DATA = 0x7FE00010


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _descriptions(result: Result) -> tuple[list[hd.seg.SegmentDescription], np.ndarray]:
    """Segment descriptions (numbers 1..n in manifest order) and the labels as segment numbers."""
    bundle, found, labels = result.bundle, result.found, result.labels
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
        if label.type_modifier is not None:  # laterality: Kidney + Left (PS3.3 C.8.20.4, inside the type's item)
            descriptions[-1].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _concept(label.type_modifier)]
    # Segment numbers are 1..n in manifest order; when the label values already are, skip the remap.
    identity = all(label.value == number for number, label in enumerate(found, start=1)) and \
        int(labels.max()) <= len(found)
    return descriptions, (labels if identity else segment_map[labels])


def _members(result: Result) -> dict[int, tuple[int, ...]]:
    """Segment number → the segment numbers (in the remapped label volume) whose voxels belong to it:
    itself, plus those of the labels it includes (BODY includes the lungs, so the segments overlap)."""
    number_of = {label.value: number for number, label in enumerate(result.found, start=1)}
    return {
        number: (number, *(number_of[v] for v in label.includes if v in number_of))
        for number, label in enumerate(result.found, start=1)
    }


def _highdicom_pixels(segments: np.ndarray, members: dict[int, tuple[int, ...]], seg_type: SegType) -> np.ndarray:
    """What highdicom takes: the label volume, or with overlapping BINARY segments one plane per segment."""
    if seg_type is SegType.LABELMAP or all(len(m) == 1 for m in members.values()):
        return segments
    stack = np.empty((*segments.shape, len(members)), dtype=bool)
    for i, number in enumerate(sorted(members)):
        lut = np.zeros(256, dtype=bool)
        lut[list(members[number])] = True
        stack[..., i] = lut[segments]
    return stack


def omits_empty_frames(seg_type: SegType, segments: int) -> bool:
    """Whether a SEG of ``seg_type`` with ``segments`` segments keeps only its non-empty frames."""
    return seg_type is not SegType.LABELMAP and segments > OMIT_EMPTY_FRAMES_ABOVE


def _highdicom_seg(result: Result, source_images: Sequence[Dataset], segments: np.ndarray,
                   descriptions: list[hd.seg.SegmentDescription], seg_type: SegType) -> hd.seg.Segmentation:
    bundle, uids, provenance = result.bundle, result.uids, result.provenance
    series = result_series(result.volume.headers[0], bundle.name, ObjectKind.SEG)
    try:
        return hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=segments,
            segmentation_type=hd.seg.SegmentationTypeValues(seg_type.value),
            segment_descriptions=descriptions,
            series_instance_uid=uids.seg_series,
            series_number=series.number,
            sop_instance_uid=uids.seg_instance,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=bundle.name,
            software_versions=f"{provenance.software_version} {bundle.name} {bundle.version}",
            device_serial_number=provenance.device_serial_number,
            content_description=f"{bundle.algorithm_name} segmentation",
            content_label="AUTOSEG",
            series_description=series.description,
            content_creator_name=_creator(provenance.station_name),
            omit_empty_frames=omits_empty_frames(seg_type, len(descriptions)),
            content_date=provenance.created.date(),
            content_time=provenance.created.time(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise WriteError(f"highdicom could not build the SEG: {exc}") from exc


def _creator(station_name: str) -> str:
    """ContentCreatorName (type 2; DCMTK-based readers warn without it): the node, as a one-component PN."""
    return "".join(" " if ch in "^=\\" else ch for ch in station_name).strip() + "^"


def _finish(seg: Dataset, result: Result) -> Dataset:
    seg.StationName = result.provenance.station_name
    source = result.volume.headers[0]
    if source.get("Laterality"):  # Type 2C: required for paired body parts
        seg.Laterality = source.Laterality
    return seg


def build_seg_highdicom(result: Result, *, seg_type: SegType = SegType.BINARY) -> Dataset:
    """The whole SEG built by highdicom (the reference :func:`build_seg` must equal; ~3 s for 1,200 frames)."""
    seg_type = SegType(seg_type)  # a caller may pass the string
    descriptions, segments = _descriptions(result)
    pixels = _highdicom_pixels(segments, _members(result), seg_type)
    return _finish(_highdicom_seg(result, result.volume.headers, pixels, descriptions, seg_type), result)


# --- what grows with the series, encoded the way highdicom + pydicom would write it ----------------


def _positions(headers: Sequence[Dataset]) -> np.ndarray:
    return np.array([[float(v) for v in h.ImagePositionPatient] for h in headers], dtype=np.float64)


def plane_order(headers: Sequence[Dataset], orientation: Sequence[float]) -> np.ndarray:
    """Source slice of each frame position, as highdicom sorts planes (along its volume normal)."""
    normal = get_normal_vector(orientation, index_convention=VOLUME_INDEX_CONVENTION)
    distances = normal[None] @ _positions(headers).T
    _, order = np.unique(distances.squeeze(0), return_index=True)
    if len(order) != len(headers):
        raise WriteError("two source images share a plane position; the SEG cannot place their frames")
    return order


def _uid(value: object) -> bytes:
    return str(value).encode("ascii")


def _ds_text(values: Sequence[float]) -> bytes:
    """A multi-valued DS as highdicom stores it (auto-formatted) and pydicom writes it."""
    formatted = [DS(v, auto_format=True) for v in values]
    return "\\".join(getattr(x, "original_string", str(x)) for x in formatted).encode("ascii")


class _FrameEncoder:
    """Items of PerFrameFunctionalGroupsSequence, with the constant parts taken from highdicom's template.

    Per frame: DerivationImageSequence (its source slice; the purpose and derivation codes as in the
    template), FrameContentSequence (dimension index values: segment then position for BINARY,
    position only for LABELMAP), PlanePositionSequence and, for BINARY with more than one segment,
    SegmentIdentificationSequence.
    """

    def __init__(self, template: Dataset) -> None:
        first = template.PerFrameFunctionalGroupsSequence[0]
        derivation = first.DerivationImageSequence[0]
        source = derivation.SourceImageSequence[0]
        self.enc = Encoder(implicit=False, defined_length=True)
        self.preserved = pydicom_bytes(source[0x0028135A])
        self.purpose = pydicom_bytes(source[0x0040A170])
        self.derivation_code = pydicom_bytes(derivation[0x00089215])
        # highdicom moves the segment identification of a single segment to the shared groups
        self.identify_segment = 0x0062000A in first

    def items(self, headers: Sequence[Dataset], frames: Frames, segment_numbers: list[int] | None) -> list[bytes]:
        enc = self.enc
        derived: dict[int, bytes] = {}
        placed: dict[int, bytes] = {}
        for k in frames.kept_slices.tolist():
            h = headers[k]
            derived[k] = enc.sequence(0x00089124, [
                enc.sequence(_SOURCE_IMAGES, [
                    enc.element(0x00081150, b"UI", _uid(h.SOPClassUID))
                    + enc.element(0x00081155, b"UI", _uid(h.SOPInstanceUID))
                    + self.preserved + self.purpose
                ])
                + self.derivation_code
            ])
            placed[k] = enc.sequence(0x00209113, [enc.element(0x00200032, b"DS", _ds_text(h.ImagePositionPatient))])
        if segment_numbers is None:  # LABELMAP: one frame per kept position
            return [derived[k] + self._content(struct.pack("<I", dim)) + placed[k]
                    for dim, k in zip(frames.dimension.tolist(), frames.slices.tolist(), strict=True)]
        identification = {
            index: enc.sequence(0x0062000A, [enc.element(0x0062000B, b"US", struct.pack("<H", number))])
            if self.identify_segment else b""
            for index, number in enumerate(segment_numbers, start=1)
        }
        return [derived[k] + self._content(struct.pack("<II", index, dim)) + placed[k] + identification[index]
                for index, dim, k in zip(frames.segment_index.tolist(), frames.dimension.tolist(),
                                         frames.slices.tolist(), strict=True)]

    def _content(self, dimension_index_values: bytes) -> bytes:
        return self.enc.sequence(0x00209111, [self.enc.element(0x00209157, b"UL", dimension_index_values)])


def _references(headers: Sequence[Dataset]) -> tuple[list[bytes], list[bytes]]:
    ("Items of SourceImageSequence and ReferencedSeriesSequence (Common Instance Reference), "
     "as highdicom lists them.")
    enc = Encoder(implicit=False, defined_length=True)
    images = [enc.element(0x00081150, b"UI", _uid(h.SOPClassUID))
              + enc.element(0x00081155, b"UI", _uid(h.SOPInstanceUID))
              for h in headers]
    by_series: dict[str, list[bytes]] = defaultdict(list)
    for h, image in zip(headers, images, strict=True):
        by_series[str(h.SeriesInstanceUID)].append(image)
    series = [enc.sequence(0x0008114A, refs) + enc.element(0x0020000E, b"UI", _uid(uid))
              for uid, refs in by_series.items()]
    return images, series


def _spatial_fixups(seg: Dataset, headers: Sequence[Dataset], frames_per_position: bool, kept: np.ndarray) -> None:
    """SpacingBetweenSlices (from every position) and DimensionOrganizationType (from the positions of the planes
    ``kept``, in source order) as highdicom infers them."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    positions = _positions(headers)
    measures = shared.PixelMeasuresSequence[0]
    if "SpacingBetweenSlices" not in headers[0]:  # otherwise copied from the source as it is
        spacing, _ = get_volume_positions(image_positions=positions.tolist(), image_orientation=orientation)
        if spacing is None:
            if "SpacingBetweenSlices" in measures:
                del measures.SpacingBetweenSlices
        else:
            measures.SpacingBetweenSlices = format_number_as_ds(spacing)
    three_d = False
    if len(kept) > 1 and frames_per_position:
        spacing, _ = get_volume_positions(image_positions=positions[kept].tolist(), image_orientation=orientation,
                                          sort=False)
        three_d = spacing is not None and spacing > 0.0
    if three_d:
        seg.DimensionOrganizationType = "3D"
    elif "DimensionOrganizationType" in seg:
        del seg.DimensionOrganizationType


class _Mismatch(Exception):
    pass


def _check(what: str, ours: bytes, theirs: bytes) -> None:
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                  min(len(ours), len(theirs)))
        raise _Mismatch(f"{what} differs from highdicom's at byte {at} of {len(theirs)}")


def build_seg(result: Result, *, seg_type: SegType = SegType.BINARY) -> Dataset:
    """Build the SEG for ``result`` (labels in the same shape and slice order as its volume)."""
    seg_type = SegType(seg_type)  # a caller may pass the string
    headers = result.volume.headers
    descriptions, segments = _descriptions(result)
    if len(headers) <= TEMPLATE_SLICES:
        return build_seg_highdicom(result, seg_type=seg_type)
    if int(segments.max()) > len(descriptions):  # highdicom's check, which now sees only the template's slices
        raise WriteError("highdicom could not build the SEG: Pixel array contains segments that lack descriptions.")
    # highdicom's checks of the source images, likewise
    if len({(h.StudyInstanceUID, h.SeriesInstanceUID, h.Rows, h.Columns, h.get("FrameOfReferenceUID"))
            for h in headers}) > 1:
        raise WriteError("highdicom could not build the SEG: Source images must all be part of the same series and "
                         "must have the same image dimensions (number of rows/columns).")
    iop = headers[0].ImageOrientationPatient
    for h in headers:
        if h.ImageOrientationPatient != iop:
            raise WriteError("highdicom could not build the SEG: Source images must have a shared orientation.")
    members = _members(result)
    template = _highdicom_seg(result, headers[:TEMPLATE_SLICES],
                              _highdicom_pixels(segments[:TEMPLATE_SLICES], members, seg_type), descriptions, seg_type)
    binary = seg_type is not SegType.LABELMAP
    numbers = [int(d.SegmentNumber) for d in descriptions] if binary else None
    bits = int(template.BitsAllocated)
    orientation = [float(v) for v in iop]
    try:
        frames = _FrameEncoder(template)
        sub = headers[:TEMPLATE_SLICES]
        omit = omits_empty_frames(seg_type, len(descriptions))
        sub_frames, sub_boxes = plan_frames(segments[:TEMPLATE_SLICES], plane_order(sub, orientation), numbers,
                                            members, omit=omit)
        _check("PerFrameFunctionalGroupsSequence", _sequence_bytes(_PER_FRAME, frames.items(sub, sub_frames, numbers)),
               pydicom_bytes(template[_PER_FRAME]))
        images, series = _references(sub)
        _check("SourceImageSequence", _sequence_bytes(_SOURCE_IMAGES, images), pydicom_bytes(template[_SOURCE_IMAGES]))
        _check("ReferencedSeriesSequence", _sequence_bytes(_REFERENCED_SERIES, series),
               pydicom_bytes(template[_REFERENCED_SERIES]))
        _check("PixelData", _pixel_data(segments[:TEMPLATE_SLICES], sub_frames, numbers, bits, sub_boxes, members),
               template.PixelData)
    except (_Mismatch, AttributeError, KeyError, IndexError) as exc:
        log.warning("SEG fast path not taken (%s); highdicom builds all %d frames", exc, len(headers))
        return build_seg_highdicom(result, seg_type=seg_type)

    # the labels' boxes (found once for both writers) as boxes of the segment numbers
    boxes = {number: result.boxes[label.value] for number, label in enumerate(result.found, start=1)
             if label.value in result.boxes}
    planned, boxes = plan_frames(segments, plane_order(headers, orientation), numbers, members, boxes, omit=omit)
    seg = Dataset(template)  # a plain Dataset: highdicom's frame look-up tables describe the template only
    seg.file_meta = template.file_meta
    seg.preamble = template.preamble
    del seg[_PER_FRAME], seg[_SOURCE_IMAGES], seg[_REFERENCED_SERIES], seg[_PIXEL_DATA]
    _spatial_fixups(seg, headers, frames_per_position=not binary or len(descriptions) == 1,
                    kept=planned.kept_slices)
    seg.NumberOfFrames = len(planned)
    _finish(seg, result)
    correct_ambiguous_vr(seg, True)
    # Written in this encoding: pydicom then copies the pre-encoded sequences as they are.
    seg.set_original_encoding(False, True, seg._character_set)
    images, series = _references(headers)
    seg[_SOURCE_IMAGES] = raw_sequence(_SOURCE_IMAGES, images, defined_length=True)
    seg[_REFERENCED_SERIES] = raw_sequence(_REFERENCED_SERIES, series, defined_length=True)
    seg[_PER_FRAME] = raw_sequence(_PER_FRAME, frames.items(headers, planned, numbers), defined_length=True)
    seg[_PIXEL_DATA] = DataElement(_PIXEL_DATA, "OB" if bits <= 8 else "OW",
                                   _pixel_data(segments, planned, numbers, bits, boxes, members))
    return seg


def _sequence_bytes(tag: int, items: list[bytes]) -> bytes:
    return Encoder(implicit=False, defined_length=True).sequence(tag, items)
