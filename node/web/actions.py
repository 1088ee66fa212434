"""The actions (POST): log in and out, approve or reject a job held for review, retry dead letters, replay.

Every action but logging in needs the session's CSRF token in the form (403 without it). Each answers with
a redirect to the page that shows the outcome (303), or an error page with the status and the sentence:
404 for a job or series the index does not hold, 409 for a decision already made, 400 for a bad value.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from node.model.records import ReviewDecision
from node.spool.commands import decide_review, replay_series, retry_dead_letters
from node.web.auth import WRONG_LOGIN, Viewer, csrf_ok
from node.web.context import WebContext
from node.web.views import safe_next

log = logging.getLogger(__name__)


async def _checked(ctx: WebContext, request: Request) -> tuple[Viewer, dict[str, str]]:
    """The viewer and the form's fields, once the viewer may act and the CSRF token matches."""
    viewer = ctx.viewer(request)
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not csrf_ok(request, fields.get("csrf")):
        raise HTTPException(403, "the form's CSRF token is missing or does not match this session; reload the page "
                                 "and try again")
    return viewer, fields


async def login(ctx: WebContext, request: Request) -> Response:
    form = await request.form()
    name = str(form.get("username", "")).strip()
    password = str(form.get("password", ""))
    target = safe_next(str(form.get("next", "/")))
    host = request.client.host if request.client else "unknown"
    keys = [f"address:{host}", f"user:{name.lower()}"]
    wait = ctx.limiter.blocked_for(keys)
    if wait > 0:
        log.warning("web: login refused for %s: too many failed attempts", host)
        return ctx.page(request, "login.html", None, status=429, next=target,
                        failed=f"too many failed logins; try again in {wait:.0f} s",
                        headers={"Retry-After": str(int(wait) + 1)})
    if not await run_in_threadpool(ctx.users.check, name, password):
        ctx.limiter.failed(keys)
        log.warning("web: failed login from %s", host)
        return ctx.page(request, "login.html", None, status=401, next=target, failed=WRONG_LOGIN)
    ctx.limiter.succeeded(keys)
    request.session.clear()  # a new session for the login: no fixation
    request.session["user"] = name
    log.info("web: %s logged in from %s", name, host)
    return RedirectResponse(target, status_code=303)


async def logout(ctx: WebContext, request: Request) -> Response:
    await _checked(ctx, request)
    request.session.clear()
    return RedirectResponse("/login" if ctx.users.configured else "/", status_code=303)


async def _decide(ctx: WebContext, request: Request, decision: ReviewDecision) -> Response:
    viewer, fields = await _checked(ctx, request)
    job_id = int(request.path_params["job_id"])
    note = fields.get("reason" if decision is ReviewDecision.REJECTED else "note", "")
    review = decide_review(ctx.index, job_id, decision, reviewer=viewer.name, note=note)
    log.info("web: job %d %s by %s (%d copies)", job_id, decision.value, viewer.name, review.released)
    job = ctx.index.job(job_id)
    target = f"/series/{quote(job.series_uid)}#job-{job_id}" if job is not None else "/review"
    return RedirectResponse(target, status_code=303)


async def approve(ctx: WebContext, request: Request) -> Response:
    return await _decide(ctx, request, ReviewDecision.APPROVED)


async def reject(ctx: WebContext, request: Request) -> Response:
    return await _decide(ctx, request, ReviewDecision.REJECTED)


async def retry(ctx: WebContext, request: Request) -> Response:
    viewer, _ = await _checked(ctx, request)
    count = retry_dead_letters(ctx.index)
    log.info("web: %s queued %d dead letter(s) again", viewer.name, count)
    return RedirectResponse(f"/outbox?message={quote(f'{count} dead letter(s) queued again')}", status_code=303)


async def replay(ctx: WebContext, request: Request) -> Response:
    viewer, fields = await _checked(ctx, request)
    uid = request.path_params["uid"]
    destination = fields.get("destination", "")
    outcome = replay_series(ctx.index, ctx.cfg, uid, [destination] if destination else None)
    log.info("web: %s replayed series %s to %s (%d rows)", viewer.name, uid, outcome.destinations, outcome.queued)
    return RedirectResponse(f"/series/{quote(uid)}?message="
                            f"{quote(f'{outcome.queued} result copies queued again for {outcome.destinations}')}",
                            status_code=303)
