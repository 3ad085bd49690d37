"""Bearer-token authentication for every HTTP endpoint (when ``dicomweb.token`` is set)."""

from __future__ import annotations

import hmac

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse

#: Query parameters that some clients use to carry a token. A token in a URL ends up in proxy
#: and access logs and browser histories, so such a request is refused even when its
#: Authorization header is right.
QUERY_TOKEN_PARAMS = frozenset({"access_token", "token", "bearer", "auth", "authorization"})


def _unauthorized(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="mammonode"'})


class BearerAuth(BaseHTTPMiddleware):
    def __init__(self, app, token: str):
        super().__init__(app)
        self.expected = f"Bearer {token}".encode()

    async def dispatch(self, request: Request, call_next):
        if any(key.lower() in QUERY_TOKEN_PARAMS for key in request.query_params.keys()):
            return _unauthorized("tokens in the URL are refused; send Authorization: Bearer <token>")
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, self.expected):  # constant time in the token's content
            return _unauthorized("missing or wrong bearer token")
        return await call_next(request)
