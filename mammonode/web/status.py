"""The node's status over HTTP: ``/`` (the page), ``/status`` and ``/status/studies/{uid}``
(the same JSON as ``mammonode status --json`` and ``study --json``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from mammonode.config import Config
from mammonode.db.queries import find_study, status, study_detail
from mammonode.db.session import Database
from mammonode.ingest.layout import StorageLayout
from mammonode.web.status_page import render_status_page


class StatusEndpoints:
    def __init__(self, cfg: Config, db: Database):
        self.cfg = cfg
        self.db = db

    def status_json(self, request: Request) -> Response:
        with self.db.session() as session:
            data = status(
                session,
                self.cfg.study.quiet_period_s,
                self.cfg.worker.stale_after_s,
                quarantined_files=StorageLayout(self.cfg.storage_dir).quarantined_count(),
            )
        return JSONResponse(data)

    def study_json(self, request: Request) -> Response:
        with self.db.session() as session:
            found = find_study(session, request.path_params["study"])
            if found is None:
                return JSONResponse({"error": "not found"}, status_code=404)
            return JSONResponse(study_detail(session, found, self.cfg.study.quiet_period_s))

    def page(self, request: Request) -> Response:
        return HTMLResponse(render_status_page(self.cfg, self.db))
