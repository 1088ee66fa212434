"""One typed TOML reader for the node configuration and the bundle manifests: unknown keys, wrong types,
bools posing as integers and values outside a choice are errors naming the file, the table and the key,
in both kinds of file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from node.config import load_config
from node.errors import BundleError, ConfigError
from node.infer.manifest import load_bundle
from node.model.enums import Crop, EngineBackend, SegType, WindowMode
from node.model.tables import Table

ENGINES = Path(__file__).resolve().parents[2] / "engines"


def test_table_reads_typed_values_and_reports_unknown_keys_with_a_suggestion() -> None:
    top = Table({"a": 1, "b": {"patch": [1, 2, 3], "mode": "single-block", "patc": 4}}, source="x.toml",
                error=ConfigError)
    assert top.get("a", float, 0.0) == 1.0 and isinstance(top.get("a", float, 0.0), float)
    b = top.table("b")
    assert b.numbers("patch", 3) == (1.0, 2.0, 3.0)
    assert b.choice("mode", WindowMode, WindowMode.SLIDING) is WindowMode.SINGLE_BLOCK
    with pytest.raises(ConfigError, match=r"^x.toml: unknown key\(s\) 'b.patc' \(did you mean 'b.patch'\?\)"):
        top.finish()


def test_bool_is_not_an_int_and_choices_name_the_allowed_values() -> None:
    t = Table({"n": True, "backend": "gpu"}, source="y.toml", error=BundleError, prefix="engines.")
    with pytest.raises(BundleError, match=r"^y.toml: key 'engines.n' is True; expected int$"):
        t.get("n", int, 0)
    with pytest.raises(BundleError, match=r"key 'engines.backend' is 'gpu'; expected one of 'auto', 'cpu', 'tensorrt'"):
        t.choice("backend", EngineBackend, EngineBackend.AUTO)
    with pytest.raises(BundleError, match=r"key 'engines.missing' is missing; expected str"):
        t.require("missing", str)


def test_config_unknown_key_names_file_table_key_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[engines]\nbakend = "cpu"\n[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\n'
                    'tsl = true\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: unknown key(s) 'engines.bakend'") and "'engines.backend'" in text
    path.write_text('[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\ntsl = true\n')
    with pytest.raises(ConfigError,
                       match=r"unknown key\(s\) 'destinations\[0\].tsl' \(did you mean 'destinations\[0\].tls'\?\)"):
        load_config(path)


def test_config_choices_become_enums(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[engines]\nbackend = "cpu"\n[output]\nseg_type = "LABELMAP"\n')
    cfg = load_config(path)
    assert cfg.engine_backend is EngineBackend.CPU and cfg.seg_type is SegType.LABELMAP
    path.write_text('[output]\nseg_type = "FRACTIONAL"\n')
    with pytest.raises(ConfigError, match=r"key 'output.seg_type' is 'FRACTIONAL'; expected one of 'BINARY', "):
        load_config(path)


def _bundle_copy(tmp_path: Path, name: str, edit: tuple[str, str]) -> Path:
    directory = tmp_path / name
    shutil.copytree(ENGINES / name, directory)
    manifest = directory / "manifest.toml"
    text = manifest.read_text()
    assert edit[0] in text
    manifest.write_text(text.replace(edit[0], edit[1], 1))
    return directory


def test_shipped_manifests_read_with_enums() -> None:
    liver = load_bundle(ENGINES / "liver")
    assert liver.window.mode is WindowMode.SINGLE_BLOCK and liver.preprocess.crop is Crop.ABDOMEN
    assert load_bundle(ENGINES / "body-threshold").window.mode is WindowMode.SLIDING


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (("min_volume_ml = 10.0", "min_volume_ml = 10.0\nmin_volum_ml = 5.0"),
         r"unknown key\(s\) 'postprocess.min_volum_ml' \(did you mean 'postprocess.min_volume_ml'\?\)"),
        (('mode = "single-block"', 'mode = "single_block"'),
         r"key 'window.mode' is 'single_block'; expected one of 'sliding', 'single-block'"),
        (("threshold = 0.5", "threshold = true"), r"key 'postprocess.threshold' is True; expected float"),
        (("min_slices = 10", "min_slices = true"), r"key 'select.min_slices' is True; expected int"),
        (('rt_roi_type = "ORGAN"', 'rt_roi_type = "ORGAN"\ncolour = [1, 2, 3]'),
         r"unknown key\(s\) 'labels\[0\].colour'"),
        (("[coverage]", "[coverag]"), r"unknown key\(s\) 'coverag' \(did you mean 'coverage'\?\)"),
    ],
)
def test_manifest_errors_name_the_file_the_table_and_the_key(tmp_path: Path, edit: tuple[str, str],
                                                               needle: str) -> None:
    directory = _bundle_copy(tmp_path, "liver", edit)
    with pytest.raises(BundleError, match=needle) as err:
        load_bundle(directory)
    assert str(err.value).startswith(str(directory / "manifest.toml"))
