"""``mammonode pull`` against Orthanc as the PACS: C-FIND + C-MOVE, C-GET, QIDO-RS + WADO-RS.

One Orthanc (with its DICOMweb plugin) and one node serve the whole module; each test pulls
studies of its own, so none needs another to have run. Orthanc holds eight small 4-view
studies: three in January 2024 (pulled by date range with C-MOVE), one in December 2023
(outside that range: must never arrive, not even from a dry run), one pulled by Study Instance
UID with C-GET and three in June 2022 pulled by date range over DICOMweb. Part of the C-GET
study and of one DICOMweb study is pushed to the node first. What is expected comes from what
the test uploaded and configured, never from the code under test.
"""

from __future__ import annotations

import io
import json
import re
import socket
import sqlite3
import urllib.request
import xml.etree.ElementTree as ET
from contextlib import closing
from pathlib import Path

import pydicom
import pytest
from support.dicom import send_datasets
from support.node import NodeProcess, cli, toml_value
from support.paths import need_tool
from support.peers import Orthanc
from typer.testing import CliRunner

from mammonode.cli import app
from mammonode.config import ConfigError, load_config
from mammonode.db import open_database
from mammonode.demo.loopback import wait_port
from mammonode.demo.phantom import exam_datasets
from mammonode.ingest import pull_dicomweb
from mammonode.ingest.pull import PullQuery
from mammonode.pipeline.weights_admin import generate_test_weights

pytestmark = pytest.mark.network

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
IN_RANGE = ("20240105", "20240110", "20240115")
OUTSIDE = "20231220"
BY_GET = "20220301"
BY_WEB = ("20220605", "20220615", "20220625")  # the first: one series, one instance pushed first
SOURCE_ROLE, DESTINATION_ROLE = "110153", "110152"  # PS3.16 CID 402
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"  # PS3.4 B.5: Digital Mammography - For Presentation


def _study(patient: str, study_date: str, one_series: bool = False) -> list[pydicom.Dataset]:
    datasets = exam_datasets(shape=(600, 480), patient_id=patient)  # smaller ones hold no tissue
    for ds in datasets:
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        if one_series:  # the four views in one series: part of it held makes an IMAGE-level retrieve
            ds.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    return datasets


def _web_url(pacs: Orthanc) -> str:
    return f"http://127.0.0.1:{pacs.http_port}/dicom-web"


def _sources(pacs: Orthanc, closed_port: int) -> str:
    tables = [
        {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
        {"name": "pacs-get", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "retrieve": "get"},
        {"name": "pacs-web", "url": _web_url(pacs)},
        {"name": "gone", "ae_title": "GONE", "host": "127.0.0.1", "port": closed_port},
    ]
    lines = []
    for table in tables:
        lines.append("[[sources]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not PLUGIN.exists():
        need_tool("Orthanc-DicomWeb-plugin")
    tmp = tmp_path_factory.mktemp("pull")
    weights = generate_test_weights(tmp / "w", models=("density_histogram",))
    node = NodeProcess(tmp / "node", weights_dir=weights, pipeline={"models": ["density_histogram"]})
    pacs = Orthanc(tmp / "orthanc", {"MAMMONODE": ("MAMMONODE", "127.0.0.1", node.port)}, plugins=[str(PLUGIN)])
    config = json.loads(pacs.config.read_text())
    config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    pacs.config.write_text(json.dumps(config))
    # The unreachable source: a port bound (so no other process gets it) but not listening,
    # so a connection is refused for as long as the module runs.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    with node.config.open("a") as fh:
        fh.write(_sources(pacs, closed.getsockname()[1]))
    studies: dict[str, list[pydicom.Dataset]] = {}
    for n, day in enumerate((*IN_RANGE, OUTSIDE, BY_GET, *BY_WEB)):
        studies[day] = _study(f"PULL{n}", day, one_series=day in (BY_GET, BY_WEB[0]))
    node.start(wait=False)  # starts while Orthanc starts and is loaded
    try:
        pacs.start()
        for datasets in studies.values():
            for ds in datasets:
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                pacs.post("/instances", buffer.getvalue())
        wait_port(node.port, timeout=60)
        wait_port(node.web_port, timeout=60)
        # Part of two studies is pushed to the node first: a pull must fetch only the rest.
        assert send_datasets(node.port, studies[BY_GET][:2] + studies[BY_WEB[0]][:1]) == [0, 0, 0]
        yield node, pacs, {day: str(ds[0].StudyInstanceUID) for day, ds in studies.items()}
    finally:
        node.stop(timeout=20)
        pacs.stop()
        closed.close()


def _pull(node: NodeProcess, *args: str) -> tuple[int, dict | str]:
    result = cli("pull", *args, config=node.config, check=False, timeout=120)
    if "--json" in args and result.returncode == 0:
        return 0, json.loads(result.stdout)
    return result.returncode, result.stdout + result.stderr


def _states(node: NodeProcess) -> dict[str, dict]:
    """Each study's state and instance count, read from the node's SQLite file with the
    standard library (a CLI process per poll would cost seconds)."""
    db = node.storage / "mammonode.sqlite"
    if not db.exists():
        return {}
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute(
            "SELECT s.study_instance_uid, s.state, COUNT(i.id) FROM studies s "
            "LEFT JOIN instances i ON i.study_id = s.id GROUP BY s.id"
        ).fetchall()
    return {uid: {"state": state, "instances": count} for uid, state, count in rows}


def _all_done(node: NodeProcess, uids: set[str]) -> dict[str, dict]:
    def done():
        states = _states(node)
        failed = [u for u in uids if states.get(u, {}).get("state") == "failed"]
        assert not failed, f"studies failed: {failed}; node log tail:\n{node.log()[-2000:]}"
        return states if all(states.get(u, {}).get("state") == "done" for u in uids) else None

    return node.wait_for(done, 90, interval=0.5, what=f"studies {sorted(uids)} done")


def _transfers(node: NodeProcess, study_uid: str, source: str) -> list[ET.Element]:
    """The 110104 messages in the node's audit file (README: Audit trail) about the study
    with ``source`` as the Source participant's UserID."""
    found = []
    for line in (node.storage / "audit" / "audit.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["event"] != "110104":
            continue
        message = ET.fromstring(entry["xml"])
        objects = {o.get("ParticipantObjectID") for o in message.iter("ParticipantObjectIdentification")}
        if study_uid in objects and _participant(message, SOURCE_ROLE).get("UserID") == source:
            found.append(message)
    return found


def _participant(message: ET.Element, role: str) -> ET.Element:
    for element in message.iter("ActiveParticipant"):
        code = element.find("RoleIDCode")
        if code is not None and code.get("csd-code") == role:
            return element
    return ET.Element("none")


def _pulled(node: NodeProcess, study_uid: str, source: str, instances: int, sop_class: str) -> None:
    """One 110104 for a study the pull stored itself: new instances (C), the source as Source,
    this node (MAMMONODE, which asked) as Destination, the SOP class and how many came."""
    messages = _transfers(node, study_uid, source)
    assert len(messages) == 1, f"{len(messages)} 110104 messages from {source} for {study_uid}"
    message = messages[0]
    assert message.find("EventIdentification").get("EventActionCode") == "C"
    assert message.find("EventIdentification").get("EventOutcomeIndicator") == "0"
    assert _participant(message, DESTINATION_ROLE).get("UserID") == "MAMMONODE"
    assert _participant(message, DESTINATION_ROLE).get("UserIsRequestor") == "true"
    classes = {c.get("UID"): c.get("NumberOfInstances") for c in message.iter("SOPClass")}
    assert classes == {sop_class: str(instances)}


def test_dry_run_lists_and_fetches_nothing(world):
    node, _, uids = world
    code, out = _pull(node, "--from", "pacs", "--study", uids[OUTSIDE], "--dry-run", "--json")
    assert code == 0, out
    assert (out["studies_found"], out["instances"], out["fetched"], out["already_held"]) == (1, 4, 0, 0)
    assert out["studies"] == [
        {"study_instance_uid": uids[OUTSIDE], "study_date": OUTSIDE, "instances": 4, "held": 0, "to_fetch": 4}
    ]
    assert uids[OUTSIDE] not in _states(node)


def test_c_move_by_date_range_then_nothing_again(world):
    node, _, uids = world
    wanted = {uids[day] for day in IN_RANGE}
    code, out = _pull(node, "--from", "pacs", "--date", "20240101-20240131", "--modality", "MG", "--json")
    assert code == 0, out
    assert {s["study_instance_uid"] for s in out["studies"]} == wanted
    assert (out["studies_found"], out["instances"], out["fetched"], out["already_held"], out["failed"]) == (
        3,
        12,
        12,
        0,
        0,
    )
    # C-MOVE ends once the node acknowledged every C-STORE: all held now, so the second pull
    # runs while the worker processes them.
    code, text = _pull(node, "--from", "pacs", "--date", "20240101-20240131")
    assert code == 0, text
    assert "summary: 3 studies found, 12 instances, fetched 0, already held 12, failed 0" in text
    states = _all_done(node, wanted)
    assert all(states[u]["instances"] == 4 for u in wanted)
    assert uids[OUTSIDE] not in states


def test_c_get_by_study_uid_fetches_only_what_is_missing(world):
    node, pacs, uids = world
    code, out = _pull(node, "--from", "pacs-get", "--study", uids[BY_GET], "--json")
    assert code == 0, out
    assert (out["studies_found"], out["fetched"], out["already_held"], out["failed"]) == (1, 2, 2, 0)
    # Stored by the CLI itself before it answered each C-STORE: held once the pull returns.
    assert _states(node)[uids[BY_GET]]["instances"] == 4
    _pulled(node, uids[BY_GET], pacs.aet, 2, MG_FOR_PRESENTATION)
    # Assembled and processed like a pushed study.
    _all_done(node, {uids[BY_GET]})


def test_dicomweb_three_studies_by_date_range_then_nothing_again(world):
    node, pacs, uids = world
    wanted = {uids[day] for day in BY_WEB}
    code, out = _pull(node, "--from", "pacs-web", "--date", "20220601-20220630", "--modality", "MG", "--json")
    assert code == 0, out
    assert {s["study_instance_uid"] for s in out["studies"]} == wanted
    assert (out["studies_found"], out["instances"], out["fetched"], out["already_held"], out["failed"]) == (
        3,
        12,
        11,
        1,
        0,
    )
    for day in BY_WEB:
        _pulled(node, uids[day], _web_url(pacs), 3 if day == BY_WEB[0] else 4, MG_FOR_PRESENTATION)
    code, out = _pull(node, "--from", "pacs-web", "--date", "20220601-20220630", "--json")
    assert code == 0, out
    assert (out["studies_found"], out["instances"], out["fetched"], out["already_held"], out["failed"]) == (
        3,
        12,
        0,
        12,
        0,
    )
    assert all(len(_transfers(node, uid, _web_url(pacs))) == 1 for uid in wanted)  # nothing fetched, nothing audited
    # What WADO-RS stored is assembled and processed like a pushed study.
    states = _all_done(node, wanted)
    assert all(states[u]["instances"] == 4 for u in wanted)


def test_a_database_error_stops_the_pull_with_one_line(world, tmp_path):
    """A node whose database refuses every instance (a trigger, as a broken database would):
    the WADO-RS pull stops at the first with one error line, no traceback, and the summary
    counts all four as failed."""
    node, _, uids = world
    config = tmp_path / "config.toml"
    config.write_text(node.config.read_text().replace(str(node.storage), str(tmp_path / "storage")))
    open_database(load_config(config)).dispose()
    with closing(sqlite3.connect(tmp_path / "storage" / "mammonode.sqlite")) as conn:
        conn.execute("CREATE TRIGGER broken BEFORE INSERT ON instances BEGIN SELECT RAISE(ABORT, 'broken'); END")
        conn.commit()
    result = cli("pull", "--from", "pacs-web", "--study", uids[OUTSIDE], config=config, check=False, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: source pacs-web: storing a pulled instance failed ("), (
        result.stderr
    )
    assert "summary: 1 studies found, 4 instances, fetched 0, already held 0, failed 4" in result.stdout


def test_qido_rs_pages_through_a_servers_results(world, monkeypatch):
    """With two results a page, the three June studies take two QIDO-RS pages and the
    one-series study's four instances two full pages and an empty one: every one is found
    (Orthanc honours limit and offset)."""
    node, pacs, uids = world
    # The server caps a page at the limit asked for, so only paging finds the third study.
    query = f"{_web_url(pacs)}/studies?StudyDate=20220601-20220630&limit=2"
    with urllib.request.urlopen(query, timeout=30) as response:
        assert len(json.loads(response.read())) == 2
    monkeypatch.setattr(pull_dicomweb, "PAGE", 2)
    cfg = load_config(node.config)
    source = next(s for s in cfg.sources if s.name == "pacs-web")
    client = pull_dicomweb.DicomwebSourceClient(source, cfg, db=None)  # queries only: no database
    found = client.find_studies(PullQuery(date_range="20220601-20220630"))
    assert sorted(s.study_uid for s in found) == sorted(uids[day] for day in BY_WEB)
    instances = client.list_instances(uids[BY_WEB[0]], "MG")
    assert len({i.sop_uid for i in instances}) == 4


def test_errors_are_one_line(world):
    node, _, uids = world
    runner = CliRunner()  # usage errors end before any network or logging: checked in-process
    config = ["--config", str(node.config)]
    result = runner.invoke(app, ["pull", "--from", "nowhere", "--date", "20240101-20240131", *config])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "no source named 'nowhere'" in result.stderr
    result = runner.invoke(app, ["pull", "--from", "pacs", "--date", "20240131-20240101", *config])
    assert result.exit_code == 2 and result.stderr.startswith("error: --date"), result.stderr
    result = runner.invoke(app, ["pull", "--from", "pacs", *config])
    assert result.exit_code == 2 and "either --study" in result.stderr
    result = cli("pull", "--from", "gone", "--study", uids[OUTSIDE], config=node.config, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: source gone: cannot connect to 127.0.0.1:"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("tables", "key"),
    [
        ('name = "a"\nae_title = "A"\nhost = "h"\nport = 70000', "sources[0].port"),
        ('name = "a"\nae_title = "A"\nhost = "h"', "sources[0].port: missing"),
        ('name = "a"\nae_title = "A"\nhost = "h"\nport = 104\nretrieve = "fetch"', "sources[0].retrieve"),
        ('name = "a"\nurl = "ftp://pacs/dicom-web"', "sources[0].url"),
        ('name = "a"\nurl = "http://pacs/dicom-web"\nport = 104', "sources[0].port: not for a DICOMweb source"),
        ('name = "a"\nurl = "http://pacs/dicom-web"\n[[sources]]\nname = "a"\nurl = "http://b/"', "sources[1].name"),
    ],
)
def test_invalid_sources_name_the_key(tmp_path, tables, key):
    path = tmp_path / "config.toml"
    path.write_text(f"[[sources]]\n{tables}\n")
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(path)
