"""Pulling from a DICOMweb source: QIDO-RS to find and list, WADO-RS to fetch.

Each response of WADO-RS (multipart/related; type="application/dicom") is parsed as it
streams (python-multipart): every part goes to a spool file in the storage directory's
``tmp/`` and through :func:`mammonode.ingest.store.ingest`, then the file is removed, so
one part at a time is on disk and nothing whole is held in memory. No redirect is followed
(the bearer token goes to the configured origin only).
"""

from __future__ import annotations

import functools
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import BinaryIO

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError

from mammonode.config import Config, Source
from mammonode.db.session import Database
from mammonode.ingest.layout import StorageLayout, ensure_dir
from mammonode.ingest.pull import (
    Advance,
    Fetched,
    PullError,
    PullQuery,
    RemoteInstance,
    RemoteStudy,
    StudyPlan,
    error_reason,
    series_requests,
)
from mammonode.ingest.rules import match
from mammonode.ingest.store import OUT_OF_RESOURCES, OUT_OF_RESOURCES_DB, StoreError, ingest

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
# transfer-syntax=*: as the source stores it (PS3.18 8.7.3.5.2); ingest takes any.
MULTIPART_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK = 1 << 20
PAGE = 100  # QIDO-RS results asked for per request (limit)


class _StoreBroken(Exception):
    """Storing a part failed for the node's reasons (database, disk, unforeseen), not the
    instance's: the fetch stops rather than fail every later instance the same way."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib raises HTTPError with the redirect's code


_OPENER = urllib.request.build_opener(_NoRedirect)


def _first(item: dict, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0]).strip()


def _boundary(content_type: str) -> str:
    for piece in content_type.split(";")[1:]:
        key, _, value = piece.partition("=")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"')
    return ""


class DicomwebSourceClient:
    """QIDO-RS / WADO-RS against one ``[[sources]]`` entry with a ``url``."""

    def __init__(self, source: Source, cfg: Config, db: Database):
        self.source = source
        self.cfg = cfg
        self.db = db
        self.base = source.url.rstrip("/")
        self.timeout = cfg.node.network_timeout_s

    def _open(self, path: str, accept: str, params: dict[str, str] | None = None):
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v})
        url = f"{self.base}{path}" + (f"?{query}" if query else "")
        headers = {"Accept": accept}
        if self.source.token:
            headers["Authorization"] = f"Bearer {self.source.token}"
        try:
            return _OPENER.open(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (401, 403):
                hint = "set sources token" if not self.source.token else "check the source's token"
                raise PullError(f"source {self.source.name}: HTTP {exc.code} from {self.base} ({hint})") from None
            raise PullError(f"source {self.source.name}: HTTP {exc.code} for {path}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PullError(f"source {self.source.name}: cannot reach {self.base} ({reason})") from None

    def _json(self, path: str, params: dict[str, str]) -> tuple[list[dict], bool]:
        """One QIDO-RS page, and whether the server said more results can be requested."""
        with self._open(path, DICOM_JSON, params) as response:
            body = response.read()
            warnings = response.headers.get_all("Warning") or []
        more = any("additional results" in w.lower() for w in warnings)
        if response.status == 204 or not body.strip():
            return [], more
        try:
            items = json.loads(body)
        except ValueError:
            raise PullError(f"source {self.source.name}: {path} did not answer DICOM JSON") from None
        if not isinstance(items, list):
            raise PullError(f"source {self.source.name}: {path} did not answer a DICOM JSON array")
        return [item for item in items if isinstance(item, dict)], more

    def _search(self, path: str, params: dict[str, str], key: str) -> list[dict]:
        """All matches of a QIDO-RS search, page by page (PS3.18's limit and offset query
        parameters): a server stops at its own maximum, so one request could silently miss
        studies. It goes on while a page is full or the server warns of additional results
        (Warning 299); a page that brings nothing new (a server that ignores offset) ends it.
        Deduplicated by ``key``."""
        found: dict[str, dict] = {}
        offset = 0
        while True:
            page, more = self._json(path, {**params, "limit": str(PAGE), "offset": str(offset)})
            new = 0
            for item in page:
                uid = _first(item, key)
                if uid and uid not in found:
                    found[uid] = item
                    new += 1
            if not new or not (len(page) >= PAGE or more):
                return list(found.values())
            offset += len(page)

    # -- queries -----------------------------------------------------------------------
    def find_studies(self, query: PullQuery) -> list[RemoteStudy]:
        studies = []
        for uid in query.study_uids or ("",):
            params = {
                "StudyInstanceUID": uid,
                "StudyDate": query.date_range,
                "ModalitiesInStudy": query.modality,
                "includefield": "00080020",
            }
            for item in self._search("/studies", params, "0020000D"):
                found = _first(item, "0020000D")
                if found and (not uid or found == uid):
                    studies.append(RemoteStudy(found, _first(item, "00080020")))
        return studies

    def list_instances(self, study_uid: str, modality: str) -> list[RemoteInstance]:
        instances = []
        for series in self._search(f"/studies/{study_uid}/series", {"Modality": modality}, "0020000E"):
            series_uid = _first(series, "0020000E")
            if not series_uid or (modality and _first(series, "00080060").upper() != modality.upper()):
                continue
            for item in self._search(f"/studies/{study_uid}/series/{series_uid}/instances", {}, "00080018"):
                sop_uid = _first(item, "00080018")
                if sop_uid:
                    instances.append(RemoteInstance(study_uid, series_uid, sop_uid, _first(item, "00080016")))
        return instances

    # -- retrieval ---------------------------------------------------------------------
    def fetch(self, plans: list[StudyPlan], advance: Advance, total: Fetched) -> None:
        classes = {i.sop_uid: i.sop_class_uid for p in plans for i in p.missing}
        wanted = len(classes)
        try:
            for plan in plans:
                study = plan.study.study_uid
                for series_uid, whole, items in series_requests(plan):
                    paths = (
                        [f"/studies/{study}/series/{series_uid}"]
                        if whole
                        else [f"/studies/{study}/series/{series_uid}/instances/{i.sop_uid}" for i in items]
                    )
                    expected = len(items) if whole else 1
                    for path in paths:
                        done = self._retrieve(path, study, classes, total, advance)
                        if done < expected:  # parts the source did not send
                            total.lost(study, expected - done)
                            advance(expected - done)
                            log.warning("pull: study %s: %d instances not received", study, expected - done)
        except _StoreBroken as exc:
            rest = max(wanted - total.fetched - total.failed, 0)
            total.failed += rest
            advance(rest)
            total.error = f"source {self.source.name}: storing a pulled instance failed ({exc}); the pull stopped"

    def _retrieve(self, path: str, study: str, classes: dict[str, str], total: Fetched, advance: Advance) -> int:
        """One WADO-RS request, each part stored as it ends; how many parts it held."""
        spool = StorageLayout(self.cfg.storage_dir).tmp_dir / "spool"
        ensure_dir(spool)
        state: dict = {"file": None, "path": None, "parts": 0}
        store = functools.partial(self._store_part, study=study, classes=classes, total=total, advance=advance)

        def on_part_begin() -> None:
            state["path"] = spool / f"pull-{uuid.uuid4().hex}.dcm"
            state["file"] = open(state["path"], "wb")

        def on_part_data(data: bytes, start: int, end: int) -> None:
            state["file"].write(data[start:end])

        def on_part_end() -> None:
            state["file"].close()
            state["parts"] += 1
            try:
                store(state["path"])
            finally:
                state["path"].unlink(missing_ok=True)

        try:
            with self._open(path, MULTIPART_DICOM) as response:
                boundary = _boundary(response.headers.get("Content-Type", ""))
                if not boundary:
                    raise PullError(f"source {self.source.name}: {path} did not answer multipart/related")
                parser = MultipartParser(
                    boundary,
                    {"on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end},
                )
                _feed(response, parser)
        except (OSError, MultipartParseError) as exc:  # cut off or malformed: the rest counts as failed
            log.warning("pull: %s from %s broke off: %s", path, self.source.name, type(exc).__name__)
        finally:
            if state["file"] is not None and not state["file"].closed:
                state["file"].close()
            if state["path"] is not None:
                state["path"].unlink(missing_ok=True)
        return state["parts"]

    def _store_part(self, path: Path, study: str, classes: dict[str, str], total: Fetched, advance: Advance) -> None:
        try:
            result = ingest(
                path,
                self.cfg.storage_dir,
                self.db,
                calling_ae=None,
                max_inflated_bytes=self.cfg.storage.max_inflated_bytes,
                router=functools.partial(match, self.cfg.rules, calling_ae=None),
            )
        except StoreError as exc:
            total.lost(study)
            if exc.status in (OUT_OF_RESOURCES, OUT_OF_RESOURCES_DB):  # database, disk: so would the rest
                advance(1)
                raise _StoreBroken(exc.comment) from None
            log.warning("pull: an instance from %s was refused: %s", self.source.name, exc.comment)
        except Exception as exc:  # unforeseen: every later instance would likely fail the same way
            total.lost(study)
            advance(1)
            log.debug("pull: storing an instance from %s failed", self.source.name, exc_info=True)
            raise _StoreBroken(error_reason(exc)) from None
        else:
            total.stored(result, classes.get(result.sop_instance_uid, ""))
            log.debug("pull: stored instance %s of study %s", result.sop_instance_uid, result.study_instance_uid)
        advance(1)


def _feed(response: BinaryIO, parser: MultipartParser) -> None:
    while chunk := response.read(CHUNK):
        parser.write(chunk)
    parser.finalize()
