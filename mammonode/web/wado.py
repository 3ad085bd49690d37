"""WADO-RS: retrieving stored objects and their metadata (PS3.18 10.4)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mammonode import audit
from mammonode.audit.messages import DESTINATION, MINOR_FAILURE, SOURCE, SUCCESS
from mammonode.ingest.stow import DICOM_JSON, dicomweb_base
from mammonode.web import catalog

log = logging.getLogger(__name__)


def _audit_retrieval(request: Request, chosen: list[catalog.Entry], outcome: int, description: str) -> None:
    """110104 action R for a study's instances (or their metadata) read out over WADO-RS:
    this node the source, the client the requestor and destination (IHE RAD-107's audit)."""
    ctx = audit.context()
    if ctx is None or not chosen:
        return
    client = request.client.host if request.client else ""
    patient_id = str(catalog.header(chosen[0].path).get("PatientID", "") or "")
    study = audit.StudyObjects(chosen[0].study_uid, patient_id)
    for entry in chosen:
        study.add(entry.sop_class)
    audit.emit(
        audit.messages.instances_transferred(
            ctx.source,
            ctx.node(False, SOURCE),
            audit.Participant("dicomweb-client", True, DESTINATION, client),
            study,
            action="R",
            outcome=outcome,
            description=description,
        )
    )


def _audit_read(request: Request, chosen: list[catalog.Entry], outcome: int, description: str) -> None:
    """:func:`_audit_retrieval` that never fails the response."""
    try:
        _audit_retrieval(request, chosen, outcome, description)
    except Exception:  # noqa: BLE001 - e.g. a file purged meanwhile: the response stands, the log says it
        log.exception("could not audit a WADO-RS retrieval of study %s", chosen[0].study_uid)


class _AuditedStream(StreamingResponse):
    """A multipart body audited once it has ended: every part sent, or cut short by the
    client (or a failure). Audited here rather than in the generator, whose clean-up a
    disconnect leaves to the garbage collector."""

    def __init__(self, parts: Iterator[bytes], audit_end: Callable[[bool], None], media_type: str):
        self.sent_all = False
        self._audit_end = audit_end

        def content() -> Iterator[bytes]:
            yield from parts
            self.sent_all = True  # the last part went to the client before the generator got here

        super().__init__(content(), media_type=media_type)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(self._audit_end, self.sent_all)


class Wado(catalog.Catalog):
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

        def parts():
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

        def audit_end(complete: bool) -> None:
            if complete:
                _audit_read(request, chosen, SUCCESS, "WADO-RS retrieve")
            else:
                _audit_read(request, chosen, MINOR_FAILURE, "WADO-RS retrieve cut short")

        return _AuditedStream(parts(), audit_end, media_type=media)

    def metadata(self, request: Request) -> Response:
        chosen = self._select(request)
        if not chosen:
            return JSONResponse({"error": "not found"}, status_code=404)
        base = dicomweb_base(request, self.base_url)
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
        _audit_read(request, chosen, SUCCESS, "WADO-RS metadata")
        return Response(json.dumps(out), media_type=DICOM_JSON)
