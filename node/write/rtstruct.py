"""RT Structure Set with pydicom (highdicom has no RTSTRUCT writer), one builder per IOD module.

Modules: Patient, General Study, RT Series, General Equipment, Structure Set, ROI Contour,
RT ROI Observations, Approval and SOP Common (PS3.3 A.19). Contours carry the SOP instance of the
slice they lie on, and the Referenced Frame of Reference → Study → Series → Contour Image hierarchy
lists every source image.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pydicom import Dataset, Sequence, config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.assemble.volume import Volume
from node.errors import WriteError
from node.infer.bundle import Bundle, Label
from node.write.contours import SliceContour, mask_contours
from node.write.result import Result
from node.write.provenance import MANUFACTURER, Provenance
from node.write.uids import ResultUids

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: Retired Detached Study Management SOP Class: what RTReferencedStudySequence items conventionally reference.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
RTSTRUCT_SERIES_NUMBER = 9902

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


def _series_and_equipment(ds: Dataset, bundle: Bundle, uids: ResultUids, prov: Provenance) -> None:
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = uids.rtstruct_series
    ds.SeriesNumber = RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription = f"AI RTSTRUCT {bundle.name}"
    ds.SeriesDate = prov.date
    ds.SeriesTime = prov.time
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = bundle.name
    ds.SoftwareVersions = f"{prov.software_version} {bundle.name} {bundle.version}"
    ds.StationName = prov.station_name
    ds.DeviceSerialNumber = prov.device_serial_number


def _contour_image(header: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return item


def _structure_set(ds: Dataset, volume: Volume, found: list[Label], bundle: Bundle, prov: Provenance) -> str:
    source = volume.headers[0]
    frame_uid = str(source.get("FrameOfReferenceUID", "") or "")
    if not frame_uid:
        raise WriteError("the source series has no FrameOfReferenceUID; an RTSTRUCT cannot be anchored without one")
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = f"AI {bundle.name}"[:16]
    ds.StructureSetName = bundle.name[:64]
    ds.StructureSetDescription = f"Automatic contours by {bundle.algorithm_name} {bundle.version}"
    ds.InstanceNumber = 1
    ds.StructureSetDate = prov.date
    ds.StructureSetTime = prov.time

    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ContourImageSequence = Sequence([_contour_image(h) for h in volume.headers])
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = source.StudyInstanceUID
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    rois = []
    for number, label in enumerate(found, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = label.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{bundle.algorithm_name} {bundle.version}"[:64]
        rois.append(roi)
    ds.StructureSetROISequence = Sequence(rois)
    return frame_uid


def _contour_data(values: np.ndarray) -> RawDataElement:
    """ContourData (3006,0050) encoded once as DS text (0.001 mm), bypassing per-value validation.

    Each value is at most 16 characters (DS's limit) for coordinates within ±10 km. Building
    thousands of DSfloat objects dominated RTSTRUCT writing time; the encoded element is identical.
    """
    flat = values.ravel().tolist()
    text = ("%.3f\\" * len(flat) % tuple(flat))[:-1].encode("ascii")  # one C-level format call
    if len(text) % 2:
        text += b" "
    return RawDataElement(Tag(0x30060050), "DS", len(text), text, 0, False, True)


#: Explicit VR gives DS values a 2-byte length. ContourData of a long contour can exceed it; then
#: the whole RTSTRUCT is written in Implicit VR Little Endian (4-byte lengths), which every planning
#: system reads, rather than letting the element degrade to VR UN.
MAX_EXPLICIT_LENGTH = 0xFFFE


def _roi_contours(ds: Dataset, volume: Volume, labels: np.ndarray, found: list[Label]) -> bool:
    """Fill ROIContourSequence; return True when the object must be written in Implicit VR."""
    # Contour tracing is numpy work that releases the GIL: one thread per structure uses every core.
    with ThreadPoolExecutor(max_workers=min(len(found), os.cpu_count() or 1)) as pool:
        traced = list(pool.map(lambda label: mask_contours(labels == label.value, volume.geometry), found))
    with config.disable_value_validation():  # values are ours and well-formed; validation is 40% of the time
        items, longest = _contour_items(volume, found, traced)
        ds.ROIContourSequence = Sequence(items)
    implicit = longest > MAX_EXPLICIT_LENGTH
    # Mark the contour items as already in the output encoding, so pydicom writes the raw
    # ContourData as it is instead of parsing it back into a million DSfloat objects.
    for roi in items:
        for item in roi.get("ContourSequence", []):
            item.set_original_encoding(implicit, True, item._character_set)
    return implicit


def _contour_items(volume: Volume, found: list[Label], traced: list[list[SliceContour]]) -> tuple[list[Dataset], int]:
    # One reference per slice, shared by every contour on it (pydicom writes a shared item as often as
    # it appears); building a fresh one per contour was a fifth of the RTSTRUCT's build time.
    image_refs = [_contour_image(h) for h in volume.headers]
    items = []
    longest = 0
    for number, (label, label_contours) in enumerate(zip(found, traced), start=1):
        roi = Dataset()
        roi.ROIDisplayColor = list(label.color_rgb)
        roi.ReferencedROINumber = number
        contours = []
        for n, contour in enumerate(label_contours, start=1):
            item = Dataset()
            item.ContourImageSequence = Sequence([image_refs[contour.slice_index]])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(contour.points_lps)
            item.ContourNumber = n
            data = _contour_data(contour.points_lps)
            longest = max(longest, data.length)
            item[0x30060050] = data
            contours.append(item)
        if contours:
            roi.ContourSequence = Sequence(contours)
        items.append(roi)
    return items, longest


def _observations(ds: Dataset, found: list[Label]) -> None:
    items = []
    for number, label in enumerate(found, start=1):
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.ROIObservationLabel = label.name[:16]
        obs.RTROIInterpretedType = label.rt_roi_type
        obs.ROIInterpreter = ""
        items.append(obs)
    ds.RTROIObservationsSequence = Sequence(items)


def build_rtstruct(result: Result) -> Dataset:
    """Build the RT Structure Set for ``result`` on its volume's images."""
    volume, labels, bundle, found = result.volume, result.labels, result.bundle, result.found
    uids, provenance = result.uids, result.provenance
    source = volume.headers[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = uids.rtstruct_instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = uids.rtstruct_instance
    ds.InstanceCreationDate = provenance.date
    ds.InstanceCreationTime = provenance.time
    _patient_and_study(source, ds)
    _series_and_equipment(ds, bundle, uids, provenance)
    _structure_set(ds, volume, found, bundle, provenance)
    if _roi_contours(ds, volume, labels, found):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    _observations(ds, found)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds
