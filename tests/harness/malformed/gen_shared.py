"""Generator of cases from the real third-party files in ``../shared/data`` (absent folders are skipped)."""

from __future__ import annotations

import copy
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID

from tests.harness.malformed.builder import SLICES, _Builder, _uid
from tests.harness.malformed.cases import DATASET_MISMATCH, REFUSED, Expect, fail_or_refuse, job_error, words


def _shared_cases(b: _Builder, shared: Path) -> None:
    """Cases from real files in ../shared/data (absent folders are skipped)."""
    ts_dir = shared / "transfer-syntaxes"

    def replicate(name: str, source: Path, n: int, expect: Expect, category: str) -> None:
        ds0 = dcmread(source)
        datasets = []
        for k in range(n):
            ds = copy.deepcopy(ds0)
            sop = _uid(b.seed, "shared", name, "sop", k)
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
            ds.SeriesInstanceUID = _uid(b.seed, "shared", name, "series")
            ds.StudyInstanceUID = _uid(b.seed, "shared", name, "study")
            if "ImagePositionPatient" in ds:
                ipp = [float(v) for v in ds.ImagePositionPatient]
                ds.ImagePositionPatient = [f"{ipp[0]:g}", f"{ipp[1]:g}", f"{ipp[2] + 2.5 * k:g}"]
            datasets.append(ds)
        b.add_series(f"shared/{name}", category, datasets, expect)

    if ts_dir.is_dir():
        for path in sorted(ts_dir.iterdir()):
            if not path.is_file():
                continue
            ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            if ts in (
                "1.2.840.10008.1.2.4.50",
                "1.2.840.10008.1.2.4.51",
                "1.2.840.10008.1.2.4.81",
                "1.2.840.10008.1.2.4.91",
            ) and path.name.startswith("CTImage"):
                replicate(f"lossy-{ts}", path, SLICES, fail_or_refuse("lossy"), "transfer-syntax")
            elif ts in ("1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55") and path.name.startswith("CTImage"):
                replicate(
                    f"retired-{ts}",
                    path,
                    SLICES,
                    Expect(no_context=True, statuses=REFUSED, reason=words("PixelData") + "|decod|lossy"),
                    "transfer-syntax",
                )
        nps = ts_dir / "no-pixel-spacing.dcm"
        if nps.is_file():  # an ultrasound image (RLE) without PixelSpacing: not for a CT model either way
            replicate(
                "no-pixel-spacing",
                nps,
                SLICES,
                job_error(words("PixelSpacing") + "|needs CT|not CT|Ultrasound"),
                "not-for-us",
            )
        ect = ts_dir / "eCT_Supplemental.dcm"
        if ect.is_file():
            ds = dcmread(ect)
            b.add_series(
                "shared/enhanced-ct-multi-frame",
                "multi-frame",
                [ds],
                job_error("Enhanced|multi-?frame|needs|at least|CT Image"),
            )
    totalseg = shared / "ct" / "totalseg-abdomen-20-j2k"
    if totalseg.is_dir():
        files = sorted(p for p in totalseg.iterdir() if p.is_file() and p.name.startswith("CT."))[:8]
        if files:
            # Sent byte for byte: the SOP Class and Instance UIDs are only in the file meta (the dataset's
            # are empty, as are its Study and Series UIDs), which a rewrite would lose. The receiver
            # refuses every instance with 0xA900 and a log line naming the empty UIDs: without them it
            # could neither group the images into their series nor file results in their study.
            datasets = [dcmread(f, stop_before_pixels=True) for f in files]
            b.add_series(
                "shared/totalseg-blank-uids",
                "blank-uids",
                datasets,
                Expect(statuses=frozenset({DATASET_MISMATCH})),
                raw={k: f.read_bytes() for k, f in enumerate(files)},
            )
