"""The count decisions of [completeness], on a counter that answers what the test says, and the index's part."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.assemble.completeness import Completeness, Verdict
from node.assemble.stable import Assembler
from node.config import CompletenessConfig, load_config
from node.errors import ConfigError, SendError
from node.model.enums import TimeoutAction
from node.model.records import InstanceMeta, SeriesRecord, SeriesState
from node.spool.index import Index

NOW = 1_700_000_000.0


def _series(count: int) -> SeriesRecord:
    return SeriesRecord("1.2.3", "1.2", "CT", "1.2.840.10008.5.1.4.1.1.2", count, NOW, NOW, SeriesState.RECEIVING, "")


def test_complete_wait_and_the_two_timeouts() -> None:
    answers: list[int | None] = [12]
    settings = CompletenessConfig(source="pacs", max_wait_s=60)
    check = Completeness(settings, lambda study, series: answers[-1])
    assert check.decide(_series(12), NOW).verdict is Verdict.COMPLETE
    first = check.decide(_series(6), NOW)
    assert first.verdict is Verdict.WAIT and first.note == "waiting: 6 of 12 instances per pacs, for 0 of at most 60 s"
    assert not check.due(_series(6), NOW + 1) and check.due(_series(6), NOW + 5)
    assert check.last("1.2.3") == first
    late = check.decide(_series(6), NOW + 61)
    assert late.verdict is Verdict.COMPLETE and "segmented as it is (on_timeout = proceed)" in late.note
    ignoring = Completeness(CompletenessConfig("pacs", max_wait_s=60, on_timeout=TimeoutAction.IGNORE),
                            lambda study, series: 12)
    ignoring.decide(_series(6), NOW)
    assert ignoring.decide(_series(6), NOW + 61).verdict is Verdict.IGNORE
    answers.append(None)
    assert check.decide(_series(6), NOW).note == "pacs does not hold this series; the quiet period decides"


def test_a_source_that_cannot_be_asked_leaves_it_to_the_quiet_period() -> None:
    def broken(study: str, series: str) -> int | None:
        raise SendError("could not associate with PACS@10.0.0.1:104: no connection")
    decision = Completeness(CompletenessConfig("pacs"), broken).decide(_series(3), NOW)
    assert decision.verdict is Verdict.QUIET and "no connection" in decision.note


def test_the_assembler_waits_then_dispatches_and_complete_forces(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    for k in range(6):
        meta = InstanceMeta(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.3", "CT", "1.2.840.10008.1.2.1")
        index.add_instance(meta, path=tmp_path / f"{k}.dcm", size=1, calling_ae="CT", quiet_period_s=5, now=NOW)
    check = Completeness(CompletenessConfig("pacs", check_after_s=1, recheck_s=1), lambda study, series: 12)
    assembler = Assembler(index, [], (), check)
    assert assembler.poll(NOW + 30) == 0  # quiet, past its quiet period, but 6 of 12: it waits
    series = index.series("1.2.3")
    assert series is not None and series.state is SeriesState.RECEIVING and series.note.startswith("waiting: 6 of 12")
    assert index.force_complete("1.2.3", now=NOW + 31) is not None
    assert [forced for _, forced in index.quiet_series(1, now=NOW + 31)] == [True]
    assert assembler.poll(NOW + 32) == 1
    series = index.series("1.2.3")
    assert series is not None and series.state is SeriesState.IGNORED  # no bundle here: the note says why
    assert series.note.startswith("no model applies")
    assert index.force_complete("9.9") is None


def test_the_source_must_be_a_destination(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[completeness]\nsource = "pacs"\n')
    with pytest.raises(ConfigError, match="key 'completeness.source' names 'pacs', which is not a"):
        load_config(path)
    path.write_text('[[destinations]]\nname = "pacs"\nae_title = "P"\nhost = "h"\nport = 1\n'
                    '[completeness]\nsource = "pacs"\nmax_wait_s = 30\non_timeout = "ignore"\n')
    settings = load_config(path).completeness
    assert (settings.source, settings.max_wait_s, settings.on_timeout) == ("pacs", 30, TimeoutAction.IGNORE)
