"""The pages (GET): the series list, a series with its jobs, the outbox, the review queue, the login form.

Each reads the index through ``node.spool.queries`` (the same answers ``status`` prints). Patient names are
shown only to a logged-in user, on the series page; URLs and the log carry UIDs and job ids only.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from node.model.enums import JobKind
from node.model.records import JobRecord, JobState, OutboxState, SeriesState
from node.spool.queries import review_queue, series_detail
from node.web.context import WebContext

#: Rows on the series list and the outbox page.
PAGE_ROWS = 200


def _choice(value: str | None, allowed: list[str]) -> str:
    return value if value in allowed else ""


async def series_list(ctx: WebContext, request: Request) -> Response:
    """Newest series first, filtered by state, calling AE and modality, with their jobs' states."""
    viewer = ctx.viewer(request)
    everything = ctx.index.all_series()[::-1]
    states = [s.value for s in SeriesState]
    state = _choice(request.query_params.get("state"), states)
    ae = request.query_params.get("ae", "").strip()
    modalities = sorted({s.modality for s in everything})
    modality = _choice(request.query_params.get("modality"), modalities)
    shown = [s for s in everything
             if (not state or s.state.value == state) and (not ae or s.calling_ae == ae)
             and (not modality or s.modality == modality)][:PAGE_ROWS]
    jobs: dict[str, list[JobRecord]] = defaultdict(list)
    for job in ctx.index.jobs(limit=PAGE_ROWS * 4):
        jobs[job.series_uid].append(job)
    return ctx.page(request, "series_list.html", viewer, series=shown, jobs=jobs, total=len(everything),
                    states=states, modalities=modalities, callers=sorted({s.calling_ae for s in everything}),
                    chosen={"state": state, "ae": ae, "modality": modality},
                    awaiting=len(ctx.index.awaiting_review()))


def _patient_name(ctx: WebContext, series_uid: str) -> str:
    """PatientName from the series' first stored instance ('' when none can be read)."""
    for path in ctx.index.instance_paths(series_uid)[:1]:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientName"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            return ""
        return str(ds.get("PatientName", "") or "")
    return ""


async def series_page(ctx: WebContext, request: Request) -> Response:
    """One series: its jobs (state, reason, timings, preview, structures, deliveries, review) and replay."""
    viewer = ctx.viewer(request)
    uid = request.path_params["uid"]
    detail = series_detail(ctx.index, uid)
    if detail is None:
        raise HTTPException(404, f"series {uid} is not in the index: it was never received here, or retention "
                                 "deleted it")
    previews = {j.job.id: _preview_path(ctx, j.job) is not None for j in detail.jobs}
    finished = any(j.job.state is JobState.DONE and j.job.kind is JobKind.SEGMENT for j in detail.jobs)
    # Edit QA: the edited sets that came back for this CT, or (an RTSTRUCT/SEG series) what its sets measured.
    edits = {q.id: q for q in [*ctx.index.qa_sets(ct_series_uid=uid), *ctx.index.qa_sets(series_uid=uid)]}
    return ctx.page(request, "series.html", viewer, detail=detail, previews=previews, finished=finished,
                    edits=sorted(edits.values(), key=lambda q: -q.compared_at),
                    patient_name=_patient_name(ctx, uid) if viewer.logged_in else "",
                    destinations=[d.name for d in ctx.cfg.destinations])


def _preview_path(ctx: WebContext, job: JobRecord) -> Path | None:
    for folder in (Path(job.result_dir) if job.result_dir else None, ctx.cfg.job_result_dir(job.id)):
        if folder is not None and (folder / "preview.png").is_file():
            return folder / "preview.png"
    return None


async def preview(ctx: WebContext, request: Request) -> Response:
    """The job's preview.png (axial, coronal, sagittal with the contours), as the worker drew it."""
    ctx.viewer(request)
    job_id = int(request.path_params["job_id"])
    job = ctx.index.job(job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} is not in the index")
    path = _preview_path(ctx, job)
    if path is None:
        raise HTTPException(404, f"job {job_id} has no preview (it has not finished, found nothing, or ran before "
                                 "previews were drawn)")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


async def outbox_page(ctx: WebContext, request: Request) -> Response:
    """The newest outbox rows (optionally of one state), the dead letters, and the retry button."""
    viewer = ctx.viewer(request)
    states = [s.value for s in OutboxState]
    state = _choice(request.query_params.get("state"), states)
    rows = ctx.index.outbox(limit=PAGE_ROWS * 5)
    counts = {s: sum(1 for r in rows if r.state.value == s) for s in states}
    shown = [r for r in rows if not state or r.state.value == state][:PAGE_ROWS]
    jobs = {j.id: j for j in ctx.index.jobs(limit=PAGE_ROWS * 4)}
    return ctx.page(request, "outbox.html", viewer, rows=shown, counts=counts, states=states, chosen=state,
                    jobs=jobs, dead=counts[OutboxState.DEAD.value], message=request.query_params.get("message", ""))


async def review_page(ctx: WebContext, request: Request) -> Response:
    """Jobs awaiting review (oldest first) and the recent decisions."""
    viewer = ctx.viewer(request)
    queue = review_queue(ctx.index)
    return ctx.page(request, "review.html", viewer, queue=queue, decided=ctx.index.reviews(limit=50))


async def login_page(ctx: WebContext, request: Request) -> Response:
    if not ctx.users.configured:
        return ctx.page(request, "error.html", None, status=404, code=404,
                        sentence="no users are configured: the pages answer this machine's own browser without a "
                                 "login (dicom-seg-node web add-user NAME adds one)")
    return ctx.page(request, "login.html", None, next=safe_next(request.query_params.get("next")), failed="")


def safe_next(target: str | None) -> str:
    """A local path to go to after logging in (never another site)."""
    return target if target and target.startswith("/") and not target.startswith("//") else "/"
