"""A throw-away PKI (CA, server and client certificates) made with openssl for TLS tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support.paths import need_tool


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([need_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=mammonode test CA",
        cwd=folder,
    )
    extensions = (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth"))
    for name, san in extensions:
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=folder,
        )
        (folder / f"{name}.ext").write_text(san + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=folder,
        )
    return {p.stem + p.suffix: p for p in folder.iterdir()}


def tls_node_settings(pki: dict[str, Path], **extra) -> dict:
    """The [node] settings of a node serving DIMSE over mutual TLS with this PKI."""
    return {
        "tls": True,
        "tls_cert": str(pki["server.crt"]),
        "tls_key": str(pki["server.key"]),
        "tls_client_ca": str(pki["ca.crt"]),
        **extra,
    }
