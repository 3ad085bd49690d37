"""The node's HTTP side: DICOMweb (STOW-RS from ingest/, QIDO-RS, WADO-RS), the status page,
``/status`` and ``/metrics``, served by uvicorn inside ``mammonode serve``. When
``dicomweb.token`` is set every request, the status page included, needs
``Authorization: Bearer <token>``; with ``dicomweb.jwks_url`` (or ``jwks_file``) a JWT access
token with the route's scope will do too (auth.py).
"""

from __future__ import annotations

import logging
import socket
import threading

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from mammonode.config import Config
from mammonode.db.session import Database
from mammonode.ingest.stow import StowHandler
from mammonode.web.auth import BearerAuth, exposure_warnings
from mammonode.web.connections import guarded_protocol
from mammonode.web.metrics import attach_database, metrics
from mammonode.web.oidc import JwtVerifier
from mammonode.web.qido import Qido
from mammonode.web.status import StatusEndpoints
from mammonode.web.wado import Wado

log = logging.getLogger(__name__)


def create_app(cfg: Config, db: Database) -> Starlette:
    base_url = cfg.dicomweb.base_url
    stow = StowHandler(
        cfg.storage_dir,
        db,
        base_url,
        max_request_bytes=cfg.dicomweb.max_request_bytes,
        max_parts=cfg.dicomweb.max_parts,
        body_timeout_s=cfg.dicomweb.body_timeout_s,
        max_inflated_bytes=cfg.storage.max_inflated_bytes,
        rules=cfg.rules,
    )
    qido = Qido(cfg.storage_dir, db, base_url)
    wado = Wado(cfg.storage_dir, db, base_url)
    status = StatusEndpoints(cfg, db)
    s, se, i = "/dicomweb/studies/{study}", "/series/{series}", "/instances/{instance}"
    routes = [
        Route("/dicomweb/studies", stow.post, methods=["POST"]),
        Route(s, stow.post, methods=["POST"]),
        Route("/dicomweb/studies", qido.studies, methods=["GET"]),
        Route(s + "/series", qido.series, methods=["GET"]),
        Route(s + "/instances", qido.instances, methods=["GET"]),
        Route(s + se + "/instances", qido.instances, methods=["GET"]),
        Route(s, wado.retrieve, methods=["GET"]),
        Route(s + se, wado.retrieve, methods=["GET"]),
        Route(s + se + i, wado.retrieve, methods=["GET"]),
        Route(s + "/metadata", wado.metadata, methods=["GET"]),
        Route(s + se + "/metadata", wado.metadata, methods=["GET"]),
        Route(s + se + i + "/metadata", wado.metadata, methods=["GET"]),
        Route("/status", status.status_json, methods=["GET"]),
        Route("/status/studies/{study}", status.study_json, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", status.page, methods=["GET"]),
    ]
    web = cfg.dicomweb
    verifier = JwtVerifier(web) if web.oidc else None
    middleware = [Middleware(BearerAuth, token=web.token, verifier=verifier)] if web.token or verifier else []
    return Starlette(routes=routes, middleware=middleware)


class WebServer:
    """uvicorn in a background thread of ``mammonode serve``."""

    def __init__(self, cfg: Config, db: Database):
        import uvicorn

        web = cfg.dicomweb
        self.cfg = cfg
        attach_database(db)
        self.config = uvicorn.Config(
            create_app(cfg, db),
            host=web.host,
            port=web.port,
            log_level="warning",
            lifespan="off",
            ssl_certfile=web.tls_cert or None,
            ssl_keyfile=web.tls_key or None,
            access_log=False,
            http=guarded_protocol(web.head_timeout_s, web.max_connections),
            timeout_keep_alive=web.keep_alive_timeout_s,
        )
        self.server = uvicorn.Server(self.config)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind here, in the caller's thread, so that a port in use is an error the node
        reports at start (uvicorn would only log it from its own thread)."""
        host, port = self.config.host, self.config.port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(self.config.backlog)
        except OSError:
            sock.close()
            raise
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="dicomweb", daemon=True)
        self.thread.start()
        log.info(
            "DICOMweb on %s:%s%s", self.config.host, self.config.port, " (TLS)" if self.config.ssl_certfile else ""
        )
        for warning in exposure_warnings(self.cfg):
            log.warning(warning)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
