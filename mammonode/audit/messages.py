"""DICOM audit messages (PS3.15 A.5, the RFC 3881 / IHE ATNA schema) as XML text.

Pure functions: each builds one ``AuditMessage`` for one event and returns it with its
event code and outcome (:class:`AuditRecord`). Element order follows the schema
(EventIdentification, ActiveParticipant+, AuditSourceIdentification,
ParticipantObjectIdentification*), because RELAX NG validators check it. Audit messages name
the patient by ID, which is their purpose; they never go to the application log.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field

# A coded value: (code, coding scheme, meaning).
Code = tuple[str, str, str]

# Event IDs (PS3.16 CID 400, DCM).
APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED: Code = ("110105", "DCM", "DICOM Study Deleted")
QUERY: Code = ("110112", "DCM", "Query")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
# Event type codes (CID 401, 403).
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
USE_OF_RESTRICTED_FUNCTION: Code = ("110132", "DCM", "Use of Restricted Function")
# Active participant roles (CID 402).
APPLICATION: Code = ("110150", "DCM", "Application")
APPLICATION_LAUNCHER: Code = ("110151", "DCM", "Application Launcher")
DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
SOURCE: Code = ("110153", "DCM", "Source Role ID")
# Participant object ID types (RFC 3881 and CID 404).
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
URI: Code = ("12", "RFC-3881", "URI")
STUDY_UID: Code = ("110180", "DCM", "Study Instance UID")
NODE_ID: Code = ("110182", "DCM", "Node ID")
QIDO_RS: Code = ("RAD-129", "IHE Transactions", "QIDO-RS")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8


@dataclass(frozen=True)
class AuditSource:
    """Who reports (AuditSourceIdentification): this node, an application server (type 4)."""

    source_id: str
    enterprise_site_id: str = ""


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a user, process or node taking part in the event."""

    user_id: str
    requestor: bool
    role: Code | None = None
    address: str = ""  # NetworkAccessPointID: an IP address or host name
    alternative_id: str = ""  # e.g. the process ID


@dataclass
class StudyObjects:
    """A study and its patient as participant objects, with SOP class counts."""

    study_uid: str
    patient_id: str = ""
    sop_classes: dict[str, int] = field(default_factory=dict)

    def add(self, sop_class_uid: str, count: int = 1) -> None:
        self.sop_classes[sop_class_uid] = self.sop_classes.get(sop_class_uid, 0) + count


@dataclass(frozen=True)
class AuditRecord:
    """One message: its XML and what the audit file indexes it by."""

    event: str  # the EventID code, e.g. "110104"
    name: str  # its meaning
    outcome: int
    time: str  # EventDateTime
    xml: str


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def _address_type(address: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
    import ipaddress

    try:
        ipaddress.ip_address(address)
        return "2"
    except ValueError:
        return "1"


def _participant(root: ET.Element, p: Participant) -> None:
    attrs = {"UserID": p.user_id or "-", "UserIsRequestor": "true" if p.requestor else "false"}
    if p.alternative_id:
        attrs["AlternativeUserID"] = p.alternative_id
    if p.address:
        attrs["NetworkAccessPointID"] = p.address
        attrs["NetworkAccessPointTypeCode"] = _address_type(p.address)
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    if p.role is not None:
        _code(element, "RoleIDCode", p.role)


def _detail(parent: ET.Element, kind: str, value: str) -> None:
    ET.SubElement(parent, "ParticipantObjectDetail", {"type": kind, "value": base64.b64encode(value.encode()).decode()})


def _study_objects(root: ET.Element, study: StudyObjects) -> None:
    obj = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": study.study_uid,
            "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3",
        },
    )
    _code(obj, "ParticipantObjectIDTypeCode", STUDY_UID)
    if study.sop_classes:
        description = ET.SubElement(obj, "ParticipantObjectDescription")
        for uid, count in sorted(study.sop_classes.items()):
            ET.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
    if study.patient_id:
        patient = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": study.patient_id,
                "ParticipantObjectTypeCode": "1",
                "ParticipantObjectTypeCodeRole": "1",
            },
        )
        _code(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)


def _message(
    event: Code,
    action: str,
    outcome: int,
    participants: Iterable[Participant],
    source: AuditSource,
    *,
    event_type: Code | None = None,
    description: str = "",
) -> tuple[ET.Element, AuditRecord]:
    """The message up to its source identification; the caller appends participant objects
    (which come last in the schema) and then calls :func:`_finish`."""
    when = now_iso()
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {"EventActionCode": action, "EventDateTime": when, "EventOutcomeIndicator": str(outcome)},
    )
    _code(ident, "EventID", event)
    if event_type is not None:
        _code(ident, "EventTypeCode", event_type)
    if description:
        ET.SubElement(ident, "EventOutcomeDescription").text = description
    for p in participants:
        _participant(root, p)
    attrs = {"AuditSourceID": source.source_id}
    if source.enterprise_site_id:
        attrs["AuditEnterpriseSiteID"] = source.enterprise_site_id
    ET.SubElement(ET.SubElement(root, "AuditSourceIdentification", attrs), "AuditSourceTypeCode", {"csd-code": "4"})
    return root, AuditRecord(event[0], event[2], outcome, when, "")


# Characters XML 1.0 cannot carry at all; a peer may send them (AE titles, header strings).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_safe(text: str) -> str:
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _finish(root: ET.Element, record: AuditRecord) -> AuditRecord:
    """Serialize, writing what XML cannot hold as visible escapes (a repository's parser
    would refuse the whole message)."""
    for element in root.iter():
        element.attrib.update({k: _xml_safe(v) for k, v in element.attrib.items()})
        if element.text:
            element.text = _xml_safe(element.text)
    xml = ET.tostring(root, encoding="unicode")
    return AuditRecord(record.event, record.name, record.outcome, record.time, xml)


def application_activity(source: AuditSource, app: Participant, started: bool, user: Participant) -> AuditRecord:
    """110100 at start or stop: the application (role Application) and who launched it."""
    root, record = _message(
        APPLICATION_ACTIVITY,
        "E",
        SUCCESS,
        [app, user],
        source,
        event_type=APPLICATION_START if started else APPLICATION_STOP,
    )
    return _finish(root, record)


def instances_transferred(
    source: AuditSource,
    sender: Participant,
    receiver: Participant,
    study: StudyObjects,
    *,
    action: str,
    outcome: int = SUCCESS,
    description: str = "",
) -> AuditRecord:
    """110104 for one study over one association or delivery: ``action`` C (received, new),
    U (received, already held) or R (sent by us)."""
    root, record = _message(INSTANCES_TRANSFERRED, action, outcome, [sender, receiver], source, description=description)
    _study_objects(root, study)
    return _finish(root, record)


def study_deleted(source: AuditSource, requestor: Participant, study: StudyObjects) -> AuditRecord:
    """110105: a study's files and rows were purged."""
    root, record = _message(STUDY_DELETED, "D", SUCCESS, [requestor], source)
    _study_objects(root, study)
    return _finish(root, record)


def instances_accessed(
    source: AuditSource, requestor: Participant, study: StudyObjects, description: str
) -> AuditRecord:
    """110103 with action R for an admin action that has a study's instances read again
    (``retry``, ``process``): the study is run and its results sent anew. DICOM has no
    event of its own for re-queueing, and Instances Accessed is the event for instances
    being utilized; ``description`` says which action (in EventOutcomeDescription)."""
    root, record = _message(INSTANCES_ACCESSED, "R", SUCCESS, [requestor], source, description=description)
    _study_objects(root, study)
    return _finish(root, record)


def query(source: AuditSource, requestor: Participant, responder: Participant, uri: str, query: str) -> AuditRecord:
    """110112 for a QIDO-RS search served: the query (role 24) with its URI and the query
    string, base64 in ParticipantObjectQuery (IHE RAD-129's audit)."""
    root, record = _message(QUERY, "E", SUCCESS, [requestor, responder], source)
    obj = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {"ParticipantObjectID": uri, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "24"},
    )
    _code(obj, "ParticipantObjectIDTypeCode", QIDO_RS)
    ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(query.encode()).decode()
    return _finish(root, record)


def security_alert(
    source: AuditSource,
    reporter: Participant,
    offender: Participant,
    subject: str,
    reason: str,
    *,
    event_type: Code,
) -> AuditRecord:
    """110113 (minor failure): a refused association (Node Authentication) or an HTTP request
    with a missing, wrong or insufficient token (Use of Restricted Function). The alert
    subject (role 13, Security Resource) is the node or URI that was asked for."""
    root, record = _message(
        SECURITY_ALERT, "E", MINOR_FAILURE, [reporter, offender], source, event_type=event_type, description=reason
    )
    obj = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {"ParticipantObjectID": subject, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "13"},
    )
    _code(obj, "ParticipantObjectIDTypeCode", URI if "/" in subject else NODE_ID)
    _detail(obj, "Alert Description", reason)
    return _finish(root, record)
