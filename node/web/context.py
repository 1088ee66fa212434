"""What the pages share: the configuration, the HTTP thread's index, the users, the templates, and the guard
(:meth:`WebContext.viewer`) every page and action passes through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from node.config import NodeConfig
from node.spool.index import Index
from node.web.auth import LOCAL_USER, LoginLimiter, Users, Viewer, csrf_token, is_loopback
from node.web.format import FILTERS

HERE = Path(__file__).resolve().parent


class WebContext:
    """What the pages share: the configuration, the HTTP thread's index, the users and the templates."""

    def __init__(self, cfg: NodeConfig, index: Index) -> None:
        self.cfg = cfg
        self.index = index
        self.users = Users(cfg)
        self.limiter = LoginLimiter(cfg.web.login_attempts, cfg.web.login_window_s)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters.update(FILTERS)

    def viewer(self, request: Request) -> Viewer:
        """Who asks; raises 401/403 (an :class:`HTTPException` with a sentence) when they may not."""
        if not self.users.configured:
            host = request.client.host if request.client else None
            if not is_loopback(host):
                raise HTTPException(403, "the web UI answers only this machine's own browser until users are "
                                         "configured ([web] users, or dicom-seg-node web add-user NAME)")
            return Viewer(LOCAL_USER, logged_in=False)
        name = request.session.get("user")
        if not isinstance(name, str) or name not in self.users.all():
            raise HTTPException(401, "log in to see this page")
        return Viewer(name, logged_in=True)

    def page(self, request: Request, template: str, viewer: Viewer | None, status: int = 200,
             headers: dict[str, str] | None = None, **context: Any) -> Response:
        context |= {"viewer": viewer, "csrf": csrf_token(request), "refresh_s": self.cfg.web.refresh_s,
                    "users_configured": self.users.configured, "ae_title": self.cfg.ae_title}
        return self.templates.TemplateResponse(request, template, context, status_code=status, headers=headers)
