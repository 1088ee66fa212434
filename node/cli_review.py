"""``review`` and ``web``: the review gate from the command line, and logins for the web UI.

review list                        jobs awaiting review (oldest first), and recent decisions
review approve JOB [--note TEXT]   send the held copies of JOB's results
review reject JOB --reason TEXT    discard them, recording why
web add-user NAME                  prompt for a password and write its salted hash to the users file

A decision made here is recorded with the operating-system user's name (``NAME (cli)``); one made on the
web page with the reviewer's login.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Callable

from node.config import NodeConfig
from node.config_web import check_user_name, hash_password, write_user
from node.errors import NodeError
from node.model.records import OutboxState, ReviewDecision
from node.spool.commands import decide_review
from node.spool.queries import open_index, review_phrase, review_queue

#: The shortest password ``web add-user`` accepts.
MIN_PASSWORD = 10


def cli_reviewer() -> str:
    """The name a command-line decision is recorded under."""
    try:
        return f"{getpass.getuser()} (cli)"
    except (KeyError, OSError):
        return "unknown user (cli)"


def cmd_review_list(cfg: NodeConfig, args: argparse.Namespace) -> int:
    index = open_index(cfg)
    if index is None:
        print(f"no index at {cfg.index_path}: the service has not run with this state directory")
        return 1
    queue = review_queue(index)
    decided = index.reviews(limit=args.limit)
    if args.json:
        print(json.dumps({"awaiting": queue.as_dict(),
                          "decided": [r.__dict__ | {"decision": r.decision.value} for r in decided]}, indent=2))
        return 0
    if not queue.jobs:
        print("no job is awaiting review")
    for job in queue.jobs:
        held = sum(1 for o in index.job_outbox(job.id) if o.state is OutboxState.HELD)
        structures = ", ".join(f"{s.name} {s.volume_ml:.0f} mL" for s in job.structures) or "-"
        waited = time.time() - job.updated
        print(f"job {job.id}  {job.bundle}  series {job.series_uid}  waiting {waited / 60:.0f} min  "
              f"{held} held copies  structures: {structures}")
    if decided:
        print("\nrecent decisions:")
        for review in decided:
            print(f"job {review.job_id}  {review_phrase(review)}  ({review.released} copies)")
    return 0


def cmd_review_decide(cfg: NodeConfig, args: argparse.Namespace) -> int:
    index = open_index(cfg)
    if index is None:
        print(f"no index at {cfg.index_path}: the service has not run with this state directory")
        return 1
    decision = ReviewDecision.APPROVED if args.review_command == "approve" else ReviewDecision.REJECTED
    note = args.reason if decision is ReviewDecision.REJECTED else (args.note or "")
    review = decide_review(index, args.job, decision, reviewer=cli_reviewer(), note=note)
    what = "queued for sending" if decision is ReviewDecision.APPROVED else "discarded"
    print(f"job {review.job_id} {review_phrase(review)}; {review.released} held copies {what}")
    return 0


def cmd_web_add_user(cfg: NodeConfig, args: argparse.Namespace) -> int:
    name = check_user_name(args.name, "web add-user")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise NodeError("the two passwords differ; nothing was written")
    if len(password) < MIN_PASSWORD:
        raise NodeError(f"the password has {len(password)} characters; at least {MIN_PASSWORD} are needed")
    path = cfg.web_users_file
    new = write_user(path, name, hash_password(password))
    print(f"{'added' if new else 'changed the password of'} {name} in {path}"
          + ("" if cfg.web.users_file is not None else " (web.users_file: the default, in the state directory)"))
    return 0


def add_review_parsers(sub: argparse._SubParsersAction,
                       add_config: Callable[[argparse.ArgumentParser], None],
                       load: Callable[[argparse.Namespace], NodeConfig]) -> None:
    p = sub.add_parser("review", help="the review gate: list, approve, reject",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="review_command", required=True, metavar="VERB")

    def verb(name: str, helptext: str, run: Callable[[NodeConfig, argparse.Namespace], int]) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, help=helptext, description=helptext)
        add_config(v)
        v.set_defaults(func=lambda args: run(load(args), args))
        return v

    v = verb("list", "jobs awaiting review, and recent decisions", cmd_review_list)
    v.add_argument("--limit", type=int, default=20, help="recent decisions shown (default 20)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v = verb("approve", "send the held copies of a job's results", cmd_review_decide)
    v.add_argument("job", type=int, metavar="JOB", help="job id (see review list or status)")
    v.add_argument("--note", help="a note kept with the decision")
    v = verb("reject", "discard the held copies of a job's results, recording why", cmd_review_decide)
    v.add_argument("job", type=int, metavar="JOB", help="job id (see review list or status)")
    v.add_argument("--reason", required=True, help="why the results are rejected (kept with the decision)")

    p = sub.add_parser("web", help="the web UI's users", description="Logins for the web UI ([web] in the config).")
    verbs = p.add_subparsers(dest="web_command", required=True, metavar="VERB")
    v = verbs.add_parser("add-user", help="prompt for a password and write its salted hash",
                         description="Add a user (or change their password) in web.users_file.")
    add_config(v)
    v.add_argument("name", metavar="NAME", help="the login (also the reviewer's name in the audit record)")
    v.add_argument("--password-stdin", action="store_true", help="read the password from standard input (scripts)")
    v.set_defaults(func=lambda args: cmd_web_add_user(load(args), args))
