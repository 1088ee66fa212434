"""Which MR series the brain bundle (engines/brain-deepbet) takes: 3D T1-weighted MR, by its ``[select.mr]``
header rules, and the sentence every other MR series is declined with — from the header alone, at settle
(the assembler reads one file's header) and again at job time (node.infer.brain.check_series)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from node.assemble.select import MrFacts, SeriesFacts, mr_facts, select_bundles, why_not, why_not_mr
from node.assemble.stable import Assembler
from node.errors import BundleError
from node.infer.manifest import discover_bundles, load_bundle
from node.model.bundle import Bundle, MrAcquisition, ScanningSequence
from node.model.records import InstanceMeta, SeriesState
from node.spool.index import Index

REPO = Path(__file__).resolve().parents[2]
ENGINES = REPO / "engines"
BRAIN = ENGINES / "brain-deepbet"
T2_SERIES = REPO.parent / "shared" / "data" / "mr" / "adi-brain-t2"
MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"

#: The shared series' header (Siemens TrioTim, axial T2 FSE): what the rules see of it.
T2_HEADER = {"MRAcquisitionType": "2D", "SliceThickness": 2.5, "ScanningSequence": "SE", "EchoTime": 91,
             "RepetitionTime": 11730, "SeriesDescription": "AX FSE T2"}
#: A Siemens 3D MPRAGE as it comes off the scanner.
MPRAGE = {"MRAcquisitionType": "3D", "SliceThickness": 1.0, "ScanningSequence": ["GR", "IR"], "EchoTime": 2.98,
          "RepetitionTime": 2300, "InversionTime": 900, "SeriesDescription": "t1_mprage_sag_p2_iso"}
#: A GE 3D IR-FSPGR (BRAVO): TR is the echo spacing, the inversion 450 ms.
BRAVO = {"MRAcquisitionType": "3D", "SliceThickness": 1.2, "ScanningSequence": ["GR", "IR"], "EchoTime": 3.1,
         "RepetitionTime": 8.2, "InversionTime": 450, "SeriesDescription": "Sag 3D BRAVO"}


def _header(values: dict[str, object], modality: str = "MR") -> Dataset:
    ds = Dataset()
    ds.Modality = modality
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture(scope="module")
def brain() -> Bundle:
    return load_bundle(BRAIN)


def test_t1_3d_series_are_taken(brain: Bundle) -> None:
    for header in (MPRAGE, BRAVO):
        facts = SeriesFacts("MR", MR, 176, mr=MrFacts.of(_header(header)))
        assert why_not(brain, facts) is None, header


def test_the_shared_t2_series_is_declined_with_every_reason(brain: Bundle) -> None:
    reason = why_not(brain, SeriesFacts("MR", MR, 55, mr=MrFacts.of(_header(T2_HEADER))))
    assert reason == (
        "brain-deepbet takes only 3D T1-weighted MR (3D gradient echo, thin slices, short TE); this series has "
        "a 2D acquisition (3D taken); slice thickness 2.5 mm (at most 1.5 mm); scanning sequence SE "
        "(ScanningSequence (0018,0020) must include GR); echo time 91 ms (at most 10 ms); repetition time 11730 ms "
        "(at most 3000 ms)")


def test_the_real_t2_files_give_the_same_facts(brain: Bundle) -> None:
    if not T2_SERIES.is_dir():
        pytest.skip(f"{T2_SERIES} is absent (the shared real-data folder is not on this machine)")
    facts = mr_facts(sorted(T2_SERIES.iterdir()))
    assert facts == MrFacts.of(_header(T2_HEADER))
    assert facts is not None and why_not_mr(brain, facts) is not None


@pytest.mark.parametrize(("change", "phrase"), [
    ({"MRAcquisitionType": "2D"}, "a 2D acquisition (3D taken)"),
    ({"MRAcquisitionType": None}, "no MR acquisition type in the header (MRAcquisitionType (0018,0023); 3D taken)"),
    ({"SliceThickness": 3.0}, "slice thickness 3 mm (at most 1.5 mm)"),
    ({"SliceThickness": None}, "no slice thickness in the header"),
    # 3D SPACE FLAIR: spin echo, a long echo and a fluid-nulling inversion
    ({"ScanningSequence": ["SE", "IR"], "EchoTime": 388, "RepetitionTime": 5000, "InversionTime": 1800},
     "scanning sequence SE/IR (ScanningSequence (0018,0020) must include GR); echo time 388 ms (at most 10 ms); "
     "repetition time 5000 ms (at most 3000 ms); inversion time 1800 ms (at most 1500 ms"),
    ({"ScanningSequence": "GR", "EchoTime": 20, "InversionTime": None, "SeriesDescription": "SWI_Images"},
     "echo time 20 ms (at most 10 ms); series description 'SWI_Images' (contains 'SWI', not taken)"),
    ({"EchoTime": None}, "no echo time in the header (EchoTime (0018,0081); at most 10 ms taken)"),
    ({"SeriesDescription": "TOF_3D_multi-slab"}, "series description 'TOF_3D_multi-slab' (contains 'TOF'"),
])
def test_each_rule_declines_with_the_value_and_what_is_taken(brain: Bundle, change: dict[str, object],
                                                             phrase: str) -> None:
    header = {k: v for k, v in {**MPRAGE, **change}.items() if v is not None}
    reason = why_not_mr(brain, MrFacts.of(_header(header)))
    assert reason is not None and reason.startswith("brain-deepbet takes only 3D T1-weighted MR")
    assert phrase in reason, reason


def test_other_modalities_and_unread_mr_facts(brain: Bundle) -> None:
    ct = why_not(brain, SeriesFacts("CT", CT, 200))
    assert ct == "brain-deepbet needs MR images, not CT Image Storage"
    # Not read yet (the index alone): the MR rules are left to the job, which checks the volume's headers.
    assert why_not(brain, SeriesFacts("MR", MR, 55)) is None
    # The CT bundles decline the MR series; the brain bundle says why it does not take it either.
    bundles = discover_bundles(ENGINES, ("body-lungs", "liver", "brain-deepbet"))
    chosen, reasons = select_bundles(bundles, SeriesFacts("MR", MR, 55, mr=MrFacts.of(_header(T2_HEADER))))
    assert chosen == [] and len(reasons) == 3 and reasons[2].startswith("brain-deepbet takes only 3D T1")
    chosen, _ = select_bundles(bundles, SeriesFacts("MR", MR, 176, mr=MrFacts.of(_header(MPRAGE))))
    assert [b.name for b in chosen] == ["brain-deepbet"]


def test_the_manifest_rules_are_typed(brain: Bundle, tmp_path: Path) -> None:
    rules = brain.select.mr
    assert rules is not None and rules.acquisition_types == (MrAcquisition.THREE_D,)
    assert rules.scanning_sequences == (ScanningSequence.GR,)
    assert (rules.max_slice_thickness_mm, rules.max_echo_time_ms, rules.max_repetition_time_ms,
            rules.max_inversion_time_ms) == (1.5, 10.0, 3000.0, 1500.0)
    text = (BRAIN / "manifest.toml").read_text(encoding="utf-8")
    for old, new, words in (
        ('acquisition_types = ["3D"]', 'acquisition_types = ["4D"]', "'select.mr.acquisition_types' holds '4D'"),
        ('scanning_sequences = ["GR"]', 'scanning_sequences = ["FSE"]', "'select.mr.scanning_sequences' holds 'FSE'"),
        ("max_echo_time_ms = 10.0", "max_echo_time_ms = -1.0", "'select.mr.max_echo_time_ms' is -1.0"),
        ("max_echo_time_ms = 10.0", "max_echo_ms = 10.0", "max_echo_ms"),
    ):
        bad = tmp_path / old.split()[0] / "brain"
        bad.mkdir(parents=True, exist_ok=True)
        (bad / "manifest.toml").write_text(text.replace(old, new), encoding="utf-8")
        with pytest.raises(BundleError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_bundle(bad)


def _write_mr_series(directory: Path, series_uid: str, header: dict[str, object], n: int) -> list[Path]:
    directory.mkdir(parents=True)
    paths = []
    for i in range(n):
        ds = _header(header)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = MR, f"{series_uid}.{i}", series_uid
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = UID(MR)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
        path = directory / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_the_assembler_reads_the_mr_facts_at_settle(brain: Bundle, tmp_path: Path) -> None:
    index = Index(tmp_path / "i.sqlite3")
    for uid, header in (("1.5.1", T2_HEADER), ("1.5.2", MPRAGE)):
        for i, path in enumerate(_write_mr_series(tmp_path / uid, uid, header, 12)):
            assert dcmread(path).Modality == "MR"
            meta = InstanceMeta(f"{uid}.{i}", MR, "1.2", uid, "MR", "1.2.840.10008.1.2.1", "",
                                str(header["SeriesDescription"]))
            index.add_instance(meta, path=path, size=1, calling_ae="MR1", quiet_period_s=1, now=100.0)
    liver = load_bundle(ENGINES / "liver")
    Assembler(index, [liver, brain]).poll()
    t2 = index.series("1.5.1")
    assert t2 is not None and t2.state is SeriesState.IGNORED
    assert "brain-deepbet takes only 3D T1-weighted MR" in t2.note and "echo time 91 ms" in t2.note, t2.note
    assert [j.bundle for j in index.series_jobs("1.5.2")] == ["brain-deepbet@1.0.2-node1"]
