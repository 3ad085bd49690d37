"""Sending DICOM to the node under test, and the shared sample exam."""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from pathlib import Path

import requests
from pydicom.dataset import Dataset

from mammonode.exam.views import VIEWS
from support.paths import need_shared, need_tool


def storescu(
    port: int, files: list[Path], *extra: str, calling: str = "STORESCU", called: str = "MAMMONODE", check: bool = True
) -> subprocess.CompletedProcess:
    command = [
        need_tool("storescu"),
        "-v",
        "-aet",
        calling,
        "-aec",
        called,
        *extra,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def send_datasets(port: int, datasets, calling: str = "TESTSCU", timeout: float = 60) -> list[int | None]:
    """C-STORE each data set over one pynetdicom association; the statuses (None: no answer)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.dimse_timeout = timeout
    for sop in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
    assert assoc.is_established
    out = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        out.append(int(status.Status) if status is not None and "Status" in status else None)
    assoc.release()
    return out


def density_dicoms() -> list[Path]:
    return sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))


def density_png_args() -> list[str]:
    """The density exam PNGs store every view facing right: the right views are mirrored."""
    folder = need_shared("samples", "png", "density-exam")
    args = []
    for view in VIEWS:
        args += ["--png", f"{view}={folder / (view + '.png')}"]
    return args + ["--png-mirrored", "R-CC", "--png-mirrored", "R-MLO"]


def stow(node, datasets: list[Dataset]) -> tuple[int, Dataset | None]:
    """POST the data sets as one STOW-RS request to a node without a token (anonymous
    access allowed): the HTTP status and the response."""
    boundary = uuid.uuid4().hex
    body = b""
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buffer.getvalue() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    response = requests.post(
        f"http://127.0.0.1:{node.web_port}/dicomweb/studies",
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        timeout=60,
    )
    try:
        return response.status_code, Dataset.from_json(json.loads(response.content))
    except ValueError:
        return response.status_code, None
