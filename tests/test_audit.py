"""The audit trail against a real audit record repository: Debian's rsyslogd receiving RFC 5425
syslog over TLS (octet-counted frames) and RFC 5426 datagrams, writing what it receives to a
file. One node serves every test of the module; the tests run in order (a session: events,
the repository down and back, the stop). Every message is checked against a RELAX NG schema
written from PS3.15 A.5.1 (tests/data/audit_message.rng), not against the code that builds it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from lxml import etree
from pynetdicom import AE
from support.dicom import send_datasets
from support.node import NodeProcess, cli, wait_for
from support.paths import need_tool
from support.peers import StoreSCP
from support.pki import make_pki

from mammonode.audit import messages
from mammonode.audit.alerts import INTERVAL_S, AlertLimiter
from mammonode.audit.syslog import UDP_MAX, Endpoint
from mammonode.audit.trail import AuditTrail, SyslogSender
from mammonode.config import ConfigError, load_config
from mammonode.demo.loopback import free_port, wait_port
from mammonode.demo.phantom import exam_datasets
from mammonode.pipeline.weights_admin import generate_test_weights

SCHEMA = Path(__file__).parent / "data" / "audit_message.rng"
TOKEN = "audit-token-7c2e"
PATIENTS = ("AUDITPAT-0001", "AUDITPAT-0002", "AUDITPAT-0003", "AUDITPAT-0004")
MG = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation


def rsyslogd() -> str:
    return "/usr/sbin/rsyslogd" if os.access("/usr/sbin/rsyslogd", os.X_OK) else need_tool("rsyslogd")


class Rsyslog:
    """rsyslogd in the foreground on loopback ports that stay the same across restarts: TLS
    (gtls, anonymous client) and UDP inputs, every message written as
    ``PRI MSGID APP-NAME INPUT MSG`` to one file."""

    def __init__(self, folder: Path, pki: dict[str, Path]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.tls_port, self.udp_port = free_port(), free_port()
        self.out = folder / "received.log"
        self.conf = folder / "rsyslog.conf"
        self.conf.write_text(
            f'global(workDirectory="{folder}" maxMessageSize="64k" DefaultNetstreamDriver="gtls"\n'
            f'  DefaultNetstreamDriverCAFile="{pki["ca.crt"]}" DefaultNetstreamDriverCertFile="{pki["server.crt"]}"\n'
            f'  DefaultNetstreamDriverKeyFile="{pki["server.key"]}")\n'
            'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")\n'
            f'input(type="imtcp" address="127.0.0.1" port="{self.tls_port}")\n'
            'module(load="imudp")\n'
            f'input(type="imudp" address="127.0.0.1" port="{self.udp_port}")\n'
            'template(name="audit" type="string" string="%pri% %msgid% %app-name% %inputname% %msg%\\n")\n'
            f'action(type="omfile" file="{self.out}" template="audit")\n'
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Rsyslog:
        self.proc = subprocess.Popen(
            [rsyslogd(), "-n", "-f", str(self.conf), "-i", str(self.folder / "rsyslogd.pid")],
            stdout=open(self.folder / "rsyslogd.log", "a"),
            stderr=subprocess.STDOUT,
        )
        wait_port(self.tls_port, timeout=20)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def received(self) -> list[dict]:
        """Each message: pri, msgid, app, input and the XML (BOM removed)."""
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_text(encoding="utf-8").splitlines():
            pri, msgid, app, source, msg = line.split(" ", 4)
            out.append({"pri": pri, "msgid": msgid, "app": app, "input": source, "xml": msg.lstrip("\ufeff ")})
        return out


def events(items: list[dict]) -> Counter:
    return Counter(etree.fromstring(i["xml"]).find("EventIdentification/EventID").get("csd-code") for i in items)


def wait_events(receiver: Rsyslog, expected: Counter, timeout: float = 30) -> list[dict]:
    """The received messages once they hold at least ``expected`` (event code -> count)."""
    got = wait_for(lambda: events(receiver.received()) >= expected and receiver.received(), timeout, 0.2)
    assert got, f"expected at least {dict(expected)}, received {dict(events(receiver.received()))}"
    return got


def of_event(items: list[dict], code: str) -> list[etree._Element]:
    roots = [etree.fromstring(i["xml"]) for i in items]
    return [r for r in roots if r.find("EventIdentification/EventID").get("csd-code") == code]


def objects(root: etree._Element) -> dict[str, etree._Element]:
    """Participant objects by ID."""
    return {o.get("ParticipantObjectID"): o for o in root.findall("ParticipantObjectIdentification")}


def audit_file(node: NodeProcess) -> list[dict]:
    path = node.storage / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def nothing_in_flight(node: NodeProcess, receiver: Rsyslog) -> bool:
    """No delivery pending or sending (each emits a message when done), the spool empty, and
    the repository holds every message of the audit file. RFC 5425 has no acknowledgement:
    a message written while the repository stops could be lost, so it is stopped only then."""
    deliveries = node.status()["deliveries"]
    if deliveries["pending"] or deliveries["sending"]:
        return False
    if list((node.storage / "audit" / "spool").glob("*.json")):
        return False
    return Counter(line["xml"] for line in audit_file(node)) == Counter(i["xml"] for i in receiver.received())


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    pki = make_pki(tmp / "pki")
    receiver = Rsyslog(tmp / "repository", pki).start()
    scp = StoreSCP(tmp / "scp", free_port()).start()
    node_args = dict(
        weights_dir=generate_test_weights(tmp / "weights", models=("density_histogram",)),
        pipeline={"models": ["density_histogram"]},
        destinations=[{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}],
        node={"allowed_calling_aets": ["MODALITY", "ARCHIVE"]},
        dicomweb={"token": TOKEN},
        rules=[{"name": "archive", "action": "store", "calling_ae": "ARCHIVE"}],
    )
    node = NodeProcess(
        tmp / "node",
        **node_args,
        audit={"transport": "tls", "host": "127.0.0.1", "port": receiver.tls_port, "ca_file": str(pki["ca.crt"])},
    ).start()
    yield {"node": node, "node_args": node_args, "receiver": receiver, "tmp": tmp, "pki": pki, "uids": {}}
    node.stop(timeout=30)
    receiver.stop()
    scp.stop()


def qido(node: NodeProcess, token: str, **params) -> int:
    url = f"http://127.0.0.1:{node.web_port}/dicomweb/studies"
    return requests.get(url, params=params, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code


def test_the_repository_receives_each_event_with_the_patient_named(session):
    node, receiver = session["node"], session["receiver"]
    exam = exam_datasets(shape=(600, 480), patient_id=PATIENTS[0])
    session["uids"]["first"] = study_uid = str(exam[0].StudyInstanceUID)
    assert send_datasets(node.port, exam, calling="MODALITY") == [0, 0, 0, 0]
    intruder = AE(ae_title="INTRUDER")
    intruder.add_requested_context("1.2.840.10008.1.1")
    assoc = intruder.associate("127.0.0.1", node.port, ae_title="MAMMONODE")
    assert assoc.is_rejected
    assert qido(node, TOKEN, PatientID=PATIENTS[0]) == 200
    assert [qido(node, "wrong-token") for _ in range(3)] == [401, 401, 401]
    session["refused_at"] = time.monotonic()
    # A scanner cannot flood the spool: one alert per address per INTERVAL_S (emitted before
    # the 401 is answered, so the audit file holds all there will be).
    assert sum('csd-code="110132"' in line["xml"] for line in audit_file(node)) == 1

    got = wait_events(receiver, Counter({"110100": 1, "110104": 1, "110113": 2, "110112": 1}))
    for item in got:  # facility 10; severity 5 (notice), 4 (warning) for a failure outcome
        failed = etree.fromstring(item["xml"]).find("EventIdentification").get("EventOutcomeIndicator") != "0"
        assert (item["pri"], item["msgid"], item["app"], item["input"]) == (
            "84" if failed else "85",
            "DICOM+RFC3881",
            "mammonode",
            "imtcp",
        )

    (start,) = of_event(got, "110100")
    assert start.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"  # Application Start

    (stored,) = of_event(got, "110104")
    ident = stored.find("EventIdentification")
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("C", "0")
    roles = {p.find("RoleIDCode").get("csd-code"): p for p in stored.findall("ActiveParticipant")}
    assert roles["110153"].get("UserID") == "MODALITY" and roles["110153"].get("UserIsRequestor") == "true"
    assert roles["110153"].get("NetworkAccessPointID") == "127.0.0.1"
    assert roles["110152"].get("UserID") == "MAMMONODE"
    found = objects(stored)
    study, patient = found[study_uid], found[PATIENTS[0]]
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    (sop_class,) = study.findall("ParticipantObjectDescription/SOPClass")
    assert (sop_class.get("UID"), sop_class.get("NumberOfInstances")) == (MG, "4")
    assert (patient.get("ParticipantObjectTypeCode"), patient.get("ParticipantObjectTypeCodeRole")) == ("1", "1")

    alerts = {a.find("EventIdentification/EventTypeCode").get("csd-code"): a for a in of_event(got, "110113")}
    assert set(alerts) == {"110126", "110132"}  # Node Authentication, Use of Restricted Function
    users = {p.get("UserID") for p in alerts["110126"].findall("ActiveParticipant")}
    assert "INTRUDER" in users
    assert "/dicomweb/studies" in objects(alerts["110132"])

    # The study runs (density model) and its results go to the PACS: 110104, action R.
    def results_sent() -> list[etree._Element]:
        transfers = of_event(receiver.received(), "110104")
        return [m for m in transfers if m.find("EventIdentification").get("EventActionCode") == "R"]

    sent = wait_for(results_sent, 120, 0.5)
    assert sent, f"no results-sent message; node log tail:\n{node.log()[-2000:]}"
    roles = {p.find("RoleIDCode").get("csd-code"): p for p in sent[0].findall("ActiveParticipant")}
    assert (roles["110153"].get("UserID"), roles["110153"].get("UserIsRequestor")) == ("MAMMONODE", "true")
    assert roles["110152"].get("UserID") == "STORESCP"
    assert {study_uid, PATIENTS[0]} <= set(objects(sent[0]))
    delivered = sum(int(c.get("NumberOfInstances")) for c in sent[0].iter("SOPClass"))
    assert delivered >= 1

    (query,) = of_event(got, "110112")
    (asked,) = query.findall("ParticipantObjectIdentification")
    assert asked.get("ParticipantObjectTypeCodeRole") == "24"
    assert base64.b64decode(asked.findtext("ParticipantObjectQuery")).decode() == f"PatientID={PATIENTS[0]}"


def test_wado_rs_reads_are_audited_with_the_client_as_destination(session):
    """A study read out over WADO-RS (instances, then metadata): one 110104 with action R
    each, this node the source, the client the requestor and destination, every instance
    sent counted by SOP class and the patient named (IHE RAD-107's audit)."""
    node, receiver = session["node"], session["receiver"]
    study_uid = session["uids"]["first"]
    base = f"http://127.0.0.1:{node.web_port}/dicomweb/studies/{study_uid}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    accept = 'multipart/related; type="application/dicom"'
    before = events(receiver.received())
    retrieved = requests.get(base, headers={**auth, "Accept": accept}, timeout=30)
    assert retrieved.status_code == 200
    parts = retrieved.content.count(b"Content-Type: application/dicom")  # the four images and the results
    assert parts > 4
    assert requests.get(f"{base}/metadata", headers=auth, timeout=30).status_code == 200

    def reads() -> list[etree._Element]:
        transfers = of_event(receiver.received(), "110104")
        return [
            m for m in transfers if any(p.get("UserID") == "dicomweb-client" for p in m.findall("ActiveParticipant"))
        ]

    wait_events(receiver, before + Counter({"110104": 2}))
    found = wait_for(lambda: len(reads()) >= 2 and reads(), 30, 0.2)
    assert found and len(found) == 2, f"{len(reads())} WADO-RS reads audited"
    for message in found:
        ident = message.find("EventIdentification")
        assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("R", "0")
        roles = {p.find("RoleIDCode").get("csd-code"): p for p in message.findall("ActiveParticipant")}
        assert (roles["110153"].get("UserID"), roles["110153"].get("UserIsRequestor")) == ("MAMMONODE", "false")
        client = roles["110152"]
        assert (client.get("UserIsRequestor"), client.get("NetworkAccessPointID")) == ("true", "127.0.0.1")
        study = objects(message)[study_uid]
        counts = {c.get("UID"): int(c.get("NumberOfInstances")) for c in study.iter("SOPClass")}
        assert counts[MG] == 4 and sum(counts.values()) == parts, counts
        assert PATIENTS[0] in objects(message)
    assert {m.findtext("EventIdentification/EventOutcomeDescription") for m in found} == {
        "WADO-RS retrieve",
        "WADO-RS metadata",
    }


def test_a_wado_rs_read_the_client_leaves_is_audited_as_cut_short(session):
    """A client that reads the first bytes of a study's multipart response and closes: the
    read is audited with outcome 4 (minor failure), "cut short", not as a full transfer."""
    import socket

    node, receiver = session["node"], session["receiver"]
    study_uid = session["uids"]["first"]

    def cut_short() -> list[etree._Element]:
        return [
            m
            for m in of_event(receiver.received(), "110104")
            if m.findtext("EventIdentification/EventOutcomeDescription") == "WADO-RS retrieve cut short"
        ]

    assert not cut_short()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server cannot run ahead far
    client.connect(("127.0.0.1", node.web_port))
    client.sendall(
        f"GET /dicomweb/studies/{study_uid} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        'Accept: multipart/related; type="application/dicom"\r\n\r\n'.encode()
    )
    assert client.recv(1024).startswith(b"HTTP/1.1 200")
    client.close()  # with unread bytes: a reset
    found = wait_for(cut_short, 30, 0.2)
    assert found and len(found) == 1, "the read that was cut short was not audited as such"
    ident = found[0].find("EventIdentification")
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("R", "4")
    assert study_uid in objects(found[0])


def test_messages_wait_on_disk_while_the_repository_is_down_and_none_is_lost(session):
    node, receiver = session["node"], session["receiver"]
    spool = node.storage / "audit" / "spool"
    assert wait_for(lambda: nothing_in_flight(node, receiver), 60, 0.5), "messages still in flight"
    receiver.stop()
    before = receiver.received()

    partial = exam_datasets(shape=(200, 160), patient_id=PATIENTS[1])[:2]  # two views: stays receiving
    assert send_datasets(node.port, partial, calling="MODALITY") == [0, 0]
    time.sleep(max(0.0, session["refused_at"] + INTERVAL_S + 0.5 - time.monotonic()))
    assert qido(node, "still-wrong") == 401  # audited again, with the two left out before
    web = requests.Session()
    web.headers["Authorization"] = f"Bearer {TOKEN}"
    stowed = exam_datasets(shape=(200, 160), patient_id=PATIENTS[3])[:1]
    DICOMwebClient(f"http://127.0.0.1:{node.web_port}/dicomweb", session=web).store_instances(stowed)
    # Admin commands write to the same spool; the node's sender sends them.
    cli("process", str(partial[0].StudyInstanceUID), config=node.config)
    held = exam_datasets(shape=(200, 160), patient_id=PATIENTS[2])
    session["uids"]["held"] = str(held[0].StudyInstanceUID)
    assert send_datasets(node.port, held, calling="ARCHIVE") == [0, 0, 0, 0]
    purged = json.loads(cli("purge", "--older-than", "0", "--json", config=node.config).stdout)
    assert session["uids"]["held"] in purged["study_instance_uids"]  # (and the first study, once delivered)

    assert wait_for(lambda: len(list(spool.glob("*.json"))) >= 6, 20), "messages not spooled"
    time.sleep(1.0)  # the sender retries meanwhile; nothing may reach the stopped repository
    assert receiver.received() == before

    receiver.start()
    expected = events(before) + Counter({"110104": 3, "110113": 1, "110103": 1, "110105": 1})
    got = wait_events(receiver, expected, timeout=60)
    assert wait_for(lambda: not list(spool.glob("*.json")), 20), "spool not emptied"
    assert max(Counter(item["xml"] for item in got).values()) == 1  # nothing twice

    (deleted,) = [m for m in of_event(got, "110105") if session["uids"]["held"] in objects(m)]
    assert deleted.find("EventIdentification").get("EventActionCode") == "D"
    assert PATIENTS[2] in objects(deleted)
    (accessed,) = of_event(got, "110103")
    assert PATIENTS[1] in objects(accessed)
    refused = [m.findtext("EventIdentification/EventOutcomeDescription") for m in of_event(got, "110113")]
    assert sum("(2 more from this address not audited" in text for text in refused) == 1, refused
    received_by_patient = {p for m in of_event(got, "110104") for p in objects(m) if p in PATIENTS}
    assert received_by_patient == set(PATIENTS)
    (by_stow,) = [m for m in of_event(got, "110104") if PATIENTS[3] in objects(m)]
    users = {p.get("UserID"): p.get("NetworkAccessPointID") for p in by_stow.findall("ActiveParticipant")}
    assert users["dicomweb-client"] == "127.0.0.1" and "MAMMONODE" in users


def test_the_audit_file_holds_every_message_and_the_application_log_no_patient(session):
    node, receiver = session["node"], session["receiver"]
    before = events(receiver.received())
    node.stop(timeout=30)
    got = wait_events(receiver, before + Counter({"110100": 1}))
    stops = [
        m for m in of_event(got, "110100") if m.find("EventIdentification/EventTypeCode").get("csd-code") == "110121"
    ]
    assert len(stops) == 1

    lines = [json.loads(line) for line in (node.storage / "audit" / "audit.jsonl").read_text().splitlines()]
    assert Counter(line["xml"] for line in lines) == Counter(item["xml"] for item in got)
    for line in lines:
        root = etree.fromstring(line["xml"])
        ident = root.find("EventIdentification")
        assert line["event"] == ident.find("EventID").get("csd-code")
        assert line["outcome"] == int(ident.get("EventOutcomeIndicator"))
        assert line["time"] == ident.get("EventDateTime")

    schema = etree.RelaxNG(etree.parse(str(SCHEMA)))
    invalid = [(i["xml"][:200], str(schema.error_log)) for i in got if not schema.validate(etree.fromstring(i["xml"]))]
    assert not invalid

    app_log = node.log()
    assert app_log and not [p for p in PATIENTS if p in app_log]


def test_the_schema_check_can_fail():
    """The schema refuses what PS3.15 does not allow (so a pass above means something)."""
    schema = etree.RelaxNG(etree.parse(str(SCHEMA)))
    good = messages.study_deleted(
        messages.AuditSource("NODE"), messages.Participant("admin", True), messages.StudyObjects("1.2.3", "P1")
    ).xml
    assert schema.validate(etree.fromstring(good))
    for bad in (
        good.replace('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="1"'),
        good.replace('UserIsRequestor="true"', 'UserIsRequestor="yes"'),
        good.replace('ParticipantObjectTypeCodeRole="1"', 'ParticipantObjectTypeCodeRole="27"'),
        good.replace(' originalText="DICOM Study Deleted"', ""),
    ):
        assert not schema.validate(etree.fromstring(bad)), bad


def test_udp_repository_gets_one_datagram_per_message(session, tmp_path, caplog):
    receiver = session["receiver"]
    if receiver.proc is None:
        receiver.start()
    trail = AuditTrail(tmp_path / "audit.jsonl", tmp_path / "spool", 100)
    sender = SyslogSender(trail, Endpoint("udp", "127.0.0.1", receiver.udp_port), "mammonode-udp")
    # Larger than a datagram: cut, it would be invalid XML, so it is not sent at all.
    oversize = messages.AuditRecord(
        "110105", "DICOM Study Deleted", 0, messages.now_iso(), "<a>" + "x" * UDP_MAX + "</a>"
    )
    record = messages.study_deleted(
        messages.AuditSource("UDPNODE"), messages.Participant("admin", True), messages.StudyObjects("1.2.9", "UDPPAT")
    )
    trail.emit(oversize)
    trail.emit(record)
    sender.start()
    try:
        with caplog.at_level(logging.WARNING, logger="mammonode.audit.syslog"):
            got = wait_for(lambda: [i for i in receiver.received() if i["app"] == "mammonode-udp"], 20, 0.2)
            assert wait_for(lambda: not list((tmp_path / "spool").glob("*.json")), 10), "spool not emptied"
    finally:
        sender.stop()
    assert [(i["input"], i["msgid"], i["xml"]) for i in got] == [("imudp", "DICOM+RFC3881", record.xml)]
    assert any("exceeds the largest UDP datagram" in r.getMessage() for r in caplog.records)
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 2  # both kept in the audit file


def test_the_node_sends_over_udp(session):
    """The node itself with ``transport = "udp"`` (the same storage, started again)."""
    receiver = session["receiver"]
    if receiver.proc is None:
        receiver.start()
    node = NodeProcess(
        session["tmp"] / "node",
        **session["node_args"],
        audit={"transport": "udp", "host": "127.0.0.1", "port": receiver.udp_port},
    ).start()

    def over_udp() -> list[str]:
        """The EventTypeCodes of the node's messages received by the UDP input."""
        received = [i for i in receiver.received() if i["app"] == "mammonode" and i["input"] == "imudp"]
        return [etree.fromstring(i["xml"]).find("EventIdentification/EventTypeCode").get("csd-code") for i in received]

    try:
        started = wait_for(over_udp, 30, 0.2)
    finally:
        node.kill()  # the last use of this node: its graceful stop is tested above, and costs seconds
    assert started == ["110120"], f"node log tail:\n{node.log()[-2000:]}"  # Application Start


def test_security_alerts_are_limited_per_kind_and_address():
    limiter = AlertLimiter(interval_s=10, max_addresses=2)
    assert limiter.admit("110132", "10.0.0.1", now=0) == 0
    assert limiter.admit("110132", "10.0.0.1", now=5) is None
    assert limiter.admit("110126", "10.0.0.1", now=5) == 0  # another kind: its own limit
    # Two (kind, address) pairs already within the interval: new addresses share one limit.
    assert limiter.admit("110132", "10.0.0.2", now=6) == 0
    assert limiter.admit("110132", "10.0.0.3", now=7) is None
    assert limiter.admit("110132", "10.0.0.1", now=9.9) is None
    assert limiter.admit("110132", "10.0.0.1", now=10) == 2  # the two left out meanwhile


def test_logrotate_with_the_shipped_config_loses_no_record(tmp_path):
    """systemd/mammonode-audit.logrotate run by Debian's logrotate three times (forced) while
    records keep being written: every record is in exactly one file, no line is cut, and the
    older rotated files are compressed."""
    import grp
    import gzip
    import pwd
    import threading

    logrotate = need_tool("logrotate")
    audit_file = tmp_path / "audit" / "audit.jsonl"
    trail = AuditTrail(audit_file, None, 10)
    owner = f"{pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}"
    shipped = (Path(__file__).parents[1] / "systemd" / "mammonode-audit.logrotate").read_text()
    assert "/var/lib/mammonode/audit/audit.jsonl {" in shipped and "mammonode mammonode" in shipped
    config = tmp_path / "logrotate.conf"
    config.write_text(shipped.replace("/var/lib/mammonode/audit/audit.jsonl", str(audit_file)).replace(
        "mammonode mammonode", owner  # the service user where it runs as that user; here, whoever runs the test
    ))  # fmt: skip
    config.chmod(0o644)
    record = messages.study_deleted(
        messages.AuditSource("NODE"), messages.Participant("admin", True), messages.StudyObjects("1.2.3", "P1")
    )
    written, stop = [], threading.Event()

    def keep_writing() -> None:
        while not stop.is_set():
            trail.emit(messages.AuditRecord(record.event, record.name, 0, str(len(written)), record.xml))
            written.append(1)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        for _ in range(3):
            time.sleep(1.1)  # dateformat has seconds: one rotation per second
            done = subprocess.run(
                [logrotate, "-f", "-s", str(tmp_path / "state"), str(config)], capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr
    finally:
        stop.set()
        writer.join()

    files = sorted(audit_file.parent.iterdir())
    assert len([f for f in files if f.suffix == ".gz"]) == 2 and len(files) == 4, [f.name for f in files]
    times = []
    for f in files:
        text = gzip.decompress(f.read_bytes()).decode() if f.suffix == ".gz" else f.read_text()
        assert text == "" or text.endswith("\n"), f.name
        times += [json.loads(line)["time"] for line in text.splitlines()]
    assert sorted(times, key=int) == [str(i) for i in range(len(written))] and len(written) > 100


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_an_audit_file_root_creates_belongs_to_the_audit_directorys_owner(tmp_path):
    """After a rotation an admin command run with sudo may write the first record: the file it
    creates goes to the service user owning the directory, who must go on appending."""
    folder = tmp_path / "audit"
    folder.mkdir()
    os.chown(folder, 65534, 65534)  # nobody: the service user here
    trail = AuditTrail(folder / "audit.jsonl", None, 10)
    trail.emit(
        messages.study_deleted(
            messages.AuditSource("NODE"), messages.Participant("admin", True), messages.StudyObjects("1.2.3", "P1")
        )
    )
    made = os.stat(folder / "audit.jsonl")
    assert (made.st_uid, made.st_gid, made.st_mode & 0o777) == (65534, 65534, 0o640)


def test_the_spool_limit_counts_what_is_spooled_at_start(tmp_path, caplog):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "00000000000000000001-1-00000001.json").write_text("{}")  # left by an earlier run
    trail = AuditTrail(tmp_path / "audit.jsonl", spool, 2)
    record = messages.study_deleted(
        messages.AuditSource("NODE"), messages.Participant("admin", True), messages.StudyObjects("1.2.3", "P1")
    )
    with caplog.at_level(logging.WARNING, logger="mammonode.audit.trail"):
        for _ in range(3):
            trail.emit(record)
    assert len(list(spool.glob("*.json"))) == 2
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 3
    assert [r for r in caplog.records if "audit spool full" in r.getMessage()]


@pytest.mark.parametrize(
    "audit, key",
    [
        ({"transport": "tcp", "host": "h"}, "audit.transport"),
        ({"transport": "tls"}, "audit.host"),
        ({"transport": "udp", "host": "h", "ca_file": "/x"}, "audit.ca_file"),
        ({"transport": "tls", "host": "h", "ca_file": "/nonexistent/ca.pem"}, "audit.ca_file"),
        ({"spool_max_messages": 0}, "audit.spool_max_messages"),
    ],
)
def test_invalid_audit_settings_name_the_key(tmp_path, audit, key):
    from support.node import write_config

    path = write_config(tmp_path / "config.toml", {"storage": {"directory": str(tmp_path)}, "audit": audit})
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value).startswith(key)


def test_the_cli_refuses_an_invalid_audit_setting_with_exit_2(tmp_path):
    from support.node import write_config

    path = write_config(
        tmp_path / "config.toml", {"storage": {"directory": str(tmp_path)}, "audit": {"transport": "tcp"}}
    )
    result = cli("status", config=path, check=False)
    assert result.returncode == 2 and "audit.transport" in result.stderr and "Traceback" not in result.stderr
