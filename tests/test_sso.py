"""Single sign-on on the HTTP side: JWT access tokens checked against a JWKS (a file, or a URL
served here by http.server), with keys made in the test. Expected statuses and challenges are
RFC 6750 section 3's (401 invalid_token, 403 insufficient_scope, a bare challenge without
credentials) and RFC 7519's claims (exp required, iss/aud matched); the ``alg: none`` and
HS256-with-the-public-key tokens are assembled by hand, not by the library under test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.node import NodeProcess, cli, write_config

from mammonode.config import ConfigError, load_config
from mammonode.demo.loopback import free_port, wait_port
from mammonode.demo.phantom import exam_datasets
from mammonode.web.auth import exposure_warnings

pytestmark = pytest.mark.network

ISSUER = "https://idp.example.org/realms/radiology"
AUDIENCE = "mammonode"
STATIC = "static-token-5c1f"
READ, WRITE = "mammonode.read", "mammonode.write"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private, kid: str) -> dict:
    """The public JWK (RFC 7517/7518) of a key, written by cryptography's numbers, not by PyJWT."""

    def b64(n: int, size: int | None = None) -> str:
        raw = n.to_bytes(size or (n.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    numbers = private.public_key().public_numbers()
    if isinstance(private, rsa.RSAPrivateKey):
        return {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64(numbers.n), "e": b64(numbers.e)}
    return {"kty": "EC", "kid": kid, "use": "sig", "crv": "P-256", "x": b64(numbers.x, 32), "y": b64(numbers.y, 32)}


JWKS = {"keys": [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1")]}


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-viewer", "iat": now, "exp": now + 300, "scope": READ}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(key=RSA_KEY, kid: str = "rsa-1", alg: str = "RS256", **overrides) -> str:
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers={"kid": kid})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict, payload: dict, sign=lambda signing_input: b"") -> str:
    """A compact JWS (RFC 7515 section 7.1) assembled without any JWT library."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def stow_body() -> tuple[bytes, str]:
    ds = exam_datasets(shape=(64, 48), patient_id="SSO-1")[0]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    boundary = uuid.uuid4().hex
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buffer.getvalue()
    body += f"\r\n--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


class JwksServer:
    """A JWKS endpoint on loopback whose answer the test sets: "ok", "html" (a broken
    provider) or "error" (HTTP 500); it counts the fetches it served."""

    def __init__(self, port: int):
        self.mode = "ok"
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.fetches += 1
                if outer.mode == "error":
                    self.send_error(500)
                    return
                body = json.dumps(JWKS).encode() if outer.mode == "ok" else b"<html>login</html>"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two nodes started side by side: one with a JWKS file and the static token, one whose
    JWKS URL has nothing listening behind it yet."""
    tmp = tmp_path_factory.mktemp("sso")
    jwks_file = tmp / "jwks.json"
    jwks_file.write_text(json.dumps(JWKS))
    common = {"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}
    jwks_port = free_port()
    file_node = NodeProcess(
        tmp / "file", worker={"enabled": False}, dicomweb={"token": STATIC, "jwks_file": str(jwks_file), **common}
    )
    url_node = NodeProcess(
        tmp / "url",
        worker={"enabled": False},
        dicomweb={"jwks_url": f"http://127.0.0.1:{jwks_port}/jwks", "allow_anonymous": False, **common},
    )
    started = [file_node.start(wait=False), url_node.start(wait=False)]
    try:
        for node in started:
            wait_port(node.web_port, timeout=60)
        yield {"file": file_node, "url": url_node, "jwks_port": jwks_port}
    finally:
        for node in started:  # both stop side by side
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in started:
            node.stop(timeout=20)


def call(node: NodeProcess, path: str, bearer: str | None, method: str = "GET", **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
    headers.update(kwargs.pop("headers", {}))
    return requests.request(method, f"http://127.0.0.1:{node.web_port}{path}", headers=headers, timeout=15, **kwargs)


def challenge(response: requests.Response) -> str:
    return response.headers.get("WWW-Authenticate", "")


def test_read_token_reads_and_cannot_write(nodes):
    node = nodes["file"]
    good = token()
    for path in ("/dicomweb/studies", "/status", "/metrics", "/"):
        assert call(node, path, good).status_code == 200, path
    assert call(node, "/dicomweb/studies", token(key=EC_KEY, kid="ec-1", alg="ES256")).status_code == 200
    # Azure AD / Okta spell it "scp", as a string or a list.
    assert call(node, "/status", token(scope=None, scp=[READ])).status_code == 200
    assert call(node, "/status", token(scope=None, scp=f"openid {READ}")).status_code == 200
    body, kind = stow_body()
    r = call(node, "/dicomweb/studies", good, "POST", data=body, headers={"Content-Type": kind})
    assert r.status_code == 403 and 'error="insufficient_scope"' in challenge(r), (r.status_code, r.text)
    assert f'scope="{WRITE}"' in challenge(r)


def test_write_token_stores_and_the_static_token_does_everything(nodes):
    node = nodes["file"]
    body, kind = stow_body()
    writer = token(scope=WRITE)
    r = call(node, "/dicomweb/studies", writer, "POST", data=body, headers={"Content-Type": kind})
    assert r.status_code == 200 and "00081199" in r.text, (r.status_code, r.text)  # ReferencedSOPSequence
    r = call(node, "/status", writer)  # write without read is not read
    assert r.status_code == 403 and f'scope="{READ}"' in challenge(r)
    assert call(node, "/dicomweb/studies", STATIC).status_code == 200
    body, kind = stow_body()
    assert call(node, "/dicomweb/studies", STATIC, "POST", data=body, headers={"Content-Type": kind}).status_code == 200


def test_bad_tokens_get_401_invalid_token(nodes):
    node = nodes["file"]
    now = int(time.time())
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bad = {
        "expired": token(exp=now - 120, iat=now - 600),
        "no exp": token(exp=None),
        "wrong audience": token(aud="another-service"),
        "wrong issuer": token(iss="https://evil.example.org"),
        "not yet valid": token(nbf=now + 600),
        "another key, same kid": token(key=OTHER_RSA),
        "unknown kid": token(kid="rsa-9"),
        "alg none": hand_made({"alg": "none", "typ": "JWT"}, claims()),
        "alg none, kid": hand_made({"alg": "none", "kid": "rsa-1"}, claims()),
        "HS256 keyed with the public key": hand_made(
            {"alg": "HS256", "kid": "rsa-1"}, claims(), lambda si: hmac.new(public_pem, si, hashlib.sha256).digest()
        ),
        "EC signature under the RSA kid": token(key=EC_KEY, kid="rsa-1", alg="ES256"),
        "garbage": "not.a.jwt",
        "truncated signature": token()[:-10],
    }
    for what, value in bad.items():
        r = call(node, "/status", value)
        assert r.status_code == 401, (what, r.status_code, r.text)
        assert 'error="invalid_token"' in challenge(r), (what, challenge(r))
    # RFC 6750 3.1: no credentials, no error code.
    r = call(node, "/status", None)
    assert r.status_code == 401 and challenge(r) == 'Bearer realm="mammonode"'
    # Within the 30 s leeway (RFC 7519 4.1.4 allows a small one) an expiry still passes.
    assert call(node, "/status", token(exp=now - 5)).status_code == 200
    # A token in the URL stays refused, JWT or not.
    assert call(node, f"/status?access_token={token()}", token()).status_code == 401
    log = node.log()
    assert all(value.split(".")[1] not in log for value in bad.values() if len(value) > 20)  # no claims in logs
    assert "Traceback" not in log


def test_jwks_url_fetched_cached_and_down_is_503(nodes):
    node, port = nodes["url"], nodes["jwks_port"]
    assert call(node, "/status", None).status_code == 401
    # Nothing listens on the JWKS port: the token may be fine, the node cannot tell (503, not 500).
    r = call(node, "/status", token())
    assert r.status_code == 503 and "JWKS" in r.json()["error"], (r.status_code, r.text)
    # A provider that accepts and never answers: the fetch is bounded (5 s), and a burst queued
    # behind it fails with it instead of each request waiting out its own timeout (6 x 5 s).
    mute = socket.create_server(("127.0.0.1", port), backlog=64)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: call(node, "/status", token()).status_code, range(6)))
        elapsed = time.monotonic() - started
        mute.setblocking(False)
        fetches = 0
        while True:  # the connections the node opened, still in the accept queue
            try:
                mute.accept()[0].close()
            except BlockingIOError:
                break
            fetches += 1
    finally:
        mute.close()
    assert statuses == [503] * 6 and elapsed < 12 and 1 <= fetches <= 2, (statuses, elapsed, fetches)
    server = JwksServer(port)
    try:
        for mode in ("html", "error"):
            server.mode = mode
            r = call(node, "/status", token())
            assert r.status_code == 503, (mode, r.status_code, r.text)
        server.mode = "ok"
        before = server.fetches
        assert call(node, "/status", token()).status_code == 200
        assert call(node, "/dicomweb/studies", token(key=EC_KEY, kid="ec-1", alg="ES256")).status_code == 200
        assert call(node, "/status", token(aud="x")).status_code == 401
        assert server.fetches - before == 1  # one fetch, then the cached set
        # An unknown kid right after a fetch does not refetch (cooldown), it is simply refused.
        assert call(node, "/status", token(kid="rsa-9")).status_code == 401
        assert server.fetches - before == 1
    finally:
        server.close()
    assert call(node, "/status", token()).status_code == 200  # provider gone: cached keys still serve
    assert "Traceback" not in node.log()


def test_configuration_is_checked_with_the_key_named(tmp_path):
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(JWKS))
    ok = {"jwks_file": str(jwks_file), "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}

    def load(**dicomweb):
        sections = {"dicomweb": {"enabled": True, **dicomweb}, "storage": {"directory": str(tmp_path)}}
        return load_config(write_config(tmp_path / "c.toml", sections), environ={})

    assert load(**ok).dicomweb.oidc  # a JWKS alone is authentication enough: no token needed
    exposed = exposure_warnings(load(**{**ok, "jwks_file": "", "jwks_url": "http://idp.example.org/jwks"}))
    assert any("jwks_url is plain HTTP" in w for w in exposed) and any("clear text" in w for w in exposed)
    assert exposure_warnings(load(**{**ok, "host": "127.0.0.1", "jwks_file": "", "jwks_url": "https://idp/j"})) == []
    cases = {
        "jwt_algorithms": {**ok, "jwt_algorithms": ["RS256", "HS256"]},
        "jwt_issuer": {**ok, "jwt_issuer": ""},
        "jwt_audience": {**ok, "jwt_audience": ""},
        "jwks_url": {**ok, "jwks_url": "ftp://idp/jwks", "jwks_file": ""},
        "jwks_cache_s": {**ok, "jwks_cache_s": 0.0},
        "jwt_leeway_s": {**ok, "jwt_leeway_s": 3600.0},
    }
    for key, settings in cases.items():
        with pytest.raises(ConfigError, match=f"dicomweb.{key}"):
            load(**settings)
    with pytest.raises(ConfigError, match="dicomweb.jwks_file: set jwks_url or jwks_file, not both"):
        load(**ok, jwks_url="https://idp/jwks")
    with pytest.raises(ConfigError, match="dicomweb.jwt_algorithms"):
        load(**{**ok, "jwt_algorithms": ["none"]})
    (tmp_path / "bad.json").write_text('{"keys": [{"kty": "oct", "k": ""}]} trailing')
    bad = write_config(
        tmp_path / "bad.toml",
        {"dicomweb": {"enabled": True, **ok, "jwks_file": str(tmp_path / "bad.json")}, "storage": {"directory": "x"}},
    )
    result = cli("serve", config=bad, check=False, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1 and "dicomweb.jwks_file" in result.stderr, result.stderr
