"""The corpus builder: good slices of new series from five synthetic CT slices, written as case files.

:class:`_Builder` makes datasets with deterministic UIDs (``_uid``) and adds cases of the three kinds
(``add_bytes``: one malformed instance among good companions; ``add_series``; ``add_protocol``). The
generators (``gen_*`` modules) fill one builder each in turn.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

from tests.harness.malformed.cases import SEND_CSTORE, SEND_PROTOCOL, SEND_SERIES, Case, Expect, ProtocolScript
from tests.harness.malformed.mangle import Elem, encode, file_meta_bytes, split_file, walk_explicit_le
from tests.harness.synthetic_ct import write_ct_series

#: Slices of the small series every data case is built from.
SLICES = 5
ROWS = COLS = 32
PIXEL_MM = 6.0
SLICE_MM = 3.0


def _uid(*parts: object) -> str:
    """A deterministic UID (pydicom's root; the same parts give the same UID)."""
    return str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["malformed", *map(str, parts)]))


def _other_uid(uid: str) -> str:
    """Another valid UID derived from ``uid`` (appending to a 64-character UID would make it invalid)."""
    return _uid("other", uid)


class _Builder:
    """Makes datasets and files for one corpus from five good synthetic CT slices."""

    def __init__(self, workdir: Path, seed: int) -> None:
        self.workdir = workdir
        self.seed = seed
        self.rng = random.Random(seed)
        base = write_ct_series(
            workdir / "_base",
            slices=SLICES,
            rows=ROWS,
            columns=COLS,
            pixel_spacing=(PIXEL_MM, PIXEL_MM),
            slice_thickness=SLICE_MM,
            origin=(-ROWS * PIXEL_MM / 2, -COLS * PIXEL_MM / 2, 0.0),
            seed=seed,
            noise_hu=0.0,
            shuffle_files=False,
        )
        self.templates = [dcmread(f) for f in base.files_in_slice_order]
        self.cases: list[Case] = []
        self._keys: set[str] = set()
        self.files_dir = workdir / "cases"
        self.files_dir.mkdir(parents=True, exist_ok=True)

    # --------------------------------------------------------------- datasets
    def slices(
        self, key: str, n: int = SLICES, *, z: Sequence[float] | None = None, patient_id: str | None = None
    ) -> list[Dataset]:
        """``n`` good slices of a new series (new study, series, SOP UIDs; positions 0, 3, 6... mm)."""
        if key in self._keys:
            raise ValueError(f"series key {key!r} used twice: its UIDs would collide")
        self._keys.add(key)
        study, series, frame = (
            _uid(self.seed, key, "study"),
            _uid(self.seed, key, "series"),
            _uid(self.seed, key, "for"),
        )
        zs = list(z) if z is not None else [k * SLICE_MM for k in range(n)]
        out: list[Dataset] = []
        for k, zk in enumerate(zs):
            ds = copy.deepcopy(self.templates[k % SLICES])
            sop = _uid(self.seed, key, "sop", k)
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.FrameOfReferenceUID = frame
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{-ROWS * PIXEL_MM / 2:g}", f"{-COLS * PIXEL_MM / 2:g}", f"{zk:g}"]
            ds.SliceLocation = f"{zk:g}"
            ds.SeriesDescription = f"malformed corpus: {key}"[:64]
            if patient_id:
                ds.PatientID = patient_id
            out.append(ds)
        return out

    def write(self, name: str, data: bytes) -> Path:
        path = self.files_dir / f"{len(self.cases):04d}_{name}.dcm"
        path.write_bytes(data)
        return path

    # --------------------------------------------------------------- case makers
    def add_series(
        self,
        name: str,
        category: str,
        datasets: Sequence[Dataset],
        expect: Expect,
        *,
        focus: int = 0,
        note: str = "",
        raw: dict[int, bytes] | None = None,
    ) -> Case:
        """Individually valid instances sent in one association; ``raw`` replaces some files' bytes."""
        files = []
        for k, ds in enumerate(datasets):
            data = raw[k] if raw and k in raw else encode(ds)
            files.append(self.write(f"{k}", data))
        case = Case(
            name,
            category,
            SEND_SERIES,
            expect,
            files=files,
            focus_sop=str(datasets[focus].file_meta.MediaStorageSOPInstanceUID),
            note=note,
        )
        self.cases.append(case)
        return case

    def add_bytes(
        self,
        name: str,
        category: str,
        corrupt: Callable[[bytes, list[Elem]], bytes] | None,
        expect: Expect,
        *,
        dataset: Callable[[Dataset], Dataset | None] | None = None,
        note: str = "",
    ) -> Case:
        """One malformed instance among four good companions of one new series.

        ``dataset`` edits the target's Dataset before encoding; ``corrupt`` edits its encoded dataset
        bytes (Explicit VR Little Endian unless ``dataset`` changed the transfer syntax).
        """
        series = self.slices(name)
        position = self.rng.randrange(SLICES)
        target = series[position]
        # The file meta (what the C-STORE request carries: SOP class, SOP instance, transfer syntax)
        # stays that of the good slice unless the edit changes the transfer syntax on purpose.
        request_class = str(target.file_meta.MediaStorageSOPClassUID)
        request_sop = str(target.file_meta.MediaStorageSOPInstanceUID)
        if dataset is not None:
            target = dataset(target) or target
        meta_ds = copy.deepcopy(target.file_meta)
        meta_ds.MediaStorageSOPClassUID = UID(request_class)
        meta_ds.MediaStorageSOPInstanceUID = UID(request_sop)
        override = getattr(target, "_malformed_body", None)
        if override is not None:  # a dataset body pydicom would not write for this file meta
            body = override
        else:
            _, body = split_file(encode(target))
        meta = file_meta_bytes(meta_ds)
        if corrupt is not None:
            body = corrupt(body, walk_explicit_le(body))
        files = []
        order = list(range(SLICES))
        self.rng.shuffle(order)
        target_path = None
        for k in order:
            if k == position:
                target_path = self.write("target", meta + body)
                files.append(target_path)
            else:
                files.append(self.write(f"{k}", encode(series[k])))
        case = Case(
            name, category, SEND_CSTORE, expect, files=files, target=target_path, focus_sop=request_sop, note=note
        )
        self.cases.append(case)
        return case

    def add_protocol(
        self,
        name: str,
        category: str,
        script: ProtocolScript,
        expect: Expect,
        *,
        sops: Sequence[str] = (),
        slow: bool = False,
        note: str = "",
    ) -> Case:
        case = Case(name, category, SEND_PROTOCOL, expect, script=script, sops=list(sops), slow=slow, note=note)
        self.cases.append(case)
        return case
