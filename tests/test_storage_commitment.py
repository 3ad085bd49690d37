"""Storage commitment for results (PS3.4 Annex J, Push Model), against real peers: Orthanc
as the commitment SCP (it answers on a new association to the node's listener), a pynetdicom
SCP that never answers, and one that reports a failure for one object on the same
association, or on a new one when the node released it first (then success, on a new
association, after the object was sent again).

One node serves the module: one study, delivered to the three destinations."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

import pytest
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import StorageCommitmentPushModel
from support.dicom import send_datasets
from support.node import NodeProcess, cli
from support.peers import Orthanc

from mammonode.config import ConfigError, load_config
from mammonode.demo.loopback import free_port
from mammonode.demo.phantom import exam_datasets

pytestmark = pytest.mark.network
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"  # PS3.4 J.3.5, the well-known instance
SILENT_TIMEOUT_S = 3.0


def _report(transaction_uid: str, committed: list[Dataset], failed: list[Dataset]) -> Dataset:
    """Event Information of an N-EVENT-REPORT (PS3.4 J.3.3.1): the references committed,
    and the failed ones with Failure Reason 0x0110 (processing failure)."""
    info = Dataset()
    info.TransactionUID = transaction_uid
    if committed:
        info.ReferencedSOPSequence = committed
    if failed:
        items = []
        for ref in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            item.FailureReason = 0x0110
            items.append(item)
        info.FailedSOPSequence = items
    return info


class CommitmentSCP:
    """A pynetdicom Storage and Storage Commitment SCP. ``silent``: accepts every N-ACTION
    and never reports. Otherwise its first report fails the first reference and is sent on
    the N-ACTION's own association, or on a new one when that was released already (as a
    real SCP would; ``same_association`` says which); later ones commit everything, on a
    new association to ``report_to`` as the requester in the SCP role."""

    def __init__(self, aet: str, silent: bool):
        self.aet = aet
        self.silent = silent
        self.port = free_port()
        self.report_to = 0
        self.stored: Counter[str] = Counter()
        self.actions: list[Dataset] = []
        self.failed_uid: str | None = None
        self.same_association: bool | None = None
        self.ae = AE(ae_title=aet)
        # A report the node no longer reads (it is releasing) is given up quickly.
        self.ae.dimse_timeout = 5
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(StorageCommitmentPushModel)
        self.server = None

    def start(self) -> CommitmentSCP:
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def _store(self, event) -> int:
        self.stored[str(event.request.AffectedSOPInstanceUID)] += 1
        return 0x0000

    def _action(self, event):
        info = event.action_information
        self.actions.append(info)
        if not self.silent:
            refs = list(info.ReferencedSOPSequence)
            if self.failed_uid is None:
                self.failed_uid = str(refs[0].ReferencedSOPInstanceUID)
                report = _report(str(info.TransactionUID), refs[1:], refs[:1])
                threading.Thread(target=self._report_same, args=(event.assoc, report), daemon=True).start()
            else:
                report = _report(str(info.TransactionUID), refs, [])
                threading.Thread(target=self._report_new, args=(report,), daemon=True).start()
        return 0x0000, None

    def _report_same(self, assoc, report: Dataset) -> None:
        """On the N-ACTION's association (send_n_event_report waits until the acceptor has
        sent the N-ACTION response and paused its reactor); on a new association when the
        node released it first or did not answer."""
        status = None
        try:
            if assoc.is_established:
                status, _ = assoc.send_n_event_report(report, 2, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE)
        except (RuntimeError, ValueError):  # released meanwhile
            status = None
        self.same_association = status is not None and status.get("Status") == 0x0000
        if not self.same_association:
            send_report(self.report_to, self.aet, report, 2)

    def _report_new(self, report: Dataset) -> None:
        time.sleep(0.2)
        send_report(self.report_to, self.aet, report, 1)


def send_report(port: int, calling: str, report: Dataset, event_type: int) -> int | None:
    """One N-EVENT-REPORT to the node's listener on a new association, proposing the SCP
    role (PS3.4 J.3.3: the commitment SCP as association requester); its status."""
    from pynetdicom import build_role

    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="MAMMONODE", ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)]
    )
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_event_report(report, event_type, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE)
        return int(status.Status) if status is not None and "Status" in status else None
    finally:
        assoc.release()


def _get(node: NodeProcess, path: str) -> requests.Response:
    """The node's own HTTP side (status JSON, study JSON, status page): no CLI start-up."""
    response = requests.get(f"http://127.0.0.1:{node.web_port}{path}", timeout=10)
    response.raise_for_status()
    return response


def _detail(node: NodeProcess, study_uid: str) -> dict:
    return _get(node, f"/status/studies/{study_uid}").json()


def _states(detail: dict, destination: str) -> dict[str, str]:
    return {
        r["sop_instance_uid"]: d["state"]
        for r in detail["results"]
        for d in r["deliveries"]
        if d["destination"] == destination
    }


@pytest.fixture(scope="module")
def delivered(tmp_path_factory, test_weights_dir):
    """The node with three commitment destinations, and the Study Instance UID of the study
    it received, once every destination's deliveries have settled."""
    tmp = tmp_path_factory.mktemp("commitment")
    orthanc_port = free_port()
    silent = CommitmentSCP("SILENT", silent=True).start()
    flaky = CommitmentSCP("FLAKY", silent=False).start()
    outputs = ["sr", "summary"]
    node = NodeProcess(
        tmp / "node",
        weights_dir=test_weights_dir,
        pipeline={"models": ["density_histogram"]},
        destinations=[
            {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port,
             "storage_commitment": True, "outputs": outputs},
            {"name": "silent", "ae_title": "SILENT", "host": "127.0.0.1", "port": silent.port,
             "storage_commitment": True, "commitment_timeout_s": SILENT_TIMEOUT_S, "outputs": outputs},
            {"name": "flaky", "ae_title": "FLAKY", "host": "127.0.0.1", "port": flaky.port,
             "storage_commitment": True, "outputs": outputs},
        ],
    )  # fmt: skip
    flaky.report_to = node.port
    pacs = Orthanc(tmp / "orthanc", {"mammonode": ("MAMMONODE", "127.0.0.1", node.port)}, dicom_port=orthanc_port)
    pacs.start()
    node.start()
    try:
        datasets = exam_datasets(shape=(600, 480), patient_id="COMMIT01")
        study_uid = str(datasets[0].StudyInstanceUID)
        assert send_datasets(node.port, datasets) == [0] * len(datasets)

        def settled():
            detail = _detail(node, study_uid)
            states = [d["state"] for r in detail["results"] for d in r["deliveries"]]
            done = {"committed", "commit-timeout"}
            return detail if detail["state"] == "done" and states and all(s in done for s in states) else None

        node.wait_for(settled, 60, interval=0.5, what="deliveries committed or timed out")
        yield {"node": node, "study": study_uid, "pacs": pacs, "silent": silent, "flaky": flaky}
    finally:
        stopping = threading.Thread(target=node.stop, kwargs={"timeout": 20})
        stopping.start()
        pacs.stop()
        silent.stop()
        flaky.stop()
        stopping.join()


def test_orthanc_commits_every_result_it_received(delivered):
    node, pacs = delivered["node"], delivered["pacs"]
    detail = _detail(node, delivered["study"])
    states = _states(detail, "orthanc")
    assert len(states) == 2 and set(states.values()) == {"committed"}
    # Orthanc holds each of them (its own index, asked over REST).
    held = {i["MainDicomTags"]["SOPInstanceUID"] for i in (pacs.get(f"/instances/{x}") for x in pacs.get("/instances"))}
    assert set(states) <= held
    deliveries = [d for r in detail["results"] for d in r["deliveries"] if d["destination"] == "orthanc"]
    assert all(d["transaction_uid"] and d["committed_at"] for d in deliveries)
    # Orthanc reported on a new association, as requester: the listener logged it.
    # ... and answered it within that association, which Orthanc then released.
    assert "storage commitment report from ORTHANC" in node.log()
    assert "association released: calling AE ORTHANC" in node.log()
    assert "association aborted: calling AE ORTHANC" not in node.log()


def test_failed_reference_is_sent_again_then_committed(delivered):
    node, flaky = delivered["node"], delivered["flaky"]
    states = _states(_detail(node, delivered["study"]), "flaky")
    assert len(states) == 2 and set(states.values()) == {"committed"}
    # The object reported failed was stored and asked for twice, the other once each; every
    # request had a Transaction UID of its own.
    assert flaky.failed_uid in states
    assert flaky.stored[flaky.failed_uid] == 2
    assert [n for uid, n in flaky.stored.items() if uid != flaky.failed_uid] == [1]
    asked = Counter(str(r.ReferencedSOPInstanceUID) for a in flaky.actions for r in a.ReferencedSOPSequence)
    assert asked == flaky.stored
    assert len({str(a.TransactionUID) for a in flaky.actions}) == len(flaky.actions)
    # The failure came on the N-ACTION's own association (on a new one when the node had
    # released it first), the success on a new one.
    log = node.log()
    # (A fallback may follow a report the node took while releasing: either then.)
    failure = (
        r"from flaky on the same association"
        if flaky.same_association
        else r"from (?:FLAKY|flaky on the same association)"
    )
    assert re.search(rf"storage commitment report {failure}, transaction \S+: \d committed, 1 to send again", log)
    assert "storage commitment report from FLAKY" in log


def test_silent_peer_times_out_and_a_late_report_after_restart_still_commits(delivered):
    node, silent = delivered["node"], delivered["silent"]
    states = _states(_detail(node, delivered["study"]), "silent")
    assert len(states) == 2 and set(states.values()) == {"commit-timeout"}
    status = _get(node, "/status").json()
    assert status["commitments"] == {"committing": 0, "committed": 4, "commit-timeout": 2}
    assert [c["destination"] for c in status["failing"]["commitments"]] == ["silent"]
    assert "storage commitment by <b>silent</b>: 2 commit-timeout" in _get(node, "/").text
    assert "silent=commit-timeout" in cli("study", delivered["study"], config=node.config).stdout
    # The silent peer was asked (once per batch sent) for each object once, and never sent
    # any object twice.
    asked = {str(a.TransactionUID): list(a.ReferencedSOPSequence) for a in silent.actions}
    referenced = [str(r.ReferencedSOPInstanceUID) for refs in asked.values() for r in refs]
    assert sorted(referenced) == sorted(states)
    assert set(silent.stored.values()) == {1}

    # The transactions survive a restart; a report from an AE title that is no destination
    # is refused, the peer's own late reports commit.
    node.stop(timeout=20)
    node.start()
    first_uid, first_refs = next(iter(asked.items()))
    assert send_report(node.port, "STRANGER", _report(first_uid, first_refs, []), 1) == 0x0110
    assert set(_states(_detail(node, delivered["study"]), "silent").values()) == {"commit-timeout"}
    for transaction_uid, refs in asked.items():
        assert send_report(node.port, "SILENT", _report(transaction_uid, refs, []), 1) == 0x0000
    assert set(_states(_detail(node, delivered["study"]), "silent").values()) == {"committed"}


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ('url = "https://pacs.example.org/dicom-web"\nstorage_commitment = true', "storage_commitment: DIMSE"),
        ('ae_title = "P"\nhost = "h"\nport = 104\ncommitment_timeout_s = 0', "commitment_timeout_s: must be"),
        ('ae_title = "P"\nhost = "h"\nport = 104\nstorage_commitment = "yes"', "expected true or false"),
    ],
)
def test_commitment_settings_are_checked(tmp_path, entry, error):
    path = tmp_path / "config.toml"
    path.write_text(f'[[destinations]]\nname = "pacs"\n{entry}\n')
    with pytest.raises(ConfigError, match=r"^destinations\[0\]\.\w+: .*") as caught:
        load_config(path, environ={})
    assert error in str(caught.value)
