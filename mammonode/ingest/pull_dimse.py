"""Pulling from a DIMSE source: C-FIND (study, series, image level), then C-MOVE or C-GET.

C-MOVE asks the source to send to ``node.ae_title``: the running node's listener receives
the instances like any push, and a sub-operation counts as completed once the node has
acknowledged it (i.e. stored it durably). C-GET receives the C-STOREs on the puller's own
association, the storage SOP classes proposed with the SCP role (role selection, PS3.7
D.3.3.4), and stores each through :func:`mammonode.ingest.store.ingest` before answering.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from mammonode.config import Config, Source
from mammonode.db.session import Database
from mammonode.ingest.dimse import configure_pynetdicom, failure_status, spool_into, store_request
from mammonode.ingest.layout import StorageLayout
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
from mammonode.ingest.store import CANNOT_UNDERSTAND, StoreError

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)
# Retrieve statuses (PS3.4 C.4.2.1.5, C.4.3.1.4): success, and "sub-operations complete,
# one or more failures or warnings"; the move destination unknown to the source.
SUCCESS, SOME_FAILED, MOVE_DESTINATION_UNKNOWN = 0x0000, 0xB000, 0xA801


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


class DimseSourceClient:
    """C-FIND / C-MOVE / C-GET against one ``[[sources]]`` DIMSE peer; the calling AE title
    is ``node.ae_title`` (the source knows the node by it, and moves to it)."""

    def __init__(self, source: Source, cfg: Config, db: Database):
        self.source = source
        self.cfg = cfg
        self.db = db

    # -- associations ------------------------------------------------------------------
    def _ae(self) -> AE:
        ae = AE(ae_title=self.cfg.node.ae_title)
        ae.acse_timeout = max(self.cfg.node.acse_timeout_s, 10.0)
        ae.network_timeout = ae.dimse_timeout = self.cfg.node.network_timeout_s
        return ae

    def _check_reachable(self) -> None:
        try:
            with socket.create_connection((self.source.host, self.source.port), timeout=10):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise PullError(
                f"source {self.source.name}: cannot connect to {self.source.host}:{self.source.port} ({reason})"
            ) from None

    @contextmanager
    def _association(self, ae: AE, **kwargs) -> Iterator:
        self._check_reachable()
        assoc = ae.associate(self.source.host, self.source.port, ae_title=self.source.ae_title, **kwargs)
        if not assoc.is_established:
            if assoc.is_rejected:
                why = f"rejected by {self.source.ae_title} (is calling AE {self.cfg.node.ae_title} known to it?)"
            else:  # pynetdicom aborts when the peer accepted none of the presentation contexts
                why = f"aborted: {self.source.ae_title} offers none of the services asked for, or timed out"
            raise PullError(f"source {self.source.name}: association {why}")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _find(self, assoc, identifier: Dataset) -> list[Dataset]:
        found = []
        try:
            responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
            for status, match_ds in responses:
                code = status.get("Status") if status else None
                if code is None:
                    raise PullError(f"source {self.source.name}: no C-FIND response (timed out or aborted)")
                if code in PENDING:
                    if match_ds is not None:
                        found.append(match_ds)
                elif code != SUCCESS:
                    level = identifier.QueryRetrieveLevel
                    raise PullError(f"source {self.source.name}: C-FIND at {level} level failed, status 0x{code:04X}")
        except ValueError as exc:  # no accepted presentation context
            raise PullError(f"source {self.source.name}: {exc}") from None
        return found

    # -- queries -----------------------------------------------------------------------
    def find_studies(self, query: PullQuery) -> list[RemoteStudy]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        studies: list[RemoteStudy] = []
        with self._association(ae) as assoc:
            for uid in query.study_uids or ("",):
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "STUDY"
                identifier.StudyInstanceUID = uid
                identifier.StudyDate = query.date_range
                identifier.ModalitiesInStudy = query.modality
                for ds in self._find(assoc, identifier):
                    found = _text(ds, "StudyInstanceUID")
                    if found and (not query.study_uids or found == uid):
                        studies.append(RemoteStudy(found, _text(ds, "StudyDate")))
        return studies

    def list_instances(self, study_uid: str, modality: str) -> list[RemoteInstance]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        instances: list[RemoteInstance] = []
        with self._association(ae) as assoc:
            series = Dataset()
            series.QueryRetrieveLevel = "SERIES"
            series.StudyInstanceUID = study_uid
            series.SeriesInstanceUID = ""
            series.Modality = modality
            for found in self._find(assoc, series):
                series_uid = _text(found, "SeriesInstanceUID")
                if not series_uid or (modality and _text(found, "Modality").upper() != modality.upper()):
                    continue
                image = Dataset()
                image.QueryRetrieveLevel = "IMAGE"
                image.StudyInstanceUID = study_uid
                image.SeriesInstanceUID = series_uid
                image.SOPInstanceUID = ""
                image.SOPClassUID = ""
                for item in self._find(assoc, image):
                    sop_uid = _text(item, "SOPInstanceUID")
                    if sop_uid:
                        instances.append(RemoteInstance(study_uid, series_uid, sop_uid, _text(item, "SOPClassUID")))
        return instances

    # -- retrieval ---------------------------------------------------------------------
    def fetch(self, plans: list[StudyPlan], advance: Advance, total: Fetched) -> None:
        if self.source.retrieve == "get":
            self._get(plans, advance, total)
            return
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        with self._association(ae) as assoc:
            for identifier, count in _requests(plans):
                responses = assoc.send_c_move(
                    identifier, self.cfg.node.ae_title, StudyRootQueryRetrieveInformationModelMove
                )
                self._retrieved(responses, identifier, count, total, advance)

    def _get(self, plans: list[StudyPlan], advance: Advance, stored: Fetched) -> None:
        configure_pynetdicom()  # spool received data sets to disk, as the listener does
        spool_into(StorageLayout(self.cfg.storage_dir).tmp_dir / "spool")
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        classes = sorted({i.sop_class_uid for p in plans for i in p.missing if i.sop_class_uid})
        if len(classes) > 127:
            raise PullError(f"source {self.source.name}: {len(classes)} SOP classes, more than one C-GET can take")
        for sop_class in classes:
            ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES)
        roles = [build_role(sop_class, scp_role=True) for sop_class in classes]
        handlers = [(evt.EVT_C_STORE, functools.partial(self._store, stored=stored, advance=advance))]
        reported = Fetched()  # what the source's responses say; ``stored`` counts the handler's
        with self._association(ae, ext_neg=roles, evt_handlers=handlers) as assoc:
            for identifier, count in _requests(plans):
                responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
                self._retrieved(responses, identifier, count, reported, None)
        # Sub-operations the source reports failed never reached the handler: count them too.
        stored.failed = max(stored.failed, reported.failed)
        stored.failed_in = reported.failed_in

    def _store(self, event, stored: Fetched, advance: Advance) -> Dataset | int:
        request = event.request
        try:
            result = store_request(event, self.cfg, self.cfg.storage_dir, self.db, self.source.ae_title)
        except StoreError as exc:
            stored.failed += 1
            advance(1)
            log.warning("pull: instance %s refused: %s", request.AffectedSOPInstanceUID, exc.comment)
            return failure_status(exc.status, exc.comment)
        except Exception as exc:  # never crash the association thread, never claim success
            stored.failed += 1
            advance(1)
            # One line (a database or disk error would repeat for every instance); the
            # traceback at DEBUG.
            log.error("pull: storing instance %s failed: %s", request.AffectedSOPInstanceUID, error_reason(exc))
            log.debug("pull: storing instance %s failed", request.AffectedSOPInstanceUID, exc_info=True)
            return failure_status(CANNOT_UNDERSTAND, f"internal error: {type(exc).__name__}")
        stored.stored(result, str(request.AffectedSOPClassUID))
        advance(1)
        log.debug(
            "pull: stored instance %s of study %s (%s)",
            result.sop_instance_uid,
            result.study_instance_uid,
            result.outcome,
        )
        return 0x0000

    def _retrieved(self, responses, identifier: Dataset, count: int, total: Fetched, advance: Advance | None) -> None:
        """Read one C-MOVE/C-GET's responses: progress from the pending ones' counters, the
        outcome from the final one."""
        done = 0
        final: Dataset | None = None
        for status, _ in responses:
            code = status.get("Status") if status else None
            if code is None:
                raise PullError(f"source {self.source.name}: no retrieve response (timed out or aborted)")
            counted = sum(int(status.get(k, 0) or 0) for k in _COUNTERS)
            if advance is not None and counted > done:
                advance(counted - done)
                done = counted
            if code not in PENDING:
                final = status
        code = final.Status if final is not None else None
        if code == MOVE_DESTINATION_UNKNOWN:
            raise PullError(
                f"source {self.source.name}: it does not know the move destination {self.cfg.node.ae_title} "
                "(add the node's AE title, host and port to the source)"
            )
        study = identifier.StudyInstanceUID
        if code in (SUCCESS, SOME_FAILED) and final is not None:
            failed = int(final.get("NumberOfFailedSubOperations", 0) or 0)
            ok = int(final.get("NumberOfCompletedSubOperations", 0) or 0) + int(
                final.get("NumberOfWarningSubOperations", 0) or 0
            )
            if code == SUCCESS and not ok and not failed:
                ok = count  # counters are optional in a final success
        else:
            ok, failed = 0, count
        if advance is not None and ok + failed > done:
            advance(ok + failed - done)
        total.fetched += ok
        if failed:
            total.lost(str(study), failed)
        if failed:
            log.warning("pull: study %s: %d of %d instances failed (status 0x%04X)", study, failed, count, code or 0)


_COUNTERS = ("NumberOfCompletedSubOperations", "NumberOfFailedSubOperations", "NumberOfWarningSubOperations")


def _requests(plans: list[StudyPlan]) -> Iterator[tuple[Dataset, int]]:
    """One retrieve identifier per missing series (SERIES level), or per instance (IMAGE
    level) where part of the series is held already; with how many instances each brings."""
    for plan in plans:
        for series_uid, whole, items in series_requests(plan):
            if whole:
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "SERIES"
                identifier.StudyInstanceUID = plan.study.study_uid
                identifier.SeriesInstanceUID = series_uid
                yield identifier, len(items)
                continue
            for item in items:
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "IMAGE"
                identifier.StudyInstanceUID = plan.study.study_uid
                identifier.SeriesInstanceUID = series_uid
                identifier.SOPInstanceUID = item.sop_uid
                yield identifier, 1
