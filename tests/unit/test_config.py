from __future__ import annotations

from pathlib import Path

import pytest

from node.config import NodeConfig, load_config, parse_destination, with_overrides
from node.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_embedded_defaults() -> None:
    cfg = load_config(None)
    assert cfg == NodeConfig()
    assert cfg.port == 11112 and cfg.ae_title == "SEGNODE" and cfg.engine_backend == "cpu"
    assert (cfg.bundles_dir / "body-threshold" / "manifest.toml").is_file()


def test_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "config" / "node.example.toml")
    assert cfg.destinations[0].ae_title == "ORTHANC"


def test_relative_state_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[node]\nstate_dir = "st"\n'))
    assert cfg.state_dir == tmp_path / "st"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[node]\nport = 70000\n", "key 'node.port': 70000 is not a TCP port"),
        ('[node]\nport = "x"\n', "key 'node.port' is 'x'; expected int"),
        ("[node]\nae_title = \"THIS_TITLE_IS_TOO_LONG\"\n", "key 'node.ae_title'"),
        ("[node]\nprot = 1\n", "unknown key(s) 'node.prot'"),
        ("[assemble]\nquiet_period_s = -1\n", "key 'assemble.quiet_period_s' is -1.0"),
        ("[[destinations]]\nae_title = \"PACS\"\nport = 104\n", "key 'destinations[0].host' is missing"),
        ("[engines]\nbackend = \"gpu\"\n", "key 'engines.backend' is 'gpu'"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_overrides_and_destinations() -> None:
    cfg = with_overrides(NodeConfig(), port=4000, ae_title="NODE2", destinations=["PACS@127.0.0.1:4242"])
    assert cfg.port == 4000 and cfg.ae_title == "NODE2"
    assert str(cfg.destinations[0]) == "PACS@127.0.0.1:4242"
    with pytest.raises(ConfigError, match="AET@HOST:PORT"):
        parse_destination("PACS:4242")
    with pytest.raises(ConfigError, match="--port"):
        with_overrides(NodeConfig(), port=0)
