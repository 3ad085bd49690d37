"""Data is never destroyed or mixed: a restored database backup, one SOP Instance UID in two
studies, one Study Instance UID for two patients, and a read-only disk or database.

The tests send small synthetic exams to `mammonode serve` over loopback (one runs ingest,
recovery and reindex in process) and check what came back against the DICOM standard and
against what was sent. The read-only tests need root (a tmpfs remounted read-only, an
immutable database file), like the disk-full test.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support.dicom import send_datasets, stow
from support.node import NodeProcess, cli_json
from support.paths import need_tool, temp_files

from mammonode.demo.phantom import exam_datasets
from mammonode.ingest.layout import files_below

pytestmark = pytest.mark.network
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and immutable files need root")

SHAPE = (650, 500)
SUCCESS = 0x0000
WARNINGS = (0xB000, 0xB006, 0xB007)  # PS3.4 Table B.2-1: the only non-failure answers
DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 Annex C: Failure, "Duplicate SOP Instance"


def out_of_resources(status: int | None) -> bool:
    """PS3.4 Table B.2-1: A7xx, "Refused: Out of Resources"."""
    return status is not None and 0xA700 <= status <= 0xA7FF


def c_store(port: int, datasets: list[Dataset]) -> list[tuple[int | None, str]]:
    """(Status, Error Comment) of each C-STORE, over one association."""
    from pynetdicom import AE

    ae = AE(ae_title="SAFETYSCU")
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
    assert assoc.is_established
    out = []
    for ds in datasets:
        rsp = assoc.send_c_store(ds)
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        out.append((status, str(rsp.get("ErrorComment", "")) if rsp is not None else ""))
    assoc.release()
    return out


def failure_reasons(response: Dataset | None) -> list[int]:
    return [int(item.FailureReason) for item in (response.get("FailedSOPSequence") or [])] if response else []


def stored_sop_uids(storage: Path) -> set[str]:
    """SOP Instance UIDs of every received file anywhere in the storage directory (file
    names are ``<SOP UID>.<hash>.dcm``)."""
    return {p.name.rsplit(".", 2)[0] for p in storage.rglob("*.dcm") if "results" not in p.parts}


def detail(node, study_uid: str) -> dict | None:
    """The study as `mammonode study --json` shows it, from the running node's /status
    endpoint (one HTTP request instead of one CLI process per check)."""
    response = requests.get(f"http://127.0.0.1:{node.web_port}/status/studies/{study_uid}", timeout=30)
    return None if response.status_code == 404 else response.json()


def recorded(node, study_uid: str) -> set[str]:
    return {i["sop_instance_uid"] for i in (detail(node, study_uid) or {"instances": []})["instances"]}


def rows_match_files(node) -> None:
    """Every row has its file under instances/, every file there its row; tmp/ is empty."""
    with closing(sqlite3.connect(node.storage / "mammonode.sqlite")) as db:
        paths = {row[0] for row in db.execute("select path from instances")}
    files = {str(p.relative_to(node.storage)) for p in (node.storage / "instances").rglob("*") if p.is_file()}
    assert paths == files
    assert not temp_files(node.storage)


@contextmanager
def tmpfs(path: Path, size: str = "64m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


# -- 1. a restored (or lost) database never costs a stored file ------------------------------


def test_restored_database_backup_keeps_every_file_and_reindex_rebuilds_the_rows(node_factory, tmp_path):
    node = node_factory(worker={"enabled": False}).start()
    exam = exam_datasets(patient_id="SAFETYPID31", patient_name="SAFETY^QUINN", shape=SHAPE)
    sent = {str(ds.SOPInstanceUID) for ds in exam}
    study_uid = str(exam[0].StudyInstanceUID)
    assert send_datasets(node.port, exam[:2]) == [SUCCESS, SUCCESS]
    backup = tmp_path / "backup.sqlite"
    with closing(sqlite3.connect(node.storage / "mammonode.sqlite")) as live, closing(sqlite3.connect(backup)) as to:
        live.backup(to)  # SQLite's online backup, taken while the node runs
    assert send_datasets(node.port, exam[2:]) == [SUCCESS, SUCCESS]  # acknowledged after the backup
    node.stop()
    for leftover in node.storage.glob("mammonode.sqlite*"):
        leftover.unlink()
    shutil.copyfile(backup, node.storage / "mammonode.sqlite")  # the operator restores the backup
    unfinished = node.storage / "tmp" / "unfinished.part"
    unfinished.write_bytes(b"half a data set")

    node.start()  # start-up recovery runs here
    assert stored_sop_uids(node.storage) == sent, "an acknowledged instance file was deleted"
    assert not unfinished.exists(), "a temporary file of an unfinished write is the one thing to remove"
    assert recorded(node, study_uid) == {str(ds.SOPInstanceUID) for ds in exam[:2]}
    assert node.status()["quarantined_files"] == 2
    warnings = [json.loads(line) for line in node.log().splitlines() if "quarantine" in line]
    assert any(w["level"] == "WARNING" for w in warnings), node.log()[-2000:]
    rows_match_files(node)

    counts = cli_json("db", "reindex", config=node.config)  # the node keeps running
    assert counts["restored"] == 2 and counts["refused"] == 0 and counts["quarantined_files"] == 0
    assert recorded(node, study_uid) == sent
    rows_match_files(node)
    again = cli_json("db", "reindex", config=node.config)
    assert (again["recorded"], again["restored"], again["unchanged"]) == (0, 0, 4)
    assert recorded(node, study_uid) == sent
    node.stop()
    for needle in ("SAFETYPID31", "SAFETY^QUINN", "QUINN"):
        assert needle not in node.log()


def test_lost_database_and_crash_leftovers_are_rebuilt_from_the_files(tmp_path):
    """In process, no node: a crash between rename and commit, the same object sent again,
    then the database lost entirely. The files alone give back every row."""
    from mammonode.db.migrate import upgrade
    from mammonode.db.session import Database
    from mammonode.ingest.recovery import recover, reindex
    from mammonode.ingest.store import ingest

    storage = tmp_path / "storage"
    exam = exam_datasets(shape=SHAPE)
    spooled = []
    for ds in exam[:3]:
        spooled.append(tmp_path / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(spooled[-1], enforce_file_format=True)

    def database(name: str) -> Database:
        db = Database(f"sqlite:///{tmp_path / name}")
        upgrade(db.engine)
        return db

    db = database("first.sqlite")
    for path in spooled:
        ingest(path, storage, db)
    with closing(sqlite3.connect(tmp_path / "first.sqlite")) as raw:  # a crash before the commit
        raw.execute("delete from instances where sop_instance_uid = ?", (str(exam[2].SOPInstanceUID),))
        raw.commit()
    recover(storage, db)
    assert stored_sop_uids(storage) == {str(ds.SOPInstanceUID) for ds in exam[:3]}
    ingest(spooled[2], storage, db)  # the sender never got a success and sends again
    assert reindex(storage, db)["restored"] == 1  # the quarantined copy: same bytes, now redundant
    assert not list(files_below(storage / "quarantine"))

    db.dispose()
    lost = database("lost.sqlite")  # the database is gone; a new, empty one
    recover(storage, lost)
    assert len(list(files_below(storage / "quarantine"))) == 3
    counts = reindex(storage, lost)
    assert (counts["restored"], counts["refused"], counts["quarantined_files"]) == (3, 0, 0)
    assert reindex(storage, lost)["unchanged"] == 3
    with closing(sqlite3.connect(tmp_path / "lost.sqlite")) as raw:
        rows = {sop for (sop,) in raw.execute("select sop_instance_uid from instances")}
    assert rows == {str(ds.SOPInstanceUID) for ds in exam[:3]}
    lost.dispose()


# -- 2. one SOP Instance UID in two studies --------------------------------------------------


@pytest.fixture(scope="module")
def receiver(tmp_path_factory) -> Iterator[NodeProcess]:
    """One receive-only node for the tests that only send (saves a start per test)."""
    node = NodeProcess(tmp_path_factory.mktemp("receiver"), worker={"enabled": False}).start()
    yield node
    node.stop(timeout=20)


def test_same_sop_instance_uid_in_another_study_is_refused_and_the_first_kept(receiver):
    node = receiver
    [first] = exam_datasets(shape=SHAPE)[:1]
    assert c_store(node.port, [first])[0][0] == SUCCESS
    intruder = copy.deepcopy(first)  # a colliding UID generator, an anonymiser, a hostile sender
    intruder.StudyInstanceUID = generate_uid()
    intruder.SeriesInstanceUID = generate_uid()
    pixels = bytearray(intruder.PixelData)
    pixels[:64] = bytes(64)
    intruder.PixelData = bytes(pixels)

    [(status, comment)] = c_store(node.port, [intruder])
    assert status not in (SUCCESS, *WARNINGS), f"0x{status:04X}: the second object was acknowledged"
    assert status == DUPLICATE_SOP_INSTANCE and comment, (hex(status), comment)
    code, response = stow(node, [intruder])
    assert code == 409 and failure_reasons(response) == [DUPLICATE_SOP_INSTANCE], (code, response)

    assert detail(node, str(intruder.StudyInstanceUID)) is None
    [row] = detail(node, str(first.StudyInstanceUID))["instances"]
    assert row["sop_instance_uid"] == str(first.SOPInstanceUID) and row["revisions"] == 0
    kept = pydicom.dcmread(node.storage / row["path"])
    assert kept.StudyInstanceUID == first.StudyInstanceUID and kept.PixelData == first.PixelData
    assert len(list(node.storage.rglob(f"{first.SOPInstanceUID}.*.dcm"))) == 1, "a second file for the UID"
    assert not (node.storage / "instances" / str(intruder.StudyInstanceUID)).exists()
    assert not (node.storage / "quarantine").exists()
    assert c_store(node.port, [first])[0][0] == SUCCESS  # the first object itself is still welcome


# -- 3. one Study Instance UID holding two patients' images ----------------------------------


def test_instances_of_another_patient_are_kept_out_of_the_exam_and_the_study_flagged(receiver):
    node = receiver
    exam = exam_datasets(patient_id="PIDALPHA4471", patient_name="ALPHA^ANNA", shape=SHAPE)
    study_uid = str(exam[0].StudyInstanceUID)
    assert send_datasets(node.port, exam) == [SUCCESS] * 4
    # An L-CC of another patient under the same Study Instance UID (a mis-merge, a reused UID).
    stranger = exam_datasets(patient_id="PIDBRAVO9153", patient_name="BRAVO^BEA", shape=SHAPE, study_uid=study_uid)[0]
    stranger.AcquisitionTime = stranger.ContentTime = "110000"  # newer: it would be the L-CC input
    assert send_datasets(node.port, [stranger]) == [SUCCESS]  # acknowledged and kept

    study = detail(node, study_uid)
    assert len(study["instances"]) == 5
    rows = {i["sop_instance_uid"]: i for i in study["instances"]}
    flagged = rows.pop(str(stranger.SOPInstanceUID))
    assert flagged["usable"] is False and flagged["reason"]
    assert all(row["usable"] for row in rows.values())
    assert study["views"]["L-CC"] == 1, "two patients' L-CC images are both pipeline inputs"
    assert study["note"] and study["quarantined_instances"] == 1
    assert (node.storage / flagged["path"]).is_file()
    errors = requests.get(f"http://127.0.0.1:{node.web_port}/status", timeout=30).json()["errors"]
    assert any(e["level"] == "ERROR" and e["study_instance_uid"] == study_uid for e in errors), errors
    with closing(sqlite3.connect(node.storage / "mammonode.sqlite")) as db:
        [(patient_id,)] = db.execute("select patient_id from studies where study_instance_uid = ?", (study_uid,))
    assert patient_id == "PIDALPHA4471"  # the first Patient ID recorded is the study's
    text = node.log() + json.dumps(study) + json.dumps(errors)
    for needle in ("PIDALPHA4471", "PIDBRAVO9153", "ALPHA^ANNA", "BRAVO^BEA"):
        assert needle not in text


# -- 4. read-only storage directory or database ----------------------------------------------


@needs_root
def test_storage_remounted_read_only_refuses_every_store_and_resumes(node_factory, tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        node = node_factory(
            storage=disk / "storage", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", worker={"enabled": False}
        ).start()
        exam = exam_datasets(shape=SHAPE)
        study_uid = str(exam[0].StudyInstanceUID)
        assert send_datasets(node.port, exam[:1]) == [SUCCESS]
        remount(disk, "ro")
        [(status, comment)] = c_store(node.port, exam[1:2])
        assert out_of_resources(status) and comment, (status, comment)
        code, response = stow(node, exam[2:3])
        assert code == 503 and all(map(out_of_resources, failure_reasons(response))), (code, response)
        assert recorded(node, study_uid) == {str(exam[0].SOPInstanceUID)}
        remount(disk, "rw")
        assert send_datasets(node.port, exam[1:2]) == [SUCCESS]  # no restart
        assert stow(node, exam[2:3])[0] == 200
        assert recorded(node, study_uid) == {str(ds.SOPInstanceUID) for ds in exam[:3]}
        assert stored_sop_uids(node.storage) == recorded(node, study_uid)
        assert not temp_files(node.storage)
        node.stop()


@needs_root
def test_read_only_database_refuses_every_store_and_storing_resumes_without_restart(node_factory, tmp_path):
    chattr = need_tool("chattr")
    with tmpfs(tmp_path / "disk") as disk:  # tmpfs: immutable files work on every host here
        node = node_factory(storage=disk / "storage", worker={"enabled": False}).start()
        exam = exam_datasets(shape=SHAPE)
        study_uid = str(exam[0].StudyInstanceUID)
        assert send_datasets(node.port, exam[:1]) == [SUCCESS]
        node.stop()
        files = [str(p) for p in node.storage.glob("mammonode.sqlite*")]
        subprocess.run([chattr, "+i", *files], check=True)  # read-only even for root
        try:
            node.start()
            [(status, comment)] = c_store(node.port, exam[1:2])
            assert out_of_resources(status) and comment, (status, comment)
            code, response = stow(node, exam[2:3])
            assert code == 503 and all(map(out_of_resources, failure_reasons(response))), (code, response)
            assert stored_sop_uids(node.storage) == {str(exam[0].SOPInstanceUID)}, "file kept without a row"
        finally:
            subprocess.run([chattr, "-i", *files], check=True)
        resumed = c_store(node.port, exam[1:2])  # the same node process, no restart
        assert resumed[0][0] == SUCCESS, (resumed, node.log()[-3000:])
        assert stow(node, exam[2:3])[0] == 200
        assert recorded(node, study_uid) == {str(ds.SOPInstanceUID) for ds in exam[:3]}
        rows_match_files(node)
        node.stop()


def test_reindex_applies_the_rules_and_never_discards_a_kept_file(tmp_path):
    """A database rebuilt by reindex keeps what the [[rules]] hold: a `store` rule's
    instances are held again, and a file a `drop` rule now matches is held, not deleted."""
    from mammonode.config import Rule
    from mammonode.db.migrate import upgrade
    from mammonode.db.session import Database
    from mammonode.ingest.recovery import recover, reindex
    from mammonode.ingest.store import ingest

    storage = tmp_path / "storage"
    exam = exam_datasets(shape=SHAPE)
    first = Database(f"sqlite:///{tmp_path / 'first.sqlite'}")
    upgrade(first.engine)
    for ds in exam:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ingest(path, storage, first)
    first.dispose()
    rebuilt = Database(f"sqlite:///{tmp_path / 'rebuilt.sqlite'}")
    upgrade(rebuilt.engine)
    recover(storage, rebuilt)
    rules = [
        Rule("hold-cc", "store", match={"view_position": ("CC",)}),
        Rule("drop-rest", "drop"),
    ]
    counts = reindex(storage, rebuilt, rules=rules)
    assert counts["restored"] == len(exam) and counts["refused"] == 0
    assert stored_sop_uids(storage) == {str(ds.SOPInstanceUID) for ds in exam}
    with closing(sqlite3.connect(tmp_path / "rebuilt.sqlite")) as raw:
        rows = dict(raw.execute("select sop_instance_uid, rule from instances where held"))
    positions = {str(ds.SOPInstanceUID): str(ds.ViewPosition) for ds in exam}
    assert set(rows) == set(positions)
    assert {uid: "hold-cc" if pos == "CC" else "drop-rest" for uid, pos in positions.items()} == rows
    rebuilt.dispose()
