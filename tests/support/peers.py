"""Independent DICOM peers for the tests: Orthanc as the PACS, DCMTK storescp as a plain SCP."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from mammonode.demo.loopback import free_port, wait_port
from support.paths import need_tool


class Orthanc:
    """Orthanc from the Debian package, started from its own config on loopback ports."""

    def __init__(
        self,
        tmp: Path,
        modalities: dict[str, tuple[str, str, int]],
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        plugins: list[str] | None = None,
    ):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = dicom_port or free_port()
        self.aet = aet
        config = {
            "Name": "mammonode-test-pacs",
            "StorageDirectory": str(tmp / "storage"),
            "IndexDirectory": str(tmp / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {name: list(v) for name, v in modalities.items()},
            "StableAge": 2,
            "Plugins": plugins or [],
            "StorageCompression": False,
        }
        self.config = tmp / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        binary = need_tool("Orthanc") if Path("/usr/bin/Orthanc").exists() else "/usr/sbin/Orthanc"
        if not Path(binary).exists():
            need_tool("Orthanc")
        log = open(self.tmp / "orthanc.log", "w")
        self.proc = subprocess.Popen([binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.http_port, 60)
        wait_port(self.dicom_port, 60)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=body,
            method=method,
            headers={"Content-Type": content_type} if body is not None else {},
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            payload = response.read()
        return payload

    def get(self, path: str):
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post(self, path: str, data) -> dict:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        kind = "application/dicom" if isinstance(data, bytes) else "application/json"
        return json.loads(self._request("POST", path, body, kind))

    def upload(self, path: Path) -> dict:
        return self.post("/instances", path.read_bytes())

    def find(self, level: str, query: dict) -> list[str]:
        return self.post("/tools/find", {"Level": level, "Query": query})


class StoreSCP:
    """DCMTK storescp writing every received object to its own file (duplicates included)."""

    def __init__(self, tmp: Path, port: int, aet: str = "STORESCP", options: tuple[str, ...] = ()):
        self.folder = tmp / "received"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.aet = aet
        self.options = options  # e.g. ("+xa",): accept every transfer syntax storescp knows
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.proc = subprocess.Popen(
            [need_tool("storescp"), "-aet", self.aet, *self.options, "+uf", "-od", str(self.folder), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 30)
        return self

    def files(self) -> list[Path]:
        return sorted(self.folder.iterdir())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
