from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from node.config import NodeConfig
from node.dicom.filemeta import encode_file_meta
from node.errors import ConfigError
from node.service.daemon import lock_state_dir
from node.spool.index import Index
from node.spool.recover import reconcile
from node.spool.store import Spool
from tests.harness.synthetic_ct import write_ct_series


def _dataset_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return raw[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def test_file_meta_we_encode_reads_back(tmp_path: Path) -> None:
    s = write_ct_series(tmp_path, slices=2, rows=16, columns=16)
    ds = dcmread(s.files[0])
    raw = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), "PEER") \
        + _dataset_bytes(s.files[0])
    back = dcmread(BytesIO(raw))
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.SourceApplicationEntityTitle == "PEER"
    assert (back.pixel_array == ds.pixel_array).all()


def test_spool_files_missing_from_the_index_are_reindexed(tmp_path: Path) -> None:
    """A power loss may roll back index commits; the fsynced spool files bring them back."""
    s = write_ct_series(tmp_path / "ct", slices=3, rows=16, columns=16)
    spool = Spool(tmp_path / "spool")
    index = Index(tmp_path / "index.sqlite3")
    for f in s.files:
        ds = dcmread(f, stop_before_pixels=True)
        spool.store(str(ds.SOPInstanceUID), [f.read_bytes()])
    assert reconcile(spool, index, quiet_period_s=1) == 3
    assert index.instance_count() == 3
    assert index.series(s.series_uid).instance_count == 3  # type: ignore[union-attr]
    assert reconcile(spool, index, quiet_period_s=1) == 0


def test_second_service_on_one_state_dir_is_refused(tmp_path: Path) -> None:
    first = lock_state_dir(tmp_path)
    with pytest.raises(ConfigError, match="in use by another running node"):
        lock_state_dir(tmp_path)
    first.close()
    lock_state_dir(tmp_path).close()
    assert NodeConfig().state_dir  # the default is a relative ./state
