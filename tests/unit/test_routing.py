"""Routing: rules and destination routes read from the config (errors naming the key), the decisions with
their sentences, the assembler and the queue on a real SQLite index (ignore by rule, priority, round-robin
across senders), the worker's routing of result objects, ``route --explain`` and the index migration."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node.assemble.explain import explain_series
from node.assemble.stable import Assembler
from node.config import Destination, NodeConfig, check_bundle_names, load_config
from node.errors import ConfigError
from node.infer.manifest import discover_bundles
from node.model.enums import ObjectKind, RuleAction
from node.model.records import InstanceMeta, SeriesState
from node.model.routing import Conditions, Route, Rule, SourceFacts, first_rule
from node.send.routing import route_results
from node.spool.index import Index
from node.write.files import WrittenObject

ENGINES = Path(__file__).resolve().parents[2] / "engines"
CT = "1.2.840.10008.5.1.4.1.1.2"

CONFIG = """
[[rules]]
name = "physics-qa"
action = "ignore"
[rules.when]
calling_ae = ["QA_PHYS"]

[[rules]]
name = "emergency"
action = "segment"
bundles = ["body-threshold"]
priority = 10
[rules.when]
calling_ae = ["CT_ER"]

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
objects = ["SEG"]

[[destinations]]
name = "tps"
ae_title = "ARIA"
host = "127.0.0.1"
port = 105
objects = ["RTSTRUCT"]
bundles = ["body-threshold"]
[destinations.when]
calling_ae = ["CT_SIM1"]
study_description = "(?i)planning|rtp"
"""


def _config(tmp_path: Path, text: str = CONFIG) -> NodeConfig:
    path = tmp_path / "node.toml"
    path.write_text(f'[engines]\nbundles_dir = "{ENGINES}"\n' + text)
    return load_config(path)


def test_rules_and_routes_are_read_into_types(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    qa, er = cfg.rules
    assert qa.action is RuleAction.IGNORE and qa.when.calling_ae == ("QA_PHYS",) and er.priority == 10
    pacs, tps = cfg.destinations
    assert pacs.route.objects == {ObjectKind.SEG} and not pacs.route.bundles and pacs.route.when.empty
    assert tps.route.objects == {ObjectKind.RTSTRUCT} and tps.route.bundles == ("body-threshold",)
    assert tps.route.when.study_description is not None and tps.route.when.study_description.search("RTP Thorax")
    assert Destination("x", "X", "h", 1).route.everything


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[rules]]\naction = "segment"\n[rules.when]\nstudy_description = "(unclosed"\n',
         "key 'rules[0].when.study_description' is '(unclosed', which is not a valid regular expression"),
        ('[[destinations]]\nae_title = "P"\nhost = "h"\nport = 1\nobjects = ["SEG", "PDF"]\n',
         "key 'destinations[0].objects' holds 'PDF'; expected any of 'SEG', 'RTSTRUCT', 'SC'"),
        ('[[rules]]\naction = "drop"\n', "key 'rules[0].action' is 'drop'; expected one of 'segment', 'ignore'"),
        ('[[rules]]\naction = "ignore"\nbundles = ["liver"]\n', "key 'rules[0].bundles' is set, but an 'ignore'"),
        ('[[rules]]\naction = "ignore"\n[rules.when]\ncalling_ae = ["WAY_TOO_LONG_AE_TITLE"]\n',
         "key 'rules[0].when.calling_ae'"),
        ('[[rules]]\naction = "ignore"\n[rules.when]\ncaling_ae = ["X"]\n',
         "unknown key(s) 'rules[0].when.caling_ae' (did you mean 'rules[0].when.calling_ae'?)"),
        ('[metrics]\nport = 70000\n', "key 'metrics.port': 70000 is not a TCP port"),
    ],
)
def test_bad_routing_config_names_the_key_and_the_value(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, text)
    assert needle in str(err.value)


def test_a_bundle_named_in_routing_must_be_installed(tmp_path: Path) -> None:
    cfg = _config(tmp_path, '[[destinations]]\nae_title = "P"\nhost = "h"\nport = 1\nbundles = ["livr"]\n')
    with pytest.raises(ConfigError, match=r"key 'destinations\[0\].bundles' names 'livr', which is not an installed "
                                          r"bundle \(installed: body-lungs, liver\)"):
        check_bundle_names(cfg, ["body-lungs", "liver"])


def test_first_rule_wins_and_says_why() -> None:
    rules = (Rule("qa", RuleAction.IGNORE, Conditions(calling_ae=("QA",))),
             Rule("all-ct", RuleAction.SEGMENT, Conditions(modality=("CT",)), priority=3))
    qa = first_rule(rules, SourceFacts("QA", "CT", "", ""))
    assert qa.ignored and qa.reason == "ignored by rule 'qa' (calling AE in ['QA'])"
    ct = first_rule(rules, SourceFacts("CT1", "CT", "", ""))
    assert not ct.ignored and ct.priority == 3 and ct.reason.startswith("segmented by rule 'all-ct'")
    none = first_rule(rules, SourceFacts("MR1", "MR", "", ""))
    assert none.rule is None and none.priority == 0 and none.allows("liver")


def _objects(tmp_path: Path) -> list[WrittenObject]:
    return [WrittenObject("SEG", tmp_path / "seg.dcm", "9.1", "1.2.840.10008.5.1.4.1.1.66.4"),
            WrittenObject("RTSTRUCT", tmp_path / "rt.dcm", "9.2", "1.2.840.10008.5.1.4.1.1.481.3")]


def test_results_are_routed_per_destination_with_a_note(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    planning = SourceFacts("CT_SIM1", "CT", "RTP thorax", "")
    routed = route_results(cfg.destinations, "body-threshold", _objects(tmp_path), planning)
    assert [(d, uid) for d, _, uid, _, _ in routed.outbox] == [("pacs", "9.1"), ("tps", "9.2")]
    assert routed.outbox[1][4] == ("RTSTRUCT of ['body-threshold'] when calling AE in ['CT_SIM1'] and study "
                                   "description ~ '(?i)planning|rtp'")
    assert routed.note == "sent to pacs (SEG), tps (RTSTRUCT)"
    other = route_results(cfg.destinations, "body-threshold", _objects(tmp_path), SourceFacts("CT9", "CT", "", ""))
    assert [d for d, *_ in other.outbox] == ["pacs"]
    assert other.note == "sent to pacs (SEG); not to tps: calling AE 'CT9' is not one of ['CT_SIM1']"
    nowhere = route_results(cfg.destinations[1:], "liver", _objects(tmp_path), planning)
    assert nowhere.outbox == [] and nowhere.note.startswith("sent nowhere: tps: takes ['RTSTRUCT'], not SEG; takes "
                                                            "bundles ['body-threshold'], not liver")
    assert route_results((), "liver", _objects(tmp_path), planning).note == "no destination is configured"


def _receive(index: Index, series: str, calling_ae: str, study: str = "", now: float = 100.0) -> None:
    for i in range(12):  # enough slices for every bundle's min_slices
        meta = InstanceMeta(f"{series}.{i}", CT, "1.2", series, "CT", "1.2.840.10008.1.2.1", study, "")
        index.add_instance(meta, path=Path(f"/x/{series}.{i}"), size=1, calling_ae=calling_ae, quiet_period_s=1,
                           now=now)


def test_assembler_applies_rules_and_the_queue_is_fair(tmp_path: Path) -> None:
    cfg = _config(tmp_path, CONFIG.replace('bundles = ["body-threshold"]\npriority', 'bundles = ["body-lungs"]\n'
                                           'priority'))
    bundles = discover_bundles(ENGINES, ("body-threshold", "body-lungs"))
    index = Index(tmp_path / "i.sqlite3")
    for n in range(3):  # a long queue from one scanner first ...
        _receive(index, f"1.1.{n}", "CT_SIM1", now=100 + n)
    _receive(index, "1.2.1", "CT_OTHER", now=104)  # ... then one series from another
    _receive(index, "1.3.1", "QA_PHYS", now=105)
    _receive(index, "1.4.1", "CT_ER", now=106)  # the emergency scanner, last in
    Assembler(index, bundles, cfg.rules).poll()
    qa = index.series("1.3.1")
    assert qa is not None and qa.state is SeriesState.IGNORED
    assert qa.note == "ignored by rule 'physics-qa' (calling AE in ['QA_PHYS'])" and qa.calling_ae == "QA_PHYS"
    assert [j.bundle for j in index.series_jobs("1.4.1")] == ["body-lungs@1.0.0"]  # narrowed by the rule
    order = []
    while (job := index.claim_job("w")) is not None:
        order.append((job.series_uid, job.calling_ae))
    assert order[0] == ("1.4.1", "CT_ER")  # priority 10 first
    senders = [ae for _, ae in order[1:]]
    assert senders[:2] == ["CT_SIM1", "CT_OTHER"] or senders[:2] == ["CT_OTHER", "CT_SIM1"], order
    assert senders.count("CT_OTHER") == 2 and senders.index("CT_OTHER") <= 1  # not behind CT_SIM1's six jobs


def test_route_explain_lays_out_every_decision(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    bundles = discover_bundles(ENGINES, ("body-threshold", "body-lungs"))
    index = Index(tmp_path / "i.sqlite3")
    _receive(index, "1.5", "CT_SIM1", study="Planning CT")
    series = index.series("1.5")
    assert series is not None
    lines = explain_series(cfg, bundles, series).lines()
    text = "\n".join(lines)
    assert "physics-qa (ignore, priority 0, when calling AE in ['QA_PHYS']): does not match: calling AE " \
           "'CT_SIM1' is not one of ['QA_PHYS']" in text
    assert "decision: no rule matched: segmented with every bundle that applies" in text
    assert "tps (ARIA@127.0.0.1:105" in text and "body-threshold → RTSTRUCT (takes ['RTSTRUCT'], not SEG)" in text
    assert "body-lungs → nothing" in text


def test_an_index_written_by_an_older_node_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE series (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, modality TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL, instance_count INTEGER NOT NULL, first_received REAL NOT NULL,
            last_received REAL NOT NULL, settle_at REAL NOT NULL, open_associations INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL, note TEXT NOT NULL DEFAULT '');
        INSERT INTO series VALUES ('1.9', '1.2', 'CT', '1.2.840.10008.5.1.4.1.1.2', 3, 1, 2, 3, 0, 'dispatched', '');
    """)
    db.commit()
    db.close()
    index = Index(path)
    old = index.series("1.9")
    assert old is not None and old.instance_count == 3 and old.calling_ae == "" and old.study_description == ""
    (job,) = index.dispatch("1.9", ["b@1"])
    claimed = index.claim_job("w")
    assert claimed is not None and claimed.id == job and claimed.priority == 0


def test_default_route_takes_everything(tmp_path: Path) -> None:
    facts = SourceFacts("A", "CT", "", "")
    assert Route().mismatch(ObjectKind.SC, "liver", facts) is None
    assert Route(objects=frozenset({ObjectKind.SEG})).mismatch(ObjectKind.SC, "liver", facts) == \
        "takes ['SEG'], not SC"
