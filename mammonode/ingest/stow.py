"""The STOW-RS handler: a multipart/related POST of DICOM parts, stored like C-STOREs.

Parts are streamed to temporary files and go through the same :func:`ingest` as C-STORE: a
part is reported stored only once it is on disk and in the database. The response (DICOM
JSON, or XML when asked for) lists what was stored and what was refused, with why.

A request is bounded: its size (``dicomweb.max_request_bytes``, 413, by Content-Length and
while streaming), its number of parts (``dicomweb.max_parts``, 413) and the time its body
takes (``dicomweb.body_timeout_s``, 408). Parts are spooled in the storage directory's
``tmp/`` (which start-up recovery cleans), never in the system temp dir, and removed when
the request ends, however it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from pydicom.dataset import Dataset
from python_multipart import MultipartParser
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mammonode import audit
from mammonode.config import Rule
from mammonode.db.session import Database
from mammonode.ingest.inflate import DEFAULT_MAX_INFLATED_BYTES, read_file_meta
from mammonode.ingest.layout import StorageLayout, ensure_dir
from mammonode.ingest.rules import match
from mammonode.ingest.store import DOES_NOT_MATCH_SOP_CLASS, StoreError, inflated_copy, ingest, read_header
from mammonode.metrics import METRICS, sop_class_label

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
MAX_PART_HEADERS = 32
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _spool_folder(tmp_root: Path) -> tempfile.TemporaryDirectory:
    """The request's spool folder under the storage directory's tmp/ (start-up recovery cleans
    it); the system's temporary directory when storage is read-only or full, so each part is
    still parsed and refused with its own failure status (0xA700) instead of the request
    failing as a whole."""
    try:
        return tempfile.TemporaryDirectory(prefix="stow-", dir=tmp_root, ignore_cleanup_errors=True)
    except OSError:
        return tempfile.TemporaryDirectory(prefix="mammonode-stow-", ignore_cleanup_errors=True)


class RequestRefused(Exception):
    """The request as a whole is refused before its parts are stored (HTTP ``status``)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _echo_uid(value: str | None) -> str:
    """A UID taken from a part, fit to echo in the response: a valid UID, else empty."""
    return value if value and len(value) <= 64 and _UID.fullmatch(value) else ""


def dicomweb_base(request: Request, configured: str = "") -> str:
    """This service's DICOMweb root for RetrieveURLs: configured, else from the request."""
    if configured:
        return configured.rstrip("/")
    return str(request.base_url).rstrip("/") + "/dicomweb"


def _sop_item(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _xml(ds: Dataset) -> str:
    """PS3.19 Native DICOM Model XML for the (flat + one level of sequences) STOW response."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    def attrs(d: Dataset) -> str:
        parts = []
        for elem in d:
            tag = f"{elem.tag.group:04X}{elem.tag.element:04X}"
            vr = dictionary_VR(elem.tag)
            keyword = quoteattr(keyword_for_tag(elem.tag))
            head = f"<DicomAttribute tag={quoteattr(tag)} vr={quoteattr(vr)} keyword={keyword}>"
            if vr == "SQ":
                items = "".join(f'<Item number="{i + 1}">{attrs(item)}</Item>' for i, item in enumerate(elem.value))
                parts.append(head + items + "</DicomAttribute>")
            else:
                values = elem.value if isinstance(elem.value, list | tuple) else [elem.value]
                body = "".join(f'<Value number="{i + 1}">{escape(str(v))}</Value>' for i, v in enumerate(values))
                parts.append(head + body + "</DicomAttribute>")
        return "".join(parts)

    return f'<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel>{attrs(ds)}</NativeDicomModel>'


def _out_of_resources(reason: int) -> bool:
    """PS3.4 B.2.3: A7xx is "Refused: Out of Resources" (disk or database unavailable)."""
    return 0xA700 <= reason <= 0xA7FF


def _http_status(stored: list, failed: list) -> int:
    """200 all stored; 202 some; when none: 503 if the node could not store for want of
    resources (a read-only or full disk, an unavailable database; the client should retry
    later; PS3.18 STOW-RS response status), else 409 (the parts themselves were refused)."""
    if not failed:
        return 200
    if stored:
        return 202
    return 503 if any(_out_of_resources(reason) for *_, reason in failed) else 409


class StowHandler:
    """``POST /dicomweb/studies[/{study}]``."""

    def __init__(
        self,
        storage_dir: Path,
        db: Database,
        base_url: str = "",
        max_request_bytes: int = 4 << 30,
        max_parts: int = 1000,
        body_timeout_s: float = 600.0,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
        rules: Sequence[Rule] | None = None,
    ):
        self.storage_dir = storage_dir
        # STOW-RS has no calling AE title: a rule naming calling_ae never matches here.
        self.router = partial(match, rules, calling_ae=None) if rules else None
        self.db = db
        self.base_url = base_url
        self.max_request_bytes = max_request_bytes
        self.max_parts = max_parts
        self.body_timeout_s = body_timeout_s
        self.max_inflated_bytes = max_inflated_bytes

    async def _spool_parts(self, request: Request, folder: Path) -> list[tuple[Path, str]]:
        content_type = request.headers.get("content-type", "")
        params = {}
        for piece in content_type.split(";")[1:]:
            if "=" in piece:
                key, value = piece.split("=", 1)
                params[key.strip().lower()] = value.strip().strip('"')
        if not content_type.lower().startswith("multipart/related") or "boundary" not in params:
            raise ValueError('expected multipart/related; type="application/dicom" with a boundary')
        if params.get("type", "application/dicom").lower() != "application/dicom":
            raise TypeError(f"part type {params.get('type')} is not supported; send application/dicom")
        length = request.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_request_bytes:
            raise RequestRefused(413, f"request body larger than the limit of {self.max_request_bytes} bytes")
        parts: list[tuple[Path, str]] = []
        state = {"file": None, "field": b"", "headers": {}, "value": b""}

        def on_part_begin():
            if len(parts) >= self.max_parts:
                raise RequestRefused(
                    413, f"more than {self.max_parts} parts in one request; send the instances in several requests"
                )
            path = folder / f"{uuid.uuid4().hex}.dcm"
            state["file"] = open(path, "wb")
            state["headers"] = {}
            parts.append((path, ""))

        def on_part_data(data, start, end):
            state["file"].write(data[start:end])

        def on_part_end():
            state["file"].close()
            path, _ = parts[-1]
            parts[-1] = (path, state["headers"].get("content-type", "application/dicom"))

        def on_header_field(data, start, end):
            state["field"] += data[start:end]

        def on_header_value(data, start, end):
            state["value"] += data[start:end]

        def on_header_end():
            if len(state["headers"]) < MAX_PART_HEADERS:
                state["headers"][state["field"].decode("latin-1").lower()] = state["value"].decode("latin-1").strip()
            state["field"], state["value"] = b"", b""

        parser = MultipartParser(
            params["boundary"],
            {
                "on_part_begin": on_part_begin,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
            },
        )
        received = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > self.max_request_bytes:
                        raise RequestRefused(
                            413, f"request body larger than the limit of {self.max_request_bytes} bytes"
                        )
                    parser.write(chunk)
            parser.finalize()
        except TimeoutError:
            raise RequestRefused(408, f"request body not received within {self.body_timeout_s:g} s") from None
        finally:
            if state["file"] is not None and not state["file"].closed:
                state["file"].close()
        return parts

    async def post(self, request: Request) -> Response:
        expected_study = request.path_params.get("study")
        tmp_root = StorageLayout(self.storage_dir).tmp_dir
        try:
            await run_in_threadpool(ensure_dir, tmp_root)
        except OSError:
            return JSONResponse({"error": "storage unavailable"}, status_code=503)
        # Closed before the body is read in full: tell the client (and uvicorn) the
        # connection ends here.
        close = {"Connection": "close"}
        with _spool_folder(tmp_root) as tmp:
            try:
                parts = await self._spool_parts(request, Path(tmp))
            except RequestRefused as exc:
                log.warning("STOW-RS request refused: %s", exc)
                return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=close)
            except TypeError as exc:
                return JSONResponse({"error": str(exc)}, status_code=415, headers=close)
            except Exception as exc:
                message = f"cannot parse the multipart body: {exc}"
                return JSONResponse({"error": message}, status_code=400, headers=close)
            if not parts:
                return JSONResponse({"error": "no DICOM parts in the request"}, status_code=400)
            client = request.client.host if request.client else "unknown"
            kept: list = []  # (IngestResult, SOP class) of each part stored, for the audit trail
            results = [
                await run_in_threadpool(self._store_part, path, kind, expected_study, client, kept)
                for path, kind in parts
            ]
            if kept:
                refused = sum(1 for r in results if r[0] != "ok")
                await run_in_threadpool(_audit_stow, client, kept, refused)
        response = Dataset()
        stored = [r for r in results if r[0] == "ok"]
        failed = [r for r in results if r[0] != "ok"]
        base = dicomweb_base(request, self.base_url)
        if _echo_uid(expected_study):
            response.RetrieveURL = f"{base}/studies/{expected_study}"
        if stored:
            items = []
            for _, sop_class, sop_uid, study_uid, series_uid, _ in stored:
                item = _sop_item(sop_class, sop_uid)
                item.RetrieveURL = f"{base}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
                items.append(item)
            response.ReferencedSOPSequence = items
        if failed:
            items = []
            for _, sop_class, sop_uid, _, _, reason in failed:
                item = _sop_item(_echo_uid(sop_class), _echo_uid(sop_uid))
                item.FailureReason = reason
                items.append(item)
            response.FailedSOPSequence = items
        code = _http_status(stored, failed)
        if "xml" in request.headers.get("accept", ""):
            return Response(_xml(response), status_code=code, media_type="application/dicom+xml")
        return Response(json.dumps(response.to_json_dict()), status_code=code, media_type=DICOM_JSON)

    @staticmethod
    def _as_file(path: Path, kind: str) -> None:
        """Some clients send a part without the 128-byte preamble and "DICM" (or without File
        Meta Information); rewrite such a part as a proper DICOM file before ingesting it."""
        import pydicom
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            return
        try:
            ds = pydicom.dcmread(path, force=True)
            _ = ds.SOPInstanceUID
        except Exception as exc:
            raise StoreError(0xC000, "part is not a DICOM data set") from exc
        meta = getattr(ds, "file_meta", None) or Dataset()
        if "TransferSyntaxUID" not in meta:
            syntax = dict(p.strip().split("=", 1) for p in kind.split(";")[1:] if "=" in p).get("transfer-syntax")
            meta.TransferSyntaxUID = syntax or (
                ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
            )
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta = pydicom.dataset.FileMetaDataset(meta)
        ds.save_as(path, enforce_file_format=True)

    def _inflate(self, path: Path) -> None:
        """A deflated part is replaced by its inflated equivalent before anything parses it
        (pydicom would inflate it whole in memory); StoreError beyond the cap."""
        inflated = inflated_copy(path, path.parent, self.max_inflated_bytes)
        if inflated is not None:
            os.replace(inflated, path)

    def _store_part(self, path: Path, kind: str, expected_study: str | None, client: str, kept: list | None = None):
        sop_class = sop_uid = None
        try:
            if not kind.lower().startswith("application/dicom"):
                raise StoreError(0xC000, f"part content type {kind} is not application/dicom")
            meta = read_file_meta(path)
            if meta is not None:  # named in a refusal before the data set is read
                sop_class, sop_uid = meta.uid("MediaStorageSOPClassUID"), meta.uid("MediaStorageSOPInstanceUID")
            self._inflate(path)
            self._as_file(path, kind)
            header = read_header(path) if path.stat().st_size > 132 else None
            if header is not None:
                sop_class = str(header.get("SOPClassUID", "")) or None
                sop_uid = str(header.get("SOPInstanceUID", "")) or None
                if expected_study and str(header.get("StudyInstanceUID", "")) != expected_study:
                    raise StoreError(DOES_NOT_MATCH_SOP_CLASS, "Study Instance UID differs from the request URL")
            result = ingest(
                path,
                self.storage_dir,
                self.db,
                calling_ae=f"STOW:{client}"[:64],
                max_inflated_bytes=self.max_inflated_bytes,
                router=self.router,
            )
        except StoreError as exc:
            METRICS.instances.labels(sop_class_label(sop_class), "failed", "dicomweb").inc()
            log.warning("STOW-RS part refused: 0x%04X %s", exc.status, exc.comment)
            return ("failed", sop_class, sop_uid, None, None, exc.status)
        except Exception as exc:
            METRICS.instances.labels(sop_class_label(sop_class), "failed", "dicomweb").inc()
            log.warning("STOW-RS part refused: %s", type(exc).__name__)
            return ("failed", sop_class, sop_uid, None, None, 0xC000)
        METRICS.instances.labels(sop_class_label(sop_class), str(result.outcome), "dicomweb").inc()
        if kept is not None and result.path is not None:
            kept.append((result, sop_class or ""))
        return ("ok", sop_class, result.sop_instance_uid, result.study_instance_uid, result.series_instance_uid, 0)


def _audit_stow(client: str, kept: list, refused: int) -> None:
    """110104 per study a STOW-RS request stored (as per DIMSE association and study): the
    client as source, this node as destination."""
    ctx = audit.context()
    if ctx is None:
        return
    studies: dict[str, audit.StudyObjects] = {}
    new_in = set()
    for result, sop_class in kept:
        study = studies.setdefault(result.study_instance_uid, audit.StudyObjects(result.study_instance_uid))
        study.patient_id = study.patient_id or result.patient_id
        study.add(sop_class)
        if result.outcome != "duplicate":
            new_in.add(result.study_instance_uid)
    peer = audit.Participant("dicomweb-client", True, audit.messages.SOURCE, client)
    for uid, study in studies.items():
        audit.emit(
            audit.messages.instances_transferred(
                ctx.source,
                peer,
                ctx.node(False, audit.messages.DESTINATION),
                study,
                action="C" if uid in new_in else "U",
                outcome=audit.messages.MINOR_FAILURE if refused else audit.messages.SUCCESS,
                description=f"{refused} parts of this STOW-RS request refused" if refused else "",
            )
        )
