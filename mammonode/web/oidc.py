"""JWT access tokens from an OIDC identity provider (RFC 7519 claims, RFC 9068 profile),
checked against the provider's JWKS with PyJWT: signature by an allow-listed public-key
algorithm, ``exp`` required, ``iss`` and ``aud`` matched, small clock leeway. What a token
may do is its scopes (``mammonode.read``, ``mammonode.write``, ``mammonode.admin``).

Nothing here logs claims: a token's contents are the client's, and only the caller decides
to name the subject.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from jwt import PyJWK, PyJWKClient, PyJWKClientConnectionError, PyJWKClientError, PyJWKSet, PyJWTError

from mammonode.config import DicomwebSection

log = logging.getLogger(__name__)

READ = "mammonode.read"
WRITE = "mammonode.write"
ADMIN = "mammonode.admin"

#: A JWKS endpoint that does not answer within this is down for this request (503); the
#: request is not held for urllib's default.
JWKS_FETCH_TIMEOUT_S = 5.0
#: An unknown ``kid`` refetches the JWKS (key rotation) at most this often, so tokens with
#: made-up key ids cannot turn the node into a load generator against the provider.
JWKS_REFRESH_COOLDOWN_S = 30.0


class TokenRejected(Exception):
    """The token is not acceptable (RFC 6750 ``invalid_token``); the message is a fixed reason
    that holds nothing of the token."""


class KeysUnavailable(Exception):
    """The signing keys could not be had (JWKS endpoint down or answering nonsense): the
    token may well be good, so this is the node's problem (503), not the client's."""


@dataclass(frozen=True)
class Principal:
    subject: str
    scopes: frozenset[str]


class JwksFile:
    """A local JWKS, re-read when its modification time changes (key rotation without a
    restart); a re-read that fails keeps the keys read before."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.stamp: tuple[int, int] | None = None
        self.keys: list[PyJWK] = []

    def _current(self) -> list[PyJWK]:
        with self.lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp != self.stamp:
                    self.stamp = stamp  # a broken version is reported once, and retried when it changes
                    keyset = PyJWKSet.from_dict(json.loads(self.path.read_text()))
                    self.keys = [k for k in keyset.keys if k.public_key_use in ("sig", None)]
            except (OSError, ValueError, AttributeError, PyJWTError) as exc:
                if not self.keys:
                    raise KeysUnavailable(f"JWKS file {self.path}: {type(exc).__name__}") from None
                log.warning("JWKS file %s unreadable (%s); keeping the keys read before", self.path, exc)
            return self.keys

    def key_for(self, kid: str | None) -> PyJWK:
        keys = self._current()
        for key in keys:
            if key.key_id == kid:
                return key
        if kid is None and len(keys) == 1:  # a single-key set may omit key ids
            return keys[0]
        raise TokenRejected("no key in the JWKS matches the token's kid")


class JwksUrl:
    """The provider's JWKS endpoint through PyJWKClient: the set is cached for
    ``cache_s``, fetched with a bounded timeout and without following redirects."""

    def __init__(self, url: str, cache_s: float):
        self.url = url
        self.client = PyJWKClient(
            url,
            cache_jwk_set=True,
            lifespan=cache_s,
            timeout=JWKS_FETCH_TIMEOUT_S,
            cooldown_duration=JWKS_REFRESH_COOLDOWN_S,
        )
        self.fetch_lock = threading.Lock()
        self.failed_at = float("-inf")

    def key_for(self, kid: str | None) -> PyJWK:
        asked = time.monotonic()
        # One fetch at a time: requests that queued behind a fetch that failed fail with it, so a
        # dead provider costs one timeout per burst, not one per request (each holding a thread).
        with self.fetch_lock:
            if self.failed_at > asked:
                raise KeysUnavailable("the identity provider's keys (JWKS) could not be fetched")
            try:
                self.client.get_signing_keys()  # from the cache when fresh; a failure is the endpoint's
            except (PyJWTError, ValueError) as exc:  # ValueError: a body that is not JSON
                self.failed_at = time.monotonic()
                log.warning("JWKS %s unavailable: %s", self.url, (str(exc) or type(exc).__name__).splitlines()[0])
                raise KeysUnavailable("the identity provider's keys (JWKS) could not be fetched") from None
        try:
            return self.client.get_signing_key(kid)
        except PyJWKClientConnectionError:
            raise KeysUnavailable("the identity provider's keys (JWKS) could not be fetched") from None
        except (PyJWKClientError, PyJWTError, ValueError):
            raise TokenRejected("no key in the JWKS matches the token's kid") from None


# Claim failures, most specific first, to the reason given in the 401 (never the value).
_REASONS: tuple[tuple[type[PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token not issued for this audience"),
    (jwt.InvalidIssuerError, "token from another issuer"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim (exp, iss, aud)"),
    (jwt.InvalidSignatureError, "signature does not verify"),
    (jwt.InvalidAlgorithmError, "signature algorithm not allowed for this key"),
)


class JwtVerifier:
    def __init__(self, web: DicomwebSection):
        self.keys: JwksFile | JwksUrl = (
            JwksUrl(web.jwks_url, web.jwks_cache_s) if web.jwks_url else JwksFile(web.jwks_file)
        )
        self.issuer = web.jwt_issuer
        self.audience = web.jwt_audience
        self.algorithms = list(web.jwt_algorithms)
        self.leeway_s = web.jwt_leeway_s
        self.scope_claim = web.scope_claim

    def verify(self, token: str) -> Principal:
        """The token's subject and scopes, or TokenRejected / KeysUnavailable. May block on a
        JWKS fetch: call it from a worker thread."""
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise TokenRejected("malformed token") from None
        # Checked before any key lookup, so "none" and HS* never even cost a JWKS fetch.
        if header.get("alg") not in self.algorithms:
            raise TokenRejected("signature algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected("malformed token")
        key = self.keys.key_for(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except PyJWTError as exc:
            reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), "invalid token")
            raise TokenRejected(reason) from None
        sub = claims.get("sub")
        return Principal(subject=sub if isinstance(sub, str) else "", scopes=self.scopes(claims))

    def scopes(self, claims: dict) -> frozenset[str]:
        """RFC 8693/9068 ``scope`` is one space-separated string; some providers send ``scp``,
        as a string or a list. Both forms are read; anything else grants nothing."""
        names = [self.scope_claim] + (["scp"] if self.scope_claim == "scope" else [])
        for name in names:
            value = claims.get(name)
            if isinstance(value, str):
                return frozenset(value.split())
            if isinstance(value, list):
                return frozenset(v for v in value if isinstance(v, str))
        return frozenset()
