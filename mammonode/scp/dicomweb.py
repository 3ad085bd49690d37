"""The DICOMweb listener (STOW-RS, QIDO-RS, WADO-RS) and the node's HTTP status surfaces.

STOW-RS parts are streamed to temporary files and go through the same
:func:`mammonode.scp.storage.ingest` as C-STORE: a part is reported stored only once it is
on disk and in the database. Served by uvicorn inside ``mammonode serve``. When
``dicomweb.token`` is set every request, the status page included, needs
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import json
import logging
import tempfile
import threading
import uuid
from collections import defaultdict
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydicom.dataset import Dataset
from python_multipart import MultipartParser
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mammonode.config import Config
from mammonode.db.queries import find_study, status
from mammonode.db.session import Database
from mammonode.metrics import METRICS
from mammonode.scp import catalog
from mammonode.scp.status_page import render_status_page
from mammonode.scp.storage import DOES_NOT_MATCH_SOP_CLASS, StoreError, ingest

log = logging.getLogger("mammonode.dicomweb")
DICOM_JSON = "application/dicom+json"
MAX_PART_HEADERS = 32


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
            head = f'<DicomAttribute tag="{tag}" vr="{vr}" keyword="{keyword_for_tag(elem.tag)}">'
            if vr == "SQ":
                items = "".join(f'<Item number="{i + 1}">{attrs(item)}</Item>' for i, item in enumerate(elem.value))
                parts.append(head + items + "</DicomAttribute>")
            else:
                values = elem.value if isinstance(elem.value, list | tuple) else [elem.value]
                body = "".join(f'<Value number="{i + 1}">{v}</Value>' for i, v in enumerate(values))
                parts.append(head + body + "</DicomAttribute>")
        return "".join(parts)

    return f'<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel>{attrs(ds)}</NativeDicomModel>'


class BearerAuth(BaseHTTPMiddleware):
    def __init__(self, app, token: str):
        super().__init__(app)
        self.expected = f"Bearer {token}".encode()

    async def dispatch(self, request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self.expected):
            return JSONResponse(
                {"error": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="mammonode"'},
            )
        return await call_next(request)


class DicomWeb:
    def __init__(self, cfg: Config, db: Database):
        self.cfg = cfg
        self.db = db
        self.storage = cfg.storage_dir

    # -- helpers -------------------------------------------------------------------------
    def base(self, request: Request) -> str:
        if self.cfg.dicomweb.base_url:
            return self.cfg.dicomweb.base_url.rstrip("/")
        return str(request.base_url).rstrip("/") + "/dicomweb"

    # -- STOW-RS -------------------------------------------------------------------------
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
        parts: list[tuple[Path, str]] = []
        state = {"file": None, "field": b"", "headers": {}, "value": b""}

        def on_part_begin():
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
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        finally:
            if state["file"] is not None and not state["file"].closed:
                state["file"].close()
        return parts

    async def stow(self, request: Request) -> Response:
        expected_study = request.path_params.get("study")
        with tempfile.TemporaryDirectory(prefix="stow-") as tmp:
            try:
                parts = await self._spool_parts(request, Path(tmp))
            except TypeError as exc:
                return JSONResponse({"error": str(exc)}, status_code=415)
            except Exception as exc:
                return JSONResponse({"error": f"cannot parse the multipart body: {exc}"}, status_code=400)
            if not parts:
                return JSONResponse({"error": "no DICOM parts in the request"}, status_code=400)
            client = request.client.host if request.client else "unknown"
            results = [
                await run_in_threadpool(self._store_part, path, kind, expected_study, client) for path, kind in parts
            ]
        response = Dataset()
        stored = [r for r in results if r[0] == "ok"]
        failed = [r for r in results if r[0] != "ok"]
        base = self.base(request)
        if expected_study:
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
                item = _sop_item(sop_class or "", sop_uid or "")
                item.FailureReason = reason
                items.append(item)
            response.FailedSOPSequence = items
        code = 200 if not failed else (202 if stored else 409)
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

    def _store_part(self, path: Path, kind: str, expected_study: str | None, client: str):
        sop_class = sop_uid = None
        try:
            if not kind.lower().startswith("application/dicom"):
                raise StoreError(0xC000, f"part content type {kind} is not application/dicom")
            self._as_file(path, kind)
            header = catalog.header(path) if path.stat().st_size > 132 else None
            if header is not None:
                sop_class = str(header.get("SOPClassUID", "")) or None
                sop_uid = str(header.get("SOPInstanceUID", "")) or None
                if expected_study and str(header.get("StudyInstanceUID", "")) != expected_study:
                    raise StoreError(DOES_NOT_MATCH_SOP_CLASS, "Study Instance UID differs from the request URL")
            result = ingest(path, self.storage, self.db, calling_ae=f"STOW:{client}"[:64])
        except StoreError as exc:
            METRICS.instances.labels(sop_class or "unknown", "failed", "dicomweb").inc()
            log.warning("STOW-RS part refused: 0x%04X %s", exc.status, exc.comment)
            return ("failed", sop_class, sop_uid, None, None, exc.status)
        except Exception as exc:
            METRICS.instances.labels(sop_class or "unknown", "failed", "dicomweb").inc()
            log.warning("STOW-RS part refused: %s", type(exc).__name__)
            return ("failed", sop_class, sop_uid, None, None, 0xC000)
        METRICS.instances.labels(sop_class or "unknown", str(result.outcome), "dicomweb").inc()
        series = str(catalog.header(result.path).get("SeriesInstanceUID", ""))
        return ("ok", sop_class, result.sop_instance_uid, result.study_instance_uid, series, 0)

    # -- QIDO-RS -------------------------------------------------------------------------
    def _filters(self, request: Request) -> tuple[dict[str, str], int, int]:
        from pydicom.datadict import keyword_for_tag

        filters, limit, offset = {}, 1000, 0
        for key, value in request.query_params.multi_items():
            if key == "limit":
                limit = max(0, int(value))
            elif key == "offset":
                offset = max(0, int(value))
            elif key in ("includefield", "fuzzymatching"):
                continue
            else:
                if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
                    key = keyword_for_tag(int(key, 16)) or key
                filters[key] = value
        return filters, limit, offset

    def _grouped(self, study_uid: str | None):
        with self.db.session() as session:
            found = catalog.entries(session, self.storage, study_uid)
        studies: dict[str, list[catalog.Entry]] = defaultdict(list)
        for entry in found:
            studies[entry.study_uid].append(entry)
        return studies

    def qido_studies(self, request: Request) -> Response:
        filters, limit, offset = self._filters(request)
        base = self.base(request)
        out = []
        for study_uid, items in sorted(self._grouped(None).items()):
            head = catalog.header(items[0].path)
            modalities = {e.modality for e in items if e.modality}
            if not all(catalog.matches(head, k, v, modalities) for k, v in filters.items()):
                continue
            ds = catalog.pick(head, catalog.STUDY_KEYS)
            ds.ModalitiesInStudy = sorted(modalities)
            ds.NumberOfStudyRelatedSeries = len({e.series_uid for e in items})
            ds.NumberOfStudyRelatedInstances = len(items)
            ds.RetrieveURL = f"{base}/studies/{study_uid}"
            out.append(ds.to_json_dict())
        return Response(json.dumps(out[offset : offset + limit]), media_type=DICOM_JSON)

    def qido_series(self, request: Request) -> Response:
        study_uid = request.path_params["study"]
        filters, limit, offset = self._filters(request)
        base = self.base(request)
        series: dict[str, list[catalog.Entry]] = defaultdict(list)
        for entry in self._grouped(study_uid).get(study_uid, []):
            series[entry.series_uid].append(entry)
        out = []
        for series_uid, items in sorted(series.items()):
            head = catalog.header(items[0].path)
            if not all(catalog.matches(head, k, v) for k, v in filters.items()):
                continue
            ds = catalog.pick(head, catalog.STUDY_KEYS[:1] + catalog.SERIES_KEYS)
            ds.NumberOfSeriesRelatedInstances = len(items)
            ds.RetrieveURL = f"{base}/studies/{study_uid}/series/{series_uid}"
            out.append(ds.to_json_dict())
        return Response(json.dumps(out[offset : offset + limit]), media_type=DICOM_JSON)

    def qido_instances(self, request: Request) -> Response:
        study_uid = request.path_params["study"]
        series_uid = request.path_params.get("series")
        filters, limit, offset = self._filters(request)
        base = self.base(request)
        out = []
        for entry in self._grouped(study_uid).get(study_uid, []):
            if series_uid and entry.series_uid != series_uid:
                continue
            head = catalog.header(entry.path)
            if not all(catalog.matches(head, k, v) for k, v in filters.items()):
                continue
            ds = catalog.pick(head, catalog.STUDY_KEYS[:1] + catalog.SERIES_KEYS[:2] + catalog.INSTANCE_KEYS)
            ds.RetrieveURL = f"{base}/studies/{study_uid}/series/{entry.series_uid}/instances/{entry.sop_uid}"
            out.append(ds.to_json_dict())
        return Response(json.dumps(out[offset : offset + limit]), media_type=DICOM_JSON)

    # -- WADO-RS -------------------------------------------------------------------------
    def _select(self, request: Request) -> list[catalog.Entry]:
        study_uid = request.path_params["study"]
        series_uid = request.path_params.get("series")
        sop_uid = request.path_params.get("instance")
        return [
            e
            for e in self._grouped(study_uid).get(study_uid, [])
            if (not series_uid or e.series_uid == series_uid) and (not sop_uid or e.sop_uid == sop_uid)
        ]

    def retrieve(self, request: Request) -> Response:
        chosen = self._select(request)
        if not chosen:
            return JSONResponse({"error": "not found"}, status_code=404)
        accept = request.headers.get("accept", "")
        if accept and "application/dicom" not in accept and "*/*" not in accept and "multipart/related" not in accept:
            return JSONResponse({"error": f"cannot produce {accept}"}, status_code=406)
        boundary = uuid.uuid4().hex

        def body():
            for entry in chosen:
                syntax = str(catalog.header(entry.path).file_meta.get("TransferSyntaxUID", ""))
                yield (
                    f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}\r\n"
                    f"Content-Length: {entry.path.stat().st_size}\r\n\r\n"
                ).encode()
                with open(entry.path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        yield chunk
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        media = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return StreamingResponse(body(), media_type=media)

    def metadata(self, request: Request) -> Response:
        chosen = self._select(request)
        if not chosen:
            return JSONResponse({"error": "not found"}, status_code=404)
        base = self.base(request)
        out = []
        for entry in chosen:
            ds = catalog.header(entry.path)
            url = f"{base}/studies/{entry.study_uid}/series/{entry.series_uid}/instances/{entry.sop_uid}"
            out.append(
                ds.to_json_dict(
                    bulk_data_threshold=4096,
                    bulk_data_element_handler=lambda elem, url=url: f"{url}/bulk/{elem.tag:08X}",
                )
            )
        return Response(json.dumps(out), media_type=DICOM_JSON)

    # -- status --------------------------------------------------------------------------
    def status_json(self, request: Request) -> Response:
        with self.db.session() as session:
            data = status(session, self.cfg.study.quiet_period_s, self.cfg.worker.stale_after_s)
        return JSONResponse(data)

    def metrics(self, request: Request) -> Response:
        return Response(generate_latest(METRICS.registry), media_type=CONTENT_TYPE_LATEST)

    def page(self, request: Request) -> Response:
        return HTMLResponse(render_status_page(self.cfg, self.db))

    def study_json(self, request: Request) -> Response:
        from mammonode.db.queries import study_detail

        with self.db.session() as session:
            found = find_study(session, request.path_params["study"])
            if found is None:
                return JSONResponse({"error": "not found"}, status_code=404)
            return JSONResponse(study_detail(session, found, self.cfg.study.quiet_period_s))


def create_app(cfg: Config, db: Database) -> Starlette:
    web = DicomWeb(cfg, db)
    s, se, i = "/dicomweb/studies/{study}", "/series/{series}", "/instances/{instance}"
    routes = [
        Route("/dicomweb/studies", web.stow, methods=["POST"]),
        Route(s, web.stow, methods=["POST"]),
        Route("/dicomweb/studies", web.qido_studies, methods=["GET"]),
        Route(s + "/series", web.qido_series, methods=["GET"]),
        Route(s + "/instances", web.qido_instances, methods=["GET"]),
        Route(s + se + "/instances", web.qido_instances, methods=["GET"]),
        Route(s, web.retrieve, methods=["GET"]),
        Route(s + se, web.retrieve, methods=["GET"]),
        Route(s + se + i, web.retrieve, methods=["GET"]),
        Route(s + "/metadata", web.metadata, methods=["GET"]),
        Route(s + se + "/metadata", web.metadata, methods=["GET"]),
        Route(s + se + i + "/metadata", web.metadata, methods=["GET"]),
        Route("/status", web.status_json, methods=["GET"]),
        Route("/status/studies/{study}", web.study_json, methods=["GET"]),
        Route("/metrics", web.metrics, methods=["GET"]),
        Route("/", web.page, methods=["GET"]),
    ]
    middleware = [Middleware(BearerAuth, token=cfg.dicomweb.token)] if cfg.dicomweb.token else []
    return Starlette(routes=routes, middleware=middleware)


class DicomWebServer:
    """uvicorn in a background thread of ``mammonode serve``."""

    def __init__(self, cfg: Config, db: Database):
        import uvicorn

        web = cfg.dicomweb
        self.config = uvicorn.Config(
            create_app(cfg, db),
            host=web.host,
            port=web.port,
            log_level="warning",
            lifespan="off",
            ssl_certfile=web.tls_cert or None,
            ssl_keyfile=web.tls_key or None,
            access_log=False,
        )
        self.server = uvicorn.Server(self.config)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.server.run, name="dicomweb", daemon=True)
        self.thread.start()
        log.info(
            "DICOMweb on %s:%s%s", self.config.host, self.config.port, " (TLS)" if self.config.ssl_certfile else ""
        )

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
