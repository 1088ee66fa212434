"""The web UI's Starlette routes and middleware, and the error page every refusal is answered with."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from node.config import NodeConfig
from node.errors import Conflict, NotFound, Permanent
from node.spool.index import Index
from node.web import actions, views
from node.web.auth import Viewer, session_secret
from node.web.context import WebContext

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
Handler = Callable[[Request], Awaitable[Response]]


def error_page(ctx: WebContext, request: Request, status: int, sentence: str) -> Response:
    """The status and the sentence, as a page (the viewer, when known, keeps the navigation)."""
    try:
        viewer: Viewer | None = ctx.viewer(request)
    except HTTPException:
        viewer = None
    log.info("web: %s %s answered %d: %s", request.method, request.url.path, status, sentence)
    return ctx.page(request, "error.html", viewer, status=status, code=status, sentence=sentence)


def web_routes(cfg: NodeConfig, index: Index) -> list[BaseRoute]:
    """The pages and actions (see ``node.web.views``), and the stylesheet and script they use."""
    ctx = WebContext(cfg, index)

    def bind(handler: Callable[[WebContext, Request], Awaitable[Response]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(ctx, request)
            except HTTPException as exc:
                if exc.status_code == 401 and request.method == "GET":
                    return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
                return error_page(ctx, request, exc.status_code, str(exc.detail))
            except NotFound as exc:
                return error_page(ctx, request, 404, str(exc))
            except Conflict as exc:
                return error_page(ctx, request, 409, str(exc))
            except Permanent as exc:  # a bad value in the request (a missing reason, an unknown destination)
                return error_page(ctx, request, 400, str(exc))
        return endpoint

    return [
        Route("/", bind(views.series_list)),
        Route("/series/{uid}", bind(views.series_page)),
        Route("/jobs/{job_id:int}/preview.png", bind(views.preview)),
        Route("/outbox", bind(views.outbox_page)),
        Route("/review", bind(views.review_page)),
        Route("/login", bind(views.login_page), methods=["GET"]),
        Route("/login", bind(actions.login), methods=["POST"]),
        Route("/logout", bind(actions.logout), methods=["POST"]),
        Route("/jobs/{job_id:int}/approve", bind(actions.approve), methods=["POST"]),
        Route("/jobs/{job_id:int}/reject", bind(actions.reject), methods=["POST"]),
        Route("/outbox/retry", bind(actions.retry), methods=["POST"]),
        Route("/series/{uid}/replay", bind(actions.replay), methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]


def web_middleware(cfg: NodeConfig) -> list[Middleware]:
    """The signed session cookie (SameSite=strict: another site's form never carries it)."""
    return [Middleware(SessionMiddleware, secret_key=session_secret(cfg.state_dir), session_cookie="segnode_session",
                       max_age=int(cfg.web.session_hours * 3600), same_site="strict", https_only=False)]
