"""Authentication for every HTTP endpoint: the static bearer token (``dicomweb.token``), and
JWT access tokens from an identity provider (``dicomweb.jwks_url`` / ``jwks_file``, web/oidc.py)
whose scopes decide what they may do. Challenges follow RFC 6750 section 3."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from mammonode import audit
from mammonode.config import Config
from mammonode.web.oidc import READ, WRITE, JwtVerifier, KeysUnavailable, TokenRejected

log = logging.getLogger(__name__)

#: Query parameters that some clients use to carry a token. A token in a URL ends up in proxy
#: and access logs and browser histories, so such a request is refused even when its
#: Authorization header is right.
QUERY_TOKEN_PARAMS = frozenset({"access_token", "token", "bearer", "auth", "authorization"})

_REALM = 'Bearer realm="mammonode"'


def _unauthorized(message: str, error: str = "") -> JSONResponse:
    """401; ``error`` only when a token was sent (RFC 6750 3.1: a request without any
    credentials gets the bare challenge)."""
    challenge = f'{_REALM}, error="{error}", error_description="{message}"' if error else _REALM
    response = JSONResponse({"error": message}, status_code=401, headers={"WWW-Authenticate": challenge})
    response.refused_for = message  # for the audit trail (BearerAuth.dispatch)
    return response


def _insufficient_scope(scope: str) -> JSONResponse:
    challenge = f'{_REALM}, error="insufficient_scope", scope="{scope}"'
    message = f"the token lacks the {scope} scope"
    response = JSONResponse({"error": message}, status_code=403, headers={"WWW-Authenticate": challenge})
    response.refused_for = message  # for the audit trail (BearerAuth.dispatch)
    return response


def _audit_refusal(request: Request, reason: str) -> None:
    """A Security Alert (Use of Restricted Function) for a request refused for its token,
    rate-limited per client address. Run in the thread pool: the audit file is fsynced,
    which the event loop must not wait for."""
    client = request.client.host if request.client else ""
    audit.emit_security_alert(
        audit.Participant("unauthenticated", True, None, client),
        str(request.url.path),
        f"{request.method} {request.url.path} refused: {reason}",
        audit.messages.USE_OF_RESTRICTED_FUNCTION,
    )


def required_scope(request: Request) -> str:
    """What a JWT must grant: STOW-RS (the only POST) writes; everything else (QIDO-RS,
    WADO-RS, /, /status, /metrics) reads. No HTTP endpoint needs mammonode.admin yet."""
    return READ if request.method in ("GET", "HEAD") else WRITE


class BearerAuth(BaseHTTPMiddleware):
    """The static token (full access, compared in constant time) and/or JWT access tokens."""

    def __init__(self, app, token: str = "", verifier: JwtVerifier | None = None):
        super().__init__(app)
        self.expected = f"Bearer {token}".encode() if token else None
        self.verifier = verifier

    async def dispatch(self, request: Request, call_next):
        response = await self._dispatch(request, call_next)
        if response.status_code in (401, 403) and getattr(response, "refused_for", None):
            await run_in_threadpool(_audit_refusal, request, response.refused_for)
        return response

    async def _dispatch(self, request: Request, call_next):
        if any(key.lower() in QUERY_TOKEN_PARAMS for key in request.query_params.keys()):
            return _unauthorized("tokens in the URL are refused; send Authorization: Bearer <token>")
        header = request.headers.get("authorization", "")
        if self.expected is not None:
            given = header.encode("latin-1", "replace")
            if hmac.compare_digest(given, self.expected):  # constant time in the token's content
                return await call_next(request)
        scheme, _, credentials = header.partition(" ")
        if self.verifier is None or scheme.lower() != "bearer" or not credentials.strip():
            return _unauthorized("missing or wrong bearer token", "invalid_token" if header else "")
        try:
            principal = await run_in_threadpool(self.verifier.verify, credentials.strip())
        except TokenRejected as exc:
            return _unauthorized(str(exc), "invalid_token")
        except KeysUnavailable as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "30"})
        scope = required_scope(request)
        if scope not in principal.scopes:
            log.info("token of subject %r lacks %s for %s", principal.subject, scope, request.method)
            return _insufficient_scope(scope)
        return await call_next(request)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address) is reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _file_sets_token(path: Path) -> bool:
    """Whether the config file itself holds ``dicomweb.token`` (it may come from the
    environment instead, which leaves the file harmless)."""
    try:
        with open(path, "rb") as fh:
            section = tomllib.load(fh).get("dicomweb", {})
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return isinstance(section, dict) and bool(str(section.get("token", "")).strip())


def exposure_warnings(cfg: Config) -> list[str]:
    """What gives the bearer token (or JWTs) away, said at start: sent in clear text to other
    machines (HTTP without TLS on an address that is not loopback), or stored in a config file
    every local user may read; and signing keys fetched over plain HTTP, which lets whoever is
    on the path mint tokens. Warnings, not errors: a TLS proxy in front, or a machine with one
    user, makes either one acceptable."""
    web = cfg.dicomweb
    warnings = []
    jwks_host = urlsplit(web.jwks_url).hostname or ""
    if web.jwks_url.lower().startswith("http://") and not is_loopback(jwks_host):
        warnings.append(
            f"dicomweb.jwks_url is plain HTTP ({jwks_host}): whoever can alter that traffic can sign tokens"
            " this node accepts; use https://"
        )
    if web.oidc and not web.tls_cert and not is_loopback(web.host):
        warnings.append(
            f"JWT access tokens travel in clear text: plain HTTP on {web.host}:{web.port}; set dicomweb.tls_cert"
            " and dicomweb.tls_key, or bind dicomweb.host to 127.0.0.1 behind a TLS proxy"
        )
    if not web.token:
        return warnings
    if not web.tls_cert and not is_loopback(web.host):
        warnings.append(
            f"dicomweb.token travels in clear text: plain HTTP on {web.host}:{web.port}; set dicomweb.tls_cert"
            " and dicomweb.tls_key, or bind dicomweb.host to 127.0.0.1 behind a TLS proxy"
        )
    path = Path(cfg.source)
    try:
        mode = path.stat().st_mode if cfg.source != "<defaults>" else 0
    except OSError:
        mode = 0
    if mode & 0o004 and _file_sets_token(path):
        warnings.append(
            f"{path} holds dicomweb.token and is readable by every user (mode {mode & 0o777:o}); chmod o-r {path}"
        )
    return warnings
