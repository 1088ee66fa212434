"""Generators of series whose instances are each valid but together are not what the node can segment:
transfer syntaxes (lossy, undecodable, unknown, and a few valid ones), mixed series, geometry, gantry
tilt, blank UIDs, multi-frame, undecodable pixel data and SOP classes no installed model takes."""

# The edits call setattr/delattr/compress for their effect inside lambdas and comprehensions.
# mypy: disable-error-code="func-returns-value"

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tests.harness.malformed.builder import COLS, PIXEL_MM, ROWS, SLICE_MM, SLICES, _Builder, _other_uid
from tests.harness.malformed.cases import (
    DATASET_MISMATCH,
    ENHANCED_CT,
    MR_IMAGE_STORAGE,
    PET_IMAGE_STORAGE,
    REFUSED,
    RT_STRUCT,
    SECONDARY_CAPTURE,
    Expect,
    fail_or_refuse,
    job_error,
    words,
)
from tests.harness.malformed.edits import _compressed, _encapsulated, _raw_value, _set


def _transfer_syntax_cases(b: _Builder) -> None:
    lossy = "lossy"
    undecodable = words("PixelData") + "|decod|transfer syntax|not supported|unsupported"

    def series_in(name: str, ts_edit: Callable[[Dataset], Any], expect: Expect) -> None:
        datasets = b.slices(f"transfer-syntax/{name}")
        for ds in datasets:
            ts_edit(ds)
        b.add_series(f"transfer-syntax/{name}", "transfer-syntax", datasets, expect)

    rng = random.Random(b.seed * 17 + 11)

    def fake(n: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(n))

    series_in("j2k-lossy-ratio-20", _compressed(JPEG2000, j2k_cr=[20]), fail_or_refuse(lossy))
    series_in("j2k-lossy-ratio-4", _compressed(JPEG2000, j2k_cr=[4]), fail_or_refuse(lossy))
    series_in("j2k-lossy-psnr-60", _compressed(JPEG2000, j2k_psnr=[60]), fail_or_refuse(lossy))
    series_in("jpeg-ls-near-lossless-3", _compressed(JPEGLSNearLossless, jls_error=3), fail_or_refuse(lossy))
    series_in("jpeg-ls-near-lossless-1", _compressed(JPEGLSNearLossless, jls_error=1), fail_or_refuse(lossy))
    for ts, label in [
        ("1.2.840.10008.1.2.4.100", "mpeg2"),
        ("1.2.840.10008.1.2.4.102", "h264"),
        ("1.2.840.10008.1.2.4.107", "hevc"),
        ("1.2.840.10008.1.2.4.110", "jpeg-xl-lossless"),
        ("1.2.840.10008.1.2.4.112", "jpeg-xl"),
        ("1.2.840.10008.1.2.4.203", "htj2k-lossy-garbage"),
        ("1.2.840.10008.1.2.4.93", "j2k-multicomponent-garbage"),
        ("1.2.840.10008.1.2.4.51", "jpeg-extended-garbage"),
    ]:
        series_in(
            f"{label}-pixel-data", _encapsulated(ts, lambda ds: [fake(300)]), fail_or_refuse(undecodable + "|" + lossy)
        )

    def jpip(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.94")
        del ds.PixelData
        ds.PixelDataProviderURL = "http://127.0.0.1:9/nowhere"

    series_in("jpip-referenced", jpip, fail_or_refuse(undecodable + "|JPIP|provider"))

    def smpte(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.7.1")

    series_in("smpte-2110-video", smpte, fail_or_refuse(undecodable))
    # Syntaxes the node may refuse at negotiation: retired JPEG processes, a private and an unknown UID.
    for ts, label in [
        ("1.2.840.10008.1.2.4.53", "retired-jpeg-53"),
        ("1.2.840.10008.1.2.4.55", "retired-jpeg-55"),
        ("1.2.840.10008.1.2.4.999", "unknown-dicom-ts"),
        ("1.3.6.1.4.1.99999.1.2", "private-ts"),
    ]:
        series_in(
            label,
            _encapsulated(ts, lambda ds: [fake(300)]),
            Expect(no_context=True, statuses=REFUSED, reason=undecodable),
        )
    # Valid encodings the node must handle (kept few: each runs the model).
    series_in("rle-lossless-valid", _compressed(RLELossless), Expect(done=True))
    series_in("j2k-lossless-valid", _compressed(JPEG2000Lossless), Expect(done=True))

    def deflated(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    series_in("deflated-valid", deflated, Expect(done=True))

    def big_endian(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        # pixel data is written as given: swap the 16-bit words so the values stay the same
        ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()

    series_in("explicit-big-endian-valid", big_endian, Expect(done=True))


def _geometry_cases(b: _Builder) -> None:
    def ser(
        name: str,
        category: str,
        expect: Expect,
        edit: Callable[[list[Dataset]], Any] | None = None,
        *,
        n: int = SLICES,
        z: Sequence[float] | None = None,
        focus: int = 0,
    ) -> None:
        datasets = b.slices(f"{category}/{name}", n, z=z)
        if edit is not None:
            edit(datasets)
        b.add_series(f"{category}/{name}", category, datasets, expect, focus=focus)

    def each(**values: Any) -> Callable[[list[Dataset]], list[None]]:
        return lambda dss: [_set(**values)(d) for d in dss]

    def one(k: int, **values: Any) -> Callable[[list[Dataset]], None]:
        return lambda dss: _set(**values)(dss[k])

    def resize(k: int, rows: int, cols: int) -> Callable[[list[Dataset]], None]:
        def edit(dss: list[Dataset]) -> None:
            arr = np.frombuffer(dss[k].PixelData, "<u2").reshape(ROWS, COLS)
            big = np.resize(arr, (rows, cols))
            dss[k].Rows, dss[k].Columns = rows, cols
            dss[k].PixelData = big.astype("<u2").tobytes()

        return edit

    def iop(k: int | None, values: Sequence[float]) -> Callable[[list[Dataset]], None]:
        def edit(dss: list[Dataset]) -> None:
            for i, d in enumerate(dss):
                if k is None or i == k:
                    d.ImageOrientationPatient = [f"{v:.6g}" for v in values]

        return edit

    def rotated(deg: float) -> list[float]:
        a = np.radians(deg)
        return [np.cos(a), np.sin(a), 0.0, -np.sin(a), np.cos(a), 0.0]

    # --- mixed within one series
    ser("sizes-one-slice-48x32", "mixed-series", job_error(words("size")), resize(2, 48, 32))
    ser("sizes-one-slice-32x48", "mixed-series", job_error(words("size")), resize(0, 32, 48))
    ser("sizes-one-slice-16x16", "mixed-series", job_error(words("size")), resize(4, 16, 16))
    for deg in (0.5, 5.0, 30.0, 90.0):
        ser(f"orientation-one-slice-rotated-{deg:g}deg", "mixed-series", job_error("orientation"), iop(3, rotated(deg)))
    ser("orientation-one-slice-sagittal", "mixed-series", job_error("orientation"), iop(1, [0, 1, 0, 0, 0, -1]))
    for k, ps in ((1, "5.0"), (4, "6.5"), (0, "3.0")):
        ser(
            f"pixel-spacing-one-slice-{ps}",
            "mixed-series",
            job_error(words("PixelSpacing")),
            one(k, PixelSpacing=[ps, ps]),
        )
    ser(
        "two-studies-one-series",
        "mixed-series",
        job_error(words("StudyInstanceUID") + "|stud(?:y|ies)|mix"),
        lambda dss: [setattr(d, "StudyInstanceUID", _other_uid(d.StudyInstanceUID)) for d in dss[3:]],
    )
    ser(
        "two-patients-one-series",
        "mixed-series",
        job_error(words("PatientID") + "|patient|mix"),
        lambda dss: [setattr(d, "PatientID", "OTHER") for d in dss[3:]],
    )
    # One regular stack in two frames of reference (de-identified data): segmented in the one most
    # instances carry, said in the job's note (issue 16); [assemble] mixed_frames_of_reference = "decline"
    # would decline it.
    ser(
        "two-frames-of-reference",
        "mixed-series",
        Expect(done=True),
        lambda dss: [setattr(d, "FrameOfReferenceUID", _other_uid(d.FrameOfReferenceUID)) for d in dss[2:]],
    )
    ser(
        "ct-and-mr-sop-classes",
        "mixed-series",
        job_error("modalit|SOP class|MR|mix"),
        lambda dss: [
            (
                setattr(d, "SOPClassUID", MR_IMAGE_STORAGE),
                setattr(d.file_meta, "MediaStorageSOPClassUID", MR_IMAGE_STORAGE),
                setattr(d, "Modality", "MR"),
            )
            for d in dss[3:]
        ],
    )
    ser(
        "two-stacks-in-one-series",
        "mixed-series",
        job_error("spacing|missing|stack|position"),
        z=[0.0, 3.0, 6.0, 100.0, 103.0, 106.0],
        n=6,
    )
    # --- duplicates, gaps, spacing
    for zs in (
        [0, 3, 3, 6, 9],
        [0, 0, 3, 6, 9],
        [0, 3, 6, 9, 9],
        [0, 3, 3, 3, 6],
        [5, 5, 5, 5, 5],
        [0, 3, 6, 6.0005, 9],
    ):
        ser(
            "duplicate-positions-" + "-".join(f"{v:g}" for v in zs),
            "geometry",
            job_error("duplicate|share the position|same position"),
            z=zs,
        )
    for zs in ([0, 3, 6, 12, 15], [0, 6, 9, 12, 15], [0, 3, 6, 9, 18], [0, 3, 9, 12, 15, 18], [0, 3, 6, 9, 12, 15, 30]):
        ser("gap-" + "-".join(f"{v:g}" for v in zs), "geometry", job_error("spacing|missing|gap"), z=zs, n=len(zs))
    # Uneven but one stack (no hole, no duplicate): segmented (issue 16; body-threshold resamples it).
    for zs in ([0, 3, 7, 10, 14], [0, 2, 5, 9, 14], [0, 3, 6, 8, 11], [0, 3.5, 6, 9.5, 12], [0, 1, 3, 6, 10, 15]):
        ser(
            "variable-spacing-" + "-".join(f"{v:g}" for v in zs),
            "geometry",
            Expect(done=True),
            z=zs,
            n=len(zs),
        )
    # --- missing or absurd geometry
    ser("no-pixel-spacing", "geometry", job_error(words("PixelSpacing")), each(PixelSpacing=None))
    ser("no-pixel-spacing-in-one-slice", "geometry", job_error(words("PixelSpacing")), one(2, PixelSpacing=None))
    ser(
        "imager-pixel-spacing-only",
        "geometry",
        job_error(words("PixelSpacing")),
        lambda dss: [(setattr(d, "ImagerPixelSpacing", d.PixelSpacing), delattr(d, "PixelSpacing")) for d in dss],
    )
    ser("pixel-spacing-one-value", "geometry", job_error(words("PixelSpacing")), each(PixelSpacing=["6.0"]))
    ser("pixel-spacing-zero", "geometry", job_error(words("PixelSpacing")), each(PixelSpacing=["0", "0"]))
    ser("pixel-spacing-negative", "geometry", job_error(words("PixelSpacing")), each(PixelSpacing=["-6", "6"]))
    ser(
        "pixel-spacing-nan",
        "geometry",
        job_error(words("PixelSpacing")),
        lambda dss: [_raw_value("PixelSpacing", "DS", b"nan\\nan ")(d) for d in dss],
    )
    ser(
        "pixel-spacing-text",
        "geometry",
        job_error(words("PixelSpacing") + "|non-numeric"),
        lambda dss: [_raw_value("PixelSpacing", "DS", b"six\\six ")(d) for d in dss],
    )
    ser(
        "pixel-spacing-absurd-1e6",
        "geometry",
        job_error(words("PixelSpacing") + "|absurd|large|spacing"),
        each(PixelSpacing=["1000000", "1000000"]),
    )
    ser("no-position", "geometry", job_error(words("ImagePositionPatient")), each(ImagePositionPatient=None))
    ser(
        "no-position-in-one-slice",
        "geometry",
        job_error(words("ImagePositionPatient")),
        one(3, ImagePositionPatient=None),
    )
    ser(
        "position-two-values",
        "geometry",
        job_error(words("ImagePositionPatient")),
        one(1, ImagePositionPatient=["0", "0"]),
    )
    ser(
        "position-text",
        "geometry",
        job_error(words("ImagePositionPatient") + "|non-numeric"),
        lambda dss: _raw_value("ImagePositionPatient", "DS", b"a\\b\\c ")(dss[2]),
    )
    ser(
        "position-nan",
        "geometry",
        job_error(words("ImagePositionPatient")),
        lambda dss: [
            _raw_value("ImagePositionPatient", "DS", f"0\\0\\{'nan' if i == 2 else i * 3}".encode().ljust(8))(d)
            for i, d in enumerate(dss)
        ],
    )
    ser("no-orientation", "geometry", job_error(words("ImageOrientationPatient")), each(ImageOrientationPatient=None))
    ser(
        "orientation-zeros",
        "geometry",
        job_error(words("ImageOrientationPatient") + "|orientation"),
        iop(None, [0] * 6),
    )
    ser(
        "orientation-row-equals-column",
        "geometry",
        job_error(words("ImageOrientationPatient") + "|orientation|orthogonal|parallel"),
        iop(None, [1, 0, 0, 1, 0, 0]),
    )
    ser(
        "orientation-not-orthogonal",
        "geometry",
        job_error(words("ImageOrientationPatient") + "|orientation|orthogonal"),
        iop(None, [1, 0, 0, 0.5, 0.866, 0]),
    )
    ser(
        "orientation-nan",
        "geometry",
        job_error(words("ImageOrientationPatient") + "|orientation"),
        lambda dss: [_raw_value("ImageOrientationPatient", "DS", b"nan\\0\\0\\0\\1\\0 ")(d) for d in dss],
    )
    ser(
        "orientation-five-values",
        "geometry",
        job_error(words("ImageOrientationPatient")),
        each(ImageOrientationPatient=["1", "0", "0", "0", "1"]),
    )
    ser(
        "orientation-not-unit-length",
        "geometry",
        Expect(done=True, reason=words("ImageOrientationPatient") + "|orientation"),
        iop(None, [2, 0, 0, 0, 2, 0]),
    )
    ser(
        "rows-do-not-match-pixel-data", "geometry", job_error(words("PixelData", "Rows") + "|decod|size"), each(Rows=40)
    )
    # --- gantry tilt: a regular sheared stack is supported; an irregular one is not a volume
    for deg in (5.0, 17.0):
        t = np.radians(deg)

        def tilt(dss: list[Dataset], t: float = t) -> None:
            for k, d in enumerate(dss):
                d.ImageOrientationPatient = [f"{v:.8g}" for v in (1, 0, 0, 0, np.cos(t), np.sin(t))]
                d.ImagePositionPatient = [f"{-ROWS * PIXEL_MM / 2:g}", f"{-COLS * PIXEL_MM / 2:g}", f"{k * SLICE_MM:g}"]

        ser(f"gantry-tilt-{deg:g}deg-regular", "tilt", Expect(done=True), tilt)
    for jitter in ((0, 4, 0, 9, 1), (0, 0, 0, 0, 25), (0, 10, 20, 10, 0)):

        def shear(dss: list[Dataset], jitter: tuple[int, ...] = jitter) -> None:
            for k, d in enumerate(dss):
                d.ImagePositionPatient = [
                    f"{-ROWS * PIXEL_MM / 2 + jitter[k]:g}",
                    f"{-COLS * PIXEL_MM / 2:g}",
                    f"{k * SLICE_MM:g}",
                ]

        ser(
            "tilt-irregular-" + "-".join(map(str, jitter)),
            "tilt",
            job_error("regular stack|step|position|spacing"),
            shear,
        )
    # --- blank UIDs (every slice). Study and Series Instance UIDs are what the node files an instance
    # under: the receiver refuses an instance without valid ones (0xA900, naming them), so the sender
    # keeps it and sees why. A blank frame of reference is stored and fails the job.
    unfiled = Expect(statuses=frozenset({DATASET_MISMATCH}))
    for k in range(3):
        ser(f"series-uid-blank-{k}", "blank-uids", unfiled, each(SeriesInstanceUID=""))
    ser("series-uid-absent", "blank-uids", unfiled, each(SeriesInstanceUID=None))
    ser("study-uid-blank", "blank-uids", unfiled, each(StudyInstanceUID=""))
    ser("study-uid-absent", "blank-uids", unfiled, each(StudyInstanceUID=None))
    ser("study-and-series-uid-blank", "blank-uids", unfiled, each(StudyInstanceUID="", SeriesInstanceUID=""))
    ser(
        "frame-of-reference-blank",
        "blank-uids",
        job_error(words("FrameOfReferenceUID") + "|frame of reference"),
        each(FrameOfReferenceUID=""),
    )
    ser(
        "frame-of-reference-absent",
        "blank-uids",
        job_error(words("FrameOfReferenceUID") + "|frame of reference"),
        each(FrameOfReferenceUID=None),
    )
    ser("series-uid-too-long", "blank-uids", unfiled, each(SeriesInstanceUID="1.2.840.99999." + "1234567890" * 6))
    ser("series-uid-with-letters", "blank-uids", unfiled, each(SeriesInstanceUID="1.2.840.99999.ABC"))

    # --- multi-frame
    def multiframe(frames: int) -> Callable[[list[Dataset]], None]:
        def edit(dss: list[Dataset]) -> None:
            for d in dss:
                d.NumberOfFrames = frames
                d.PixelData = d.PixelData * frames

        return edit

    ser("multi-frame-2", "multi-frame", job_error("multi-?frame|frames"), multiframe(2))
    ser("multi-frame-3", "multi-frame", job_error("multi-?frame|frames"), multiframe(3))
    ser(
        "multi-frame-in-one-slice", "multi-frame", job_error("multi-?frame|frames"), lambda dss: multiframe(2)([dss[2]])
    )

    def enhanced(dss: list[Dataset]) -> None:
        for d in dss:
            d.SOPClassUID = ENHANCED_CT
            d.file_meta.MediaStorageSOPClassUID = UID(ENHANCED_CT)
            d.NumberOfFrames = 1

    ser("enhanced-ct-sop-class", "multi-frame", job_error("Enhanced|multi-?frame|needs|not CT|CT Image"), enhanced)
    # --- undecodable compressed pixel data in every slice
    rng = random.Random(b.seed * 13 + 7)
    for ts in (JPEG2000Lossless, "1.2.840.10008.1.2.4.70", RLELossless, "1.2.840.10008.1.2.4.80"):

        def garbage(dss: list[Dataset], ts: str = ts) -> None:
            for d in dss:
                _encapsulated(ts, lambda ds: [bytes(rng.randrange(256) for _ in range(256))])(d)

        ser(f"undecodable-{ts}", "undecodable", job_error(words("PixelData") + "|decod"), garbage)

    # --- what no installed model segments
    def as_class(sop_class: str, modality: str) -> Callable[[list[Dataset]], None]:
        def edit(dss: list[Dataset]) -> None:
            for d in dss:
                d.SOPClassUID = sop_class
                d.file_meta.MediaStorageSOPClassUID = UID(sop_class)
                d.Modality = modality

        return edit

    ser("mr-images", "not-for-us", job_error(r"\bMR\b|modalit|needs"), as_class(MR_IMAGE_STORAGE, "MR"))
    ser("mr-images-6", "not-for-us", job_error(r"\bMR\b|modalit|needs"), as_class(MR_IMAGE_STORAGE, "MR"), n=6)
    ser("pet-images", "not-for-us", job_error(r"\bPT\b|PET|Positron|modalit|needs"), as_class(PET_IMAGE_STORAGE, "PT"))
    ser("ct-class-labelled-mr", "not-for-us", job_error(r"\bMR\b|modalit"), each(Modality="MR"))
    ser("ct-class-no-modality", "not-for-us", job_error(r"modalit|unlabelled"), each(Modality=None))
    ser("ct-class-blank-modality", "not-for-us", job_error(r"modalit|unlabelled"), each(Modality=""))
    ser(
        "secondary-capture",
        "not-for-us",
        job_error(r"Secondary Capture|needs|not CT"),
        as_class(SECONDARY_CAPTURE, "OT"),
    )
    ser(
        "rtstruct-class",
        "not-for-us",
        # CT pixels filed as an RT Structure Set: edit QA takes the series and rejects the set with the reason
        job_error(r"RT Structure|needs|not CT|1\.2\.840\.10008\.5\.1\.4\.1\.1\.481\.3|rejected \(the structure set"),
        as_class(RT_STRUCT, "RTSTRUCT"),
    )
    for n in (1, 2, 3, 4):
        ser(f"only-{n}-slices", "not-for-us", job_error(r"at least \d+ slices|too few|slices"), n=n)
