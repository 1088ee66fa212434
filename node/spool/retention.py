"""Retention: delete finished series (spool files, index rows, results) by age and by total size.

Policy (``[retention]`` in the config):

- ``keep_days``: a series is deleted once it is *finished* and its last activity (last instance
  received, last job update, last result delivered, last edited structure set compared on it) is older
  than this. Edited structure sets that come back (edit QA) are series of their own, kept and deleted like
  results: the CT they were compared on and the node's result stay as long as they do, so a comparison can
  be made again; the qa records (``qa_sets``, ``qa_structures``) are never deleted: ``qa report`` needs
  the history. Finished means: settled
  (not receiving), every job ended (done, failed or declined) and every outbox item sent. A series
  with queued or running jobs, pending results or dead letters is never deleted, however old: dead
  letters are kept so that ``retry`` can still resend them (and ``replay`` needs the files too).
- ``max_spool_gb``: when the spool plus the results exceed it, finished series are deleted oldest
  first (by last activity, regardless of ``keep_days``) until the total is under the limit. If
  only unfinished series are left, a warning says the limit cannot be met and what holds the space.
- ``interval_s``: a pass runs at the service's first loop turn and then at most this often. A pass
  spends at most ``PASS_BUDGET_S`` seconds (the main loop also pings the systemd watchdog); work left
  over continues at the next loop turn.

Order of a deletion, and why. The spool is the source of truth for received instances: at start
``node.spool.recover.reconcile`` indexes every spool file the index does not know. Deleting the rows
first and the files second would, after a crash in between, leave files that reconcile reads back
as a new series: it would be segmented again and its results sent again. Deleting the files first
leaves rows pointing at missing files, and a concurrent receive of a new instance of that series
could reopen it with files gone. So rows go first, but not blindly:

1. one transaction re-checks that the series is still finished (and old enough), deletes its rows
   (outbox, jobs, instances, series) and records its spool files and result folders in the table
   ``pending_deletions``;
2. the files and folders are removed (spool files in chunks while holding the index's lock, skipping
   any path an instance row refers to again: a copy received again meanwhile is kept);
3. at the end of the pass the folders that lost entries are fsynced (so a power cut cannot bring a
   file back once its journal row is gone), then those ``pending_deletions`` rows are cleared.

A crash after 1 leaves the files listed in ``pending_deletions``. At start the service finishes
those deletions (:meth:`Retention.finish_pending`) *before* ``reconcile`` runs, so reconcile never
sees them and nothing is resurrected. A power cut that rolls back step 1 (WAL, synchronous=NORMAL)
after files were removed leaves rows of a finished series whose files are partly gone; it is still
finished, so the next pass deletes it again (removal tolerates missing files).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.config import NodeConfig
from node.model.records import SeriesState
from node.spool.index import Index, SeriesUsage

log = logging.getLogger(__name__)

#: Seconds one pass may spend deleting before it yields to the rest of the main loop.
PASS_BUDGET_S = 5.0
#: Spool files removed per hold of the index lock (the receiver waits for it to record an instance).
_CHUNK = 200
_DAY_S = 86400.0
_GB = 1e9


@dataclass
class PassReport:
    """What one retention pass did."""

    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    total_bytes: int = 0  # spool + results after the pass
    limit_unmet: bool = False
    complete: bool = True  # False: the time budget ran out with deletable series left


@dataclass(frozen=True)
class RetentionFigures:
    """Retention at a glance, for ``status``."""

    spool_bytes: int
    instance_count: int
    results_bytes: int
    series_count: int
    oldest_activity_age_s: float | None  # the least recently active series
    oldest_received_age_s: float | None  # the series received first
    deletable_now: int  # finished and past keep_days: the next pass deletes them
    held: int  # not finished (receiving, jobs queued/running, results pending or dead letters)
    held_dead_letters: int  # of those, with dead letters
    keep_days: float
    max_spool_gb: float

    @property
    def total_bytes(self) -> int:
        return self.spool_bytes + self.results_bytes

    def as_dict(self) -> dict[str, object]:
        return {
            "spool_bytes": self.spool_bytes,
            "instance_count": self.instance_count,
            "results_bytes": self.results_bytes,
            "total_bytes": self.total_bytes,
            "series_count": self.series_count,
            "oldest_activity_age_s": self.oldest_activity_age_s,
            "oldest_received_age_s": self.oldest_received_age_s,
            "deletable_now": self.deletable_now,
            "held": self.held,
            "held_dead_letters": self.held_dead_letters,
            "keep_days": self.keep_days,
            "max_spool_gb": self.max_spool_gb,
        }


def format_age(seconds: float | None) -> str:
    """``3.2 days``, ``5.0 h``, ``12.0 min``, ``40 s``; ``-`` for None."""
    if seconds is None:
        return "-"
    for unit, size in (("days", _DAY_S), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (0 if it does not exist)."""
    total = 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


def figures(cfg: NodeConfig, index: Index, now: float | None = None) -> RetentionFigures:
    now = time.time() if now is None else now
    usage = index.series_usage()
    cutoff = now - cfg.retention_keep_days * _DAY_S
    held = [u for u in usage if not u.finished]
    first_received = min((s.first_received for s in index.all_series()), default=None)
    return RetentionFigures(
        spool_bytes=index.spool_bytes(),
        instance_count=index.instance_count(),
        results_bytes=tree_bytes(cfg.results_dir),
        series_count=len(usage),
        oldest_activity_age_s=(now - usage[0].last_activity) if usage else None,
        oldest_received_age_s=(now - first_received) if first_received is not None else None,
        deletable_now=sum(1 for u in usage if u.finished and u.last_activity <= cutoff),
        held=len(held),
        held_dead_letters=sum(1 for u in held if u.dead),
        keep_days=cfg.retention_keep_days,
        max_spool_gb=cfg.retention_max_spool_gb,
    )


class Retention:
    """Deletes finished series by age and size; one per service, driven by the main loop."""

    def __init__(self, cfg: NodeConfig, index: Index) -> None:
        self.cfg = cfg
        self.index = index
        self._next_run: float | None = None  # time.monotonic() of the next pass; None: at the first call
        # Removed (or already gone, or received again) since the last flush, and the folders that
        # lost entries: their journal rows are cleared once those folders are fsynced.
        self._done: list[Path] = []
        self._touched: set[Path] = set()

    # ------------------------------------------------------------------ scheduling
    def maybe_run(self, tick: float | None = None) -> PassReport | None:
        """Run a pass if one is due (the first call always runs); ``tick`` is ``time.monotonic()``."""
        tick = time.monotonic() if tick is None else tick
        if self._next_run is not None and tick < self._next_run:
            return None
        self._next_run = tick + self.cfg.retention_interval_s  # also after a pass that raised
        report = self.run()
        if not report.complete:  # the time budget ran out: go on at the next loop turn
            self._next_run = tick
        return report

    # ------------------------------------------------------------------ one pass
    def run(self, now: float | None = None, budget_s: float = PASS_BUDGET_S) -> PassReport:
        """Delete what the policy allows: past ``keep_days`` first, then oldest first over ``max_spool_gb``."""
        now = time.time() if now is None else now
        deadline = time.monotonic() + budget_s
        report = PassReport()
        self.finish_pending()  # anything an interrupted pass left behind
        try:
            self._pass(now, deadline, report)
        finally:
            self._flush()
        if report.deleted:
            log.info("retention: deleted %d series, freed %.1f MB; spool and results now %.1f MB",
                     len(report.deleted), report.freed_bytes / 1e6, report.total_bytes / 1e6)
        return report

    def _pass(self, now: float, deadline: float, report: PassReport) -> None:
        cutoff = now - self.cfg.retention_keep_days * _DAY_S
        for usage in self.index.series_usage():
            if usage.last_activity > cutoff:
                break  # ordered by last activity: the rest are younger
            if not usage.finished:
                continue
            if time.monotonic() > deadline:
                report.complete = False
                break
            self._delete(usage, not_after=cutoff, now=now, report=report,
                         reason=f"older than keep_days = {self.cfg.retention_keep_days:g}")
        limit = int(self.cfg.retention_max_spool_gb * _GB)
        total = self.index.spool_bytes() + tree_bytes(self.cfg.results_dir)
        if limit and total > limit and report.complete:
            usage_list = self.index.series_usage()
            for usage in usage_list:
                if total <= limit:
                    break
                if not usage.finished:
                    continue
                if time.monotonic() > deadline:
                    report.complete = False
                    break
                total -= self._delete(usage, not_after=float("inf"), now=now, report=report,
                                      reason="spool and results over max_spool_gb = "
                                             f"{self.cfg.retention_max_spool_gb:g}")
            if total > limit and report.complete:
                report.limit_unmet = True
                self._warn_limit(total, limit, [u for u in self.index.series_usage() if not u.finished])
        report.total_bytes = total

    def _delete(self, usage: SeriesUsage, *, not_after: float, now: float, report: PassReport, reason: str) -> int:
        """Delete one series (if still finished); return the bytes freed."""
        deleted = self.index.delete_series(usage.series_uid, not_after=not_after,
                                           result_dir_of=self.cfg.job_result_dir, now=now)
        if deleted is None:
            return 0
        freed = deleted.spool_bytes + sum(tree_bytes(d) for d in deleted.dirs)
        self._remove(deleted.files, deleted.dirs)
        report.deleted.append(deleted.series_uid)
        report.freed_bytes += freed
        log.info("retention: deleted series %s (%d instance(s) and its results, %.1f MB; last activity %s ago): %s",
                 deleted.series_uid, deleted.instance_count, freed / 1e6, format_age(now - deleted.last_activity),
                 reason)
        return freed

    def _warn_limit(self, total: int, limit: int, held: list[SeriesUsage]) -> None:
        receiving = sum(1 for u in held if u.state is SeriesState.RECEIVING)
        active = sum(1 for u in held if u.state is not SeriesState.RECEIVING and u.active_jobs)
        dead = sum(1 for u in held if u.dead)
        pending = sum(1 for u in held if u.pending and not u.dead)
        log.warning(
            "retention: spool and results hold %.2f GB, over retention.max_spool_gb = %.2f GB, and the limit "
            "cannot be met: the %d series left are not finished and are never deleted (%d still receiving, "
            "%d with jobs queued or running, %d with results waiting to be sent, %d with dead letters; "
            "`dicom-seg-node status` lists them, `retry` resends dead letters)",
            total / _GB, limit / _GB, len(held), receiving, active, pending, dead)

    # ------------------------------------------------------------------ removal
    def finish_pending(self) -> int:
        """Remove files and folders whose rows an earlier (interrupted) pass deleted; return how many.

        Called at start before ``reconcile`` (see the module docstring), and at each pass.
        """
        files, dirs = self.index.pending_deletions()
        if files or dirs:
            self._remove(files, dirs)
            self._flush()
            log.info("retention: finished an interrupted deletion: %d spool file(s), %d result folder(s)",
                     len(files), len(dirs))
        return len(files) + len(dirs)

    def _remove(self, files: list[Path], dirs: list[Path]) -> None:
        done, touched = self._done, self._touched
        for start in range(0, len(files), _CHUNK):
            chunk = files[start:start + _CHUNK]
            with self.index.locked():  # the receiver cannot record one of these paths meanwhile
                again = self.index.referenced_instance_paths(chunk)
                for path in chunk:
                    if str(path) in again:
                        log.info("retention: kept %s: the instance was received again meanwhile", path)
                    else:
                        try:
                            path.unlink(missing_ok=True)
                        except OSError as exc:
                            log.error("retention: could not remove spool file %s (will try again): %s", path, exc)
                            continue
                        touched.add(path.parent)
                    done.append(path)
        results_root = self.cfg.results_dir.resolve()
        for directory in dirs:
            if not directory.resolve().is_relative_to(results_root):
                log.error("retention: left %s alone: it is not inside the results folder %s", directory, results_root)
                done.append(directory)
                continue
            try:
                shutil.rmtree(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("retention: could not remove result folder %s (will try again): %s", directory, exc)
                continue
            touched.add(directory.parent)
            done.append(directory)

    def _flush(self) -> None:
        """Make the removals durable (fsync the folders that lost entries), then clear their journal rows.

        Once per pass rather than per series: a series' spool files are spread over up to 256 folders.
        """
        for directory in self._touched:
            _fsync_dir(directory)
        if self._done:
            self.index.clear_pending_deletions(self._done)
        self._done, self._touched = [], set()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
