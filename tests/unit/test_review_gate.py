"""The review gate on a real index: held copies, decisions made once, retention, config, logins, the CLI."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from node.cli import main
from node.config import Destination, NodeConfig, check_bundle_names, load_config
from node.config_web import hash_password, read_users_file, verify_password, write_user
from node.errors import ConfigError, Conflict, NotFound, Permanent
from node.model.records import InstanceMeta, JobState, OutboxState, ReviewDecision, StructureVolume
from node.send.routing import held_destinations
from node.spool.commands import decide_review, plan_replay
from node.spool.index import Index
from node.spool.queries import review_queue, status_report
from node.web.auth import LOCAL_USER, LoginLimiter
from node.web.context import WebContext

NOW = 1_700_000_000.0
CT = "1.2.840.10008.5.1.4.1.1.2"


def _held_job(index: Index, tmp_path: Path, uid: str = "1.2.3", held: tuple[str, ...] = ("tps",)) -> int:
    """A series with one finished job whose copies go to 'pacs' and 'tps'; those in ``held`` wait for review."""
    meta = InstanceMeta(f"{uid}.1", CT, "1.2", uid, "CT", "1.2.840.10008.1.2.1")
    index.add_instance(meta, path=tmp_path / "x.dcm", size=10, calling_ae="CT1", quiet_period_s=1, now=NOW)
    (job_id,) = index.dispatch(uid, ["body@1"], now=NOW)
    assert index.claim_job("w", now=NOW) is not None
    outbox = [(dest, tmp_path / f"{kind}-{uid}.dcm", f"2.25.{job_id}{n}{i}", "1.2.840.10008.5.1.4.1.1.481.3", "all")
              for i, dest in enumerate(("pacs", "tps")) for n, kind in enumerate(("SEG", "RTSTRUCT"))]
    index.finish_job(job_id, result_dir=str(tmp_path), timings='{"total": 1.0}', outbox=outbox, now=NOW,
                     held=held, structures=[StructureVolume("BODY", 1234.5)])
    return job_id


def _states(index: Index, job_id: int) -> dict[str, set[OutboxState]]:
    found: dict[str, set[OutboxState]] = {}
    for item in index.job_outbox(job_id):
        found.setdefault(item.destination, set()).add(item.state)
    return found


def test_held_copies_wait_and_an_approval_sends_them_once(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    job_id = _held_job(index, tmp_path)
    job = index.job(job_id)
    assert job is not None and job.state is JobState.AWAITING_REVIEW
    assert job.structures == (StructureVolume("BODY", 1234.5),)
    assert _states(index, job_id) == {"pacs": {OutboxState.PENDING}, "tps": {OutboxState.HELD}}
    assert {i.destination for i in index.due_outbox(now=NOW + 1)} == {"pacs"}  # the held copies are not due
    queue = review_queue(index, now=NOW + 90)
    assert [j.id for j in queue.jobs] == [job_id] and queue.oldest_age_s == 90.0

    review = decide_review(index, job_id, ReviewDecision.APPROVED, reviewer="alice", note="  fine  ", now=NOW + 100)
    assert (review.reviewer, review.note, review.released) == ("alice", "fine", 2)
    assert _states(index, job_id)["tps"] == {OutboxState.PENDING}
    assert {i.destination for i in index.due_outbox(now=NOW + 101)} == {"pacs", "tps"}
    assert index.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    with pytest.raises(Conflict, match=f"job {job_id} was already approved by alice at .*; a decision is final"):
        decide_review(index, job_id, ReviewDecision.APPROVED, reviewer="bob")
    with pytest.raises(Conflict, match="already approved"):
        decide_review(index, job_id, ReviewDecision.REJECTED, reviewer="bob", note="too late")
    assert review_queue(index).jobs == []
    report = status_report(NodeConfig(state_dir=tmp_path), index)
    (shown,) = report.jobs
    assert shown.review == review and shown.detail.startswith("approved by alice at ")
    assert report.as_dict()["jobs"][0]["review"]["reviewer"] == "alice"  # type: ignore[index]


def test_a_rejection_needs_a_reason_discards_the_held_copies_and_is_final(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    job_id = _held_job(index, tmp_path)
    with pytest.raises(Permanent, match=f"rejecting job {job_id} needs a reason"):
        decide_review(index, job_id, ReviewDecision.REJECTED, reviewer="alice", note="   ")
    with pytest.raises(Permanent, match="at most 2000 are kept"):
        decide_review(index, job_id, ReviewDecision.REJECTED, reviewer="alice", note="x" * 2001)
    decide_review(index, job_id, ReviewDecision.REJECTED, reviewer="alice", note="BODY misses the arm", now=NOW + 5)
    assert _states(index, job_id) == {"pacs": {OutboxState.PENDING}, "tps": {OutboxState.DISCARDED}}
    job = index.job(job_id)
    assert job is not None and job.state is JobState.REJECTED and job.error == "rejected by alice: BODY misses the arm"
    assert {i.destination for i in index.due_outbox(now=NOW + 10)} == {"pacs"}
    with pytest.raises(Conflict, match="already rejected by alice"):
        decide_review(index, job_id, ReviewDecision.APPROVED, reviewer="bob")
    with pytest.raises(Permanent, match="has no finished job with results"):
        plan_replay(index, NodeConfig(state_dir=tmp_path), "1.2.3")  # a rejected result is never replayed


def test_unknown_and_never_held_jobs_are_named(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    plain = _held_job(index, tmp_path, held=())
    assert index.job(plain).state is JobState.DONE  # type: ignore[union-attr]
    with pytest.raises(NotFound, match="job 4242 is not in the index"):
        decide_review(index, 4242, ReviewDecision.APPROVED, reviewer="alice")
    with pytest.raises(Conflict, match=f"job {plain} is done, not awaiting review"):
        decide_review(index, plain, ReviewDecision.APPROVED, reviewer="alice")


def test_awaiting_review_survives_a_restart_and_retention_keeps_it(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    job_id = _held_job(index, tmp_path)
    index.close()
    index = Index(tmp_path / "index.sqlite3")
    assert [j.id for j in index.awaiting_review()] == [job_id]
    (usage,) = index.series_usage()
    assert usage.active_jobs == 1 and not usage.finished
    assert index.delete_series("1.2.3", not_after=NOW + 365 * 86400, result_dir_of=lambda i: tmp_path) is None
    with pytest.raises(Permanent, match="awaiting review"):
        plan_replay(index, NodeConfig(state_dir=tmp_path), "1.2.3")


def test_which_destinations_hold_copies(tmp_path: Path) -> None:
    pacs = Destination("pacs", "PACS", "h", 1)
    tps = Destination("tps", "TPS", "h", 2, review=True)
    cfg = NodeConfig(destinations=(pacs, tps), review_bundles=("liver",))
    rows = [("pacs", tmp_path, "1", "c", ""), ("tps", tmp_path, "2", "c", "")]
    assert held_destinations(cfg, "body-lungs", rows) == {"tps"}
    assert held_destinations(cfg, "liver", rows) == {"pacs", "tps"}


def test_web_and_review_config(tmp_path: Path) -> None:
    stored = hash_password("a long enough secret")
    path = tmp_path / "node.toml"
    path.write_text(f'[web]\nusers_file = "users"\nlogin_attempts = 3\n[web.users]\nalice = "{stored}"\n'
                    '[bundles.liver]\nreview = true\n'
                    '[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "h"\nport = 104\nreview = true\n')
    cfg = load_config(path)
    assert cfg.web.users == (("alice", stored),) and cfg.web_users_file == tmp_path / "users"
    assert cfg.web.login_attempts == 3 and cfg.review_bundles == ("liver",) and cfg.destinations[0].review
    check_bundle_names(cfg, ["liver", "body-lungs"])
    with pytest.raises(ConfigError, match=r"key 'bundles.liver.review' names 'liver', which is not an installed"):
        check_bundle_names(cfg, ["body-lungs"])
    assert NodeConfig(state_dir=tmp_path).web_users_file == tmp_path / "web-users"


@pytest.mark.parametrize(("text", "needle"), [
    ('[web.users]\nalice = "secret"\n', r"key 'web.users.alice'.*not a password hash"),
    ('[web.users]\n"al ice" = "scrypt$1$1$1$AA==$AA=="\n', "user name 'al ice' is not"),
    ("[web]\nlogin_atempts = 3\n", "did you mean 'web.login_attempts'"),
    ("[bundles.liver]\nreviw = true\n", "did you mean 'bundles.liver.review'"),
])
def test_web_config_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_passwords_are_kept_as_salted_hashes_in_an_owner_only_file(tmp_path: Path) -> None:
    first, second = hash_password("same password"), hash_password("same password")
    assert first != second and first.startswith("scrypt$") and "same password" not in first  # salted
    assert verify_password("same password", first) and not verify_password("Same password", first)
    assert not verify_password("x", "not a hash")
    path = tmp_path / "users"
    assert write_user(path, "alice", first) and not write_user(path, "alice", second)
    assert read_users_file(path) == {"alice": second}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    path.write_text("alice\n")
    with pytest.raises(ConfigError, match=f"{path}: line 1: expected NAME:HASH"):
        read_users_file(path)


def test_failed_logins_are_limited_per_key_within_the_window() -> None:
    limiter = LoginLimiter(attempts=3, window_s=60)
    keys = ["address:10.0.0.1", "user:alice"]
    for t in (0.0, 1.0):
        limiter.failed(keys, now=t)
    assert limiter.blocked_for(keys, now=2.0) == 0
    limiter.failed(["address:10.0.0.9", "user:alice"], now=3.0)  # a third failure for alice, from elsewhere
    assert limiter.blocked_for(["address:10.0.0.2", "user:alice"], now=4.0) == pytest.approx(56.0)
    assert limiter.blocked_for(["address:10.0.0.2", "user:bob"], now=4.0) == 0
    assert limiter.blocked_for(keys, now=61.0) == 0  # the first failure left the window


def _request(host: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": [], "client": (host, 5000),
                    "session": {}, "query_string": b""})


def test_without_users_only_this_machines_browser_gets_the_pages(tmp_path: Path) -> None:
    cfg = NodeConfig(state_dir=tmp_path)
    ctx = WebContext(cfg, Index(cfg.index_path))
    assert ctx.viewer(_request("127.0.0.1")).name == LOCAL_USER
    assert ctx.viewer(_request("::1")).name == LOCAL_USER
    with pytest.raises(HTTPException) as refused:
        ctx.viewer(_request("10.1.2.3"))
    assert refused.value.status_code == 403 and "web add-user" in str(refused.value.detail)
    write_user(cfg.web_users_file, "alice", hash_password("a long enough secret"))
    with pytest.raises(HTTPException) as login:  # a user exists now: everyone logs in, loopback too
        ctx.viewer(_request("127.0.0.1"))
    assert login.value.status_code == 401


def test_the_review_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = Index(tmp_path / "index.sqlite3")
    approve, reject = _held_job(index, tmp_path, "1.2.3"), _held_job(index, tmp_path, "1.2.4")
    index.close()
    state = ["--state-dir", str(tmp_path)]
    assert main(["review", "list", *state]) == 0
    listed = capsys.readouterr().out
    assert f"job {approve}  body@1  series 1.2.3" in listed and "BODY 1234 mL" in listed and "2 held copies" in listed
    assert main(["review", "approve", str(approve), "--note", "ok", *state]) == 0
    assert "approved by" in capsys.readouterr().out
    assert main(["review", "approve", str(approve), *state]) == 2
    assert "a decision is final" in capsys.readouterr().err
    assert main(["review", "reject", str(reject), "--reason", "wrong patient outline", *state]) == 0
    assert "2 held copies discarded" in capsys.readouterr().out
    assert main(["review", "approve", "99", *state]) == 2
    assert "job 99 is not in the index" in capsys.readouterr().err
