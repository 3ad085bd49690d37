"""QIDO-RS: searching the node's studies, series and instances (PS3.18 10.6)."""

from __future__ import annotations

import json
from collections import defaultdict

from starlette.requests import Request
from starlette.responses import Response

from mammonode import audit
from mammonode.ingest.stow import DICOM_JSON, dicomweb_base
from mammonode.web import catalog

MAX_LIMIT = 1000  # the most results one query returns; a larger ``limit`` is capped to it
MAX_OFFSET = 10**9
MAX_FILTERS = 32


class QueryError(ValueError):
    """A QIDO-RS query the node does not answer (400)."""


def _count(key: str, value: str, cap: int) -> int:
    value = value.strip()
    if not value.isascii() or not value.isdigit():
        raise QueryError(f"{key} must be a non-negative integer")
    return cap if len(value) > len(str(cap)) else min(int(value), cap)


def _bad_query(exc: QueryError) -> Response:
    return Response(json.dumps({"error": str(exc)}), status_code=400, media_type="application/json")


def _audit_query(request: Request) -> None:
    """110112 Query for a search answered: the client as requestor, this node as responder."""
    ctx = audit.context()
    if ctx is None:
        return
    client = request.client.host if request.client else ""
    audit.emit(
        audit.messages.query(
            ctx.source,
            audit.Participant("dicomweb-client", True, audit.messages.SOURCE, client),
            ctx.node(False, audit.messages.DESTINATION),
            str(request.url.path),
            request.url.query,
        )
    )


def _answer(handler):
    """Run a QIDO handler, answering 400 for a query it does not take; audit the ones answered."""

    def wrapped(self, request: Request) -> Response:
        try:
            response = handler(self, request)
        except QueryError as exc:
            return _bad_query(exc)
        _audit_query(request)
        return response

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


class Qido(catalog.Catalog):
    def _filters(self, request: Request) -> tuple[dict[str, str], int, int]:
        from pydicom.datadict import keyword_for_tag

        filters, limit, offset = {}, MAX_LIMIT, 0
        for key, value in request.query_params.multi_items():
            if key == "limit":
                limit = _count(key, value, MAX_LIMIT)
            elif key == "offset":
                offset = _count(key, value, MAX_OFFSET)
            elif key in ("includefield", "fuzzymatching"):
                continue
            else:
                if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
                    key = keyword_for_tag(int(key, 16)) or key
                if len(value) > catalog.MAX_MATCH_CHARS:
                    raise QueryError(f"match value for {key[:64]} longer than {catalog.MAX_MATCH_CHARS} characters")
                if value.count("*") + value.count("?") > catalog.MAX_WILDCARDS:
                    raise QueryError(f"match value for {key[:64]} has more than {catalog.MAX_WILDCARDS} wildcards")
                filters[key] = value
        if len(filters) > MAX_FILTERS:
            raise QueryError(f"more than {MAX_FILTERS} match keys")
        return filters, limit, offset

    @_answer
    def studies(self, request: Request) -> Response:
        filters, limit, offset = self._filters(request)
        base = dicomweb_base(request, self.base_url)
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

    @_answer
    def series(self, request: Request) -> Response:
        study_uid = request.path_params["study"]
        filters, limit, offset = self._filters(request)
        base = dicomweb_base(request, self.base_url)
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

    @_answer
    def instances(self, request: Request) -> Response:
        study_uid = request.path_params["study"]
        series_uid = request.path_params.get("series")
        filters, limit, offset = self._filters(request)
        base = dicomweb_base(request, self.base_url)
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
