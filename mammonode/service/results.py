"""Keeping a job's result objects: written durably under the storage directory, then
registered in the database with one outbox row per destination that receives them, in that
order (a row never points at a file that is not there).

Results are versioned (reporting.uids.version_key). Each destination receives the outputs
it lists, its SR as Comprehensive 3D SR or Comprehensive SR, and, with ``iocm``, a
rejection note for the objects of earlier versions it received. The new SRs name the SRs
they supersede.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from mammonode.config import Config, Destination
from mammonode.db import outbox
from mammonode.db.installation import installation_identity
from mammonode.db.models import ResultObject, Study
from mammonode.db.session import Database
from mammonode.ingest.layout import StorageLayout, write_dataset
from mammonode.pipeline.images import PreparedView
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting.header import Equipment
from mammonode.reporting.kos import rejection_note
from mammonode.reporting.objects import SR_KINDS, BuiltObject, build_objects, object_version, sources_from_prepared

log = logging.getLogger(__name__)

SR_KIND = {"comprehensive3d": "sr", "comprehensive": "sr-comprehensive"}  # config sr_sop_class -> kind
# Which earlier SR a new SR of each kind names as its predecessor, in order of preference.
PREDECESSOR_KINDS = {
    "sr": ("sr", "sr-comprehensive"),
    "sr-comprehensive": ("sr-comprehensive", "sr"),
    "cad_sr": ("cad_sr",),
}


def output_of(kind: str) -> str | None:
    """The destination output (config ``outputs``) a result kind belongs to."""
    if kind in SR_KINDS:
        return "sr"
    if kind == "cad_sr":
        return "cad_sr"
    if kind.startswith("pm-"):
        return "parametric_maps"
    if kind.startswith("sc-"):
        return "heatmaps"
    if kind == "summary":
        return "summary"
    return None


def receives(dest: Destination, obj: BuiltObject, clinical: bool) -> bool:
    """Whether ``dest`` gets ``obj``: its output is listed, the SR in the destination's SOP
    class, and a clinical-only object (the CAD SR) only from verified, non-test weights
    (``clinical``): a workstation shows CAD as CAD, with no room for a test notice."""
    output = output_of(obj.kind)
    if output not in dest.outputs or (obj.clinical_only and not clinical):
        return False
    if output == "sr":
        return obj.kind == SR_KIND[dest.sr_sop_class]
    return True


def _wants_comprehensive(destinations: Sequence[Destination]) -> bool:
    return any("sr" in d.outputs and d.sr_sop_class == "comprehensive" for d in destinations)


def _header(storage_dir: Path, path: str) -> Dataset | None:
    """An earlier result's header, read back from its file (None when it is gone)."""
    try:
        return pydicom.dcmread(storage_dir / path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        log.warning("earlier result %s unreadable: %s", path, exc)
        return None


def _predecessors(earlier: Sequence[outbox.EarlierResult], storage_dir: Path) -> dict[str, list[Dataset]]:
    """Per SR kind, the newest earlier SR it supersedes."""
    newest: dict[str, outbox.EarlierResult] = {}
    for row in earlier:  # newest first
        newest.setdefault(row.kind, row)
    out = {}
    for kind, candidates in PREDECESSOR_KINDS.items():
        row = next((newest[k] for k in candidates if k in newest), None)
        header = _header(storage_dir, row.path) if row is not None else None
        if header is not None:
            out[kind] = [header]
    return out


def _rejection_notes(
    destinations: Sequence[Destination],
    earlier: Sequence[outbox.EarlierResult],
    storage_dir: Path,
    study_uid: str,
    version: str,
) -> list[tuple[BuiltObject, tuple[str, ...]]]:
    """One note per distinct set of superseded objects that IOCM destinations received;
    a destination that received none of them gets no note."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for dest in destinations:
        if dest.iocm:
            received = tuple(sorted(row.sop_instance_uid for row in earlier if dest.name in row.reached))
            if received:
                groups.setdefault(received, []).append(dest.name)
    by_uid = {row.sop_instance_uid: row for row in earlier}
    notes = []
    for uids, names in groups.items():
        headers = [h for h in (_header(storage_dir, by_uid[uid].path) for uid in uids) if h is not None]
        if headers:
            notes.append((BuiltObject("kos", rejection_note(headers, study_uid, version)), tuple(names)))
    return notes


def node_equipment(db: Database) -> Equipment:
    """This installation as result equipment: its Device Observer UID and serial number are
    generated on first use and kept in the database."""

    def generate() -> tuple[str, str]:
        new = Equipment.generate()
        return new.device_uid, new.serial_number

    device_uid, serial_number = installation_identity(db, generate)
    return Equipment(device_uid=device_uid, serial_number=serial_number)


def store_results(
    cfg: Config,
    db: Database,
    claimed,
    study: Study,
    result: PipelineResult,
    prepared: Mapping[str, PreparedView],
    headers: Mapping[str, Dataset],
) -> list[ResultObject]:
    """Build, write and register the result objects of one job. Re-running the same version
    finds the same UIDs and adds nothing twice. ``headers``: the source data sets (pixel data
    not needed)."""
    layout = StorageLayout(cfg.storage_dir)
    study_uid = study.study_instance_uid
    version = object_version(result, study_uid, claimed.selection_key, cfg.results)
    with db.session() as session:
        earlier = outbox.earlier_results(session, study.id, version)
    objects = build_objects(
        result,
        sources_from_prepared(prepared, headers),
        study_uid,
        claimed.selection_key,
        predecessors=_predecessors(earlier, cfg.storage_dir),
        comprehensive_sr=_wants_comprehensive(cfg.destinations),
        settings=cfg.results,
        equipment=node_equipment(db),
    )
    clinical = cfg.results.cad_sr_with_test_weights or not (result.test_weights or result.unverified_weights)
    routed = [(obj, tuple(d.name for d in cfg.destinations if receives(d, obj, clinical))) for obj in objects]
    routed += _rejection_notes(cfg.destinations, earlier, cfg.storage_dir, study_uid, version)
    written = []
    for obj, names in routed:
        path = layout.result_path(study_uid, obj.kind, str(obj.dataset.SOPInstanceUID))
        write_dataset(obj.dataset, path, layout)
        written.append(
            outbox.NewResult(
                kind=obj.kind,
                sop_class_uid=str(obj.dataset.SOPClassUID),
                sop_instance_uid=str(obj.dataset.SOPInstanceUID),
                path=layout.relative(path),
                destinations=names,
            )
        )
    with db.session() as session:
        return outbox.register_results(
            session,
            study.id,
            claimed.job_id,
            claimed.selection_key,
            written,
            [d.name for d in cfg.destinations],
            version_key=version,
        )
