"""RT Structure Set with pydicom (highdicom has no RTSTRUCT writer), one builder per IOD module.

Modules: Patient, General Study, RT Series, General Equipment, Structure Set, ROI Contour,
RT ROI Observations, Approval and SOP Common (PS3.3 A.19). Contours carry the SOP instance of the
slice they lie on, and the Referenced Frame of Reference → Study → Series → Contour Image hierarchy
lists every source image.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from pydicom import Dataset, Sequence
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.errors import WriteError
from node.model.bundle import Bundle, ContourSmoothing, Label
from node.model.enums import ObjectKind
from node.model.volume import Volume
from node.write.contours import Contours, structure_box, trace_label
from node.write.decimal_text import fixed3_groups
from node.write.encoding import Encoder, raw_sequence
from node.write.provenance import MANUFACTURER, Provenance
from node.write.result import Result
from node.write.series import result_series
from node.write.uids import ResultUids

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: Retired Detached Study Management SOP Class: what RTReferencedStudySequence items conventionally reference.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

_PATIENT = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "IssuerOfPatientID", "PatientAge",
            "OtherPatientIDsSequence"]
_STUDY = ["StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
          "AccessionNumber", "StudyDescription"]


def _copy(source: Dataset, target: Dataset, keywords: list[str], *, type2: tuple[str, ...] = ()) -> None:
    for keyword in keywords:
        if keyword in source:
            setattr(target, keyword, source[keyword].value)
        elif keyword in type2:
            setattr(target, keyword, "")


def _patient_and_study(source: Dataset, ds: Dataset) -> None:
    _copy(source, ds, _PATIENT, type2=("PatientName", "PatientID", "PatientBirthDate", "PatientSex"))
    _copy(source, ds, _STUDY, type2=("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"))
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet


def _series_and_equipment(ds: Dataset, source: Dataset, bundle: Bundle, uids: ResultUids, prov: Provenance) -> None:
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = uids.rtstruct_series
    series = result_series(source, bundle.name, ObjectKind.RTSTRUCT)
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.SeriesDate = prov.date
    ds.SeriesTime = prov.time
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = bundle.name
    ds.SoftwareVersions = f"{prov.software_version} {bundle.name} {bundle.version}"
    ds.StationName = prov.station_name
    ds.DeviceSerialNumber = prov.device_serial_number


def _contour_images(headers: list[Dataset], implicit: bool) -> Dataset:
    """An RTReferencedSeriesSequence item listing every source image, its ContourImageSequence pre-encoded."""
    enc = Encoder(implicit, defined_length=True)  # as pydicom writes a sequence of Datasets
    series = Dataset()
    series.SeriesInstanceUID = headers[0].SeriesInstanceUID
    series[0x30060016] = raw_sequence(0x30060016, [
        enc.element(0x00081150, b"UI", str(h.SOPClassUID).encode())
        + enc.element(0x00081155, b"UI", str(h.SOPInstanceUID).encode())
        for h in headers
    ], implicit=implicit, defined_length=True)
    series.set_original_encoding(implicit, True, series._character_set)  # written as it is
    return series


def _frame_of_reference(source: Dataset) -> str:
    frame_uid = str(source.get("FrameOfReferenceUID", "") or "")
    if not frame_uid:
        raise WriteError("the source series has no FrameOfReferenceUID; an RTSTRUCT cannot be anchored without one")
    return frame_uid


def _structure_set(ds: Dataset, volume: Volume, found: list[str], bundle: Bundle, prov: Provenance,
                   implicit: bool) -> str:
    source = volume.headers[0]
    frame_uid = _frame_of_reference(source)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = f"AI {bundle.name}"[:16]
    ds.StructureSetName = bundle.name[:64]
    ds.StructureSetDescription = f"Automatic contours by {bundle.algorithm_name} {bundle.version}"
    ds.InstanceNumber = 1
    ds.StructureSetDate = prov.date
    ds.StructureSetTime = prov.time

    series = _contour_images(volume.headers, implicit)
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = source.StudyInstanceUID
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    rois = []
    for number, name in enumerate(found, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{bundle.algorithm_name} {bundle.version}"[:64]
        rois.append(roi)
    ds.StructureSetROISequence = Sequence(rois)
    return frame_uid


#: Explicit VR gives DS values a 2-byte length. ContourData of a long contour can exceed it; then
#: the whole RTSTRUCT is written in Implicit VR Little Endian (4-byte lengths), which every planning
#: system reads, rather than letting the element degrade to VR UN.
MAX_EXPLICIT_LENGTH = 0xFFFE


def trace_contours(result: Result) -> list[Contours]:
    """The contours of each found structure (in ``result.found`` order), in patient coordinates, smoothed
    where the structure's contour rule says so."""
    labels, geometry, found, rules = result.labels, result.volume.geometry, result.found, result.bundle.contours
    # each structure is traced within its box (a hundred organs stay fast), or not at all when the cleaning did
    boxes = result.boxes if any(label.value not in result.outlines for label in found) else {}

    def trace(label: Label) -> Contours:
        smooth = rules.rule(label).smoothing is ContourSmoothing.HALF_PIXEL
        return trace_label(labels, label.value, geometry, label.includes, smooth=smooth,
                           box=structure_box(boxes, (label.value, *label.includes)),
                           outlines=result.outlines.get(label.value))

    # Contour tracing is numpy work that releases the GIL: one thread per structure uses every core.
    with ThreadPoolExecutor(max_workers=min(len(found), os.cpu_count() or 1)) as pool:
        return list(pool.map(trace, found))


def _contour_texts(contours: Contours) -> list[bytes]:
    """ContourData of each contour as DS text with 0.001 mm precision ("%.3f"), padded to even length.

    Each value is at most 16 characters (DS's limit) for coordinates within ±10 km.
    """
    texts = fixed3_groups(contours.points_lps, 3 * contours.sizes)
    return [text + b" " if len(text) % 2 else text for text in texts]


def _roi_contours(ds: Dataset, volume: Volume, traced: list[Contours], texts: list[list[bytes]], found: list[Label],
                  implicit: bool) -> None:
    """Set ROIContourSequence (pre-encoded, in Implicit VR if ``implicit``)."""
    # ROIContourSequence holds thousands of items: encoded straight to bytes (node.write.encoding).
    enc = Encoder(implicit)
    # One encoded image reference per slice, shared by every contour on that slice.
    image_refs = [
        enc.sequence(0x30060016, [enc.element(0x00081150, b"UI", str(h.SOPClassUID).encode())
                                  + enc.element(0x00081155, b"UI", str(h.SOPInstanceUID).encode())])
        for h in volume.headers
    ]
    closed_planar = enc.element(0x30060042, b"CS", b"CLOSED_PLANAR")
    rois = []
    for number, (label, contours, roi_texts) in enumerate(zip(found, traced, texts, strict=False), start=1):
        items = [
            image_refs[k]
            + closed_planar
            + enc.element(0x30060046, b"IS", str(size).encode())
            + enc.element(0x30060048, b"IS", str(n).encode())
            + enc.element(0x30060050, b"DS", text)
            for n, (k, size, text) in enumerate(
                zip(contours.slices.tolist(), contours.sizes.tolist(), roi_texts, strict=True), start=1
            )
        ]
        color = "\\".join(str(v) for v in label.color_rgb).encode()
        rois.append(
            enc.element(0x3006002A, b"IS", color)
            + (enc.sequence(0x30060040, items) if items else b"")
            + enc.element(0x30060084, b"IS", str(number).encode())
        )
    # pydicom writes the raw items as they are (and adds the sequence delimiter) when the dataset is
    # marked as already being in the output encoding (see build_rtstruct).
    ds[0x30060039] = raw_sequence(0x30060039, rois, implicit=implicit)


def _observations(ds: Dataset, found: list[Label], names: list[str]) -> None:
    items = []
    for number, (label, name) in enumerate(zip(found, names, strict=True), start=1):
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.ROIObservationLabel = name[:16]
        obs.RTROIInterpretedType = label.rt_roi_type
        obs.ROIInterpreter = ""
        items.append(obs)
    ds.RTROIObservationsSequence = Sequence(items)


def build_rtstruct(result: Result, traced: list[Contours] | None = None) -> Dataset:
    """Build the RT Structure Set for ``result`` on its volume's images (``traced``: its :func:`trace_contours`)."""
    volume, bundle, found = result.volume, result.bundle, result.found
    uids, provenance = result.uids, result.provenance
    source = volume.headers[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(RT_STRUCTURE_SET_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uids.rtstruct_instance)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = uids.rtstruct_instance
    ds.InstanceCreationDate = provenance.date
    ds.InstanceCreationTime = provenance.time
    _patient_and_study(source, ds)
    _series_and_equipment(ds, source, bundle, uids, provenance)
    _frame_of_reference(source)  # before the tracing: nothing to do without it
    traced = trace_contours(result) if traced is None else traced
    texts = [_contour_texts(contours) for contours in traced]
    implicit = max((len(t) for roi in texts for t in roi), default=0) > MAX_EXPLICIT_LENGTH
    names = [result.roi_name(label) for label in found]  # the site's renames ([output.roi_names])
    _structure_set(ds, volume, names, bundle, provenance, implicit)
    _roi_contours(ds, volume, traced, texts, found, implicit)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    _observations(ds, found, names)
    ds.ApprovalStatus = "UNAPPROVED"
    # Written in this encoding: pydicom then copies the pre-encoded ROIContourSequence as it is.
    ds.set_original_encoding(implicit, True, ds._character_set)
    return ds
