"""DICOMweb: STOW-RS in, QIDO-RS/WADO-RS out, results by STOW-RS, auth, status, metrics, page."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from support.browser import screenshot
from support.dicom import density_dicoms
from support.paths import need_tool
from support.peers import Orthanc

from mammonode.demo.phantom import exam_datasets
from mammonode.pipeline.weights_admin import generate_test_weights as generate

pytestmark = pytest.mark.network
TOKEN = "test-token-4d1f"
FAST_MODELS = ["image_only", "density_histogram", "density_cnn"]


def client(node, token: str | None = TOKEN) -> DICOMwebClient:
    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(f"http://127.0.0.1:{node.web_port}/dicomweb", session=session)


def multipart(paths: list[Path | bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for item in paths:
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_study_is_processed_and_its_sr_retrieved_by_wado(node_factory, test_weights_dir):
    node = node_factory(
        weights_dir=test_weights_dir, pipeline={"models": FAST_MODELS}, dicomweb={"token": TOKEN}
    ).start()
    web = client(node)
    datasets = [pydicom.dcmread(p) for p in density_dicoms()]
    response = web.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == 4 and "FailedSOPSequence" not in response
    study_uid = str(datasets[0].StudyInstanceUID)
    node.wait_for(lambda: node.study(study_uid)["state"] == "done", 240, interval=1, what="STOW study processed")
    found = web.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    assert len(found) == 1 and "SR" in found[0]["00080061"]["Value"]
    by_class = [i["00080016"]["Value"][0] for i in web.search_for_instances(study_uid)]
    # The TID 1500 report (Comprehensive 3D SR) and the Mammography CAD SR, both kept here.
    assert sorted(c for c in by_class if c.startswith("1.2.840.10008.5.1.4.1.1.88")) == [
        "1.2.840.10008.5.1.4.1.1.88.34",
        "1.2.840.10008.5.1.4.1.1.88.50",
    ]
    srs = [
        i for i in web.search_for_instances(study_uid) if i["00080016"]["Value"][0] == "1.2.840.10008.5.1.4.1.1.88.34"
    ]
    assert len(srs) == 1
    sr = web.retrieve_instance(study_uid, srs[0]["0020000E"]["Value"][0], srs[0]["00080018"]["Value"][0])
    assert sr.Modality == "SR" and sr.StudyInstanceUID == study_uid
    texts = [
        i.TextValue
        for c in sr.ContentSequence
        if c.ValueType == "CONTAINER"
        for i in c.get("ContentSequence", [])
        if i.ValueType == "TEXT"
    ]
    assert any(t.startswith("TEST WEIGHTS") for t in texts)
    detail = node.study(study_uid)
    assert str(sr.SOPInstanceUID) in {r["sop_instance_uid"] for r in detail["results"]}
    meta = web.retrieve_instance_metadata(study_uid, srs[0]["0020000E"]["Value"][0], srs[0]["00080018"]["Value"][0])
    assert meta["00080060"]["Value"] == ["SR"]
    # QIDO matching on the standard keys.
    assert web.search_for_studies(search_filters={"PatientID": "TEST0001"})
    assert not web.search_for_studies(search_filters={"PatientID": "NOBODY"})
    assert web.search_for_studies(search_filters={"StudyDate": "20260101-20261231"})
    assert not web.search_for_studies(search_filters={"StudyDate": "19990101-19991231"})
    assert web.search_for_studies(search_filters={"AccessionNumber": "ACC0001", "ModalitiesInStudy": "MG"})
    assert not web.search_for_studies(search_filters={"ModalitiesInStudy": "CT"})


def test_curl_stow_partial_failure_auth_and_media_types(node_factory, tmp_path):
    curl = need_tool("curl")
    node = node_factory(worker={"enabled": False}, dicomweb={"token": TOKEN}).start()
    good = exam_datasets(shape=(300, 200))[0]
    good_path = tmp_path / "good.dcm"
    good.save_as(good_path, enforce_file_format=True)
    bad = exam_datasets(shape=(300, 200))[1]
    bad.SOPInstanceUID = "1.2.3.evil/../x"
    bad.file_meta.MediaStorageSOPInstanceUID = "1.2.3.evil/../x"
    bad_path = tmp_path / "bad.dcm"
    bad.save_as(bad_path, enforce_file_format=True)
    url = f"http://127.0.0.1:{node.web_port}/dicomweb/studies"

    def post(parts, token=TOKEN, content_type=None, accept="application/dicom+json"):
        body, kind = multipart(parts)
        body_file = tmp_path / f"{uuid.uuid4().hex}.bin"
        body_file.write_bytes(body)
        args = [
            curl,
            "-s",
            "-o",
            str(tmp_path / "out"),
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            url,
            "-H",
            f"Content-Type: {content_type or kind}",
            "-H",
            f"Accept: {accept}",
            "--data-binary",
            f"@{body_file}",
        ]
        if token:
            args += ["-H", f"Authorization: Bearer {token}"]
        code = int(subprocess.run(args, capture_output=True, text=True, timeout=60).stdout)
        return code, (tmp_path / "out").read_bytes()

    assert post([good_path], token=None)[0] == 401
    assert post([good_path], token="wrong")[0] == 401
    code, body = post([good_path, bad_path])
    assert code == 202
    response = pydicom.Dataset.from_json(json.loads(body))
    assert [str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence] == [str(good.SOPInstanceUID)]
    assert int(response.FailedSOPSequence[0].FailureReason) == 0xC001  # invalid UID, refused like C-STORE
    code, body = post([bad_path, b"definitely not DICOM"])
    assert code == 409
    assert len(pydicom.Dataset.from_json(json.loads(body)).FailedSOPSequence) == 2
    assert post([good_path], content_type="application/json")[0] in (400, 415)
    code, xml = post([good_path], accept="application/dicom+xml")
    assert code == 200 and b"<NativeDicomModel>" in xml and b'tag="00081199"' in xml
    for path in ("/status", "/metrics", "/", "/dicomweb/studies"):
        assert requests.get(f"http://127.0.0.1:{node.web_port}{path}", timeout=10).status_code == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    status = requests.get(f"http://127.0.0.1:{node.web_port}/status", headers=headers, timeout=10).json()
    assert set(status) >= {"studies", "jobs", "workers", "errors"}
    metrics = requests.get(f"http://127.0.0.1:{node.web_port}/metrics", headers=headers, timeout=10).text
    for name in (
        "mammonode_instances_received_total",
        "mammonode_queue_depth",
        "mammonode_studies",
        "mammonode_job_stage_seconds",
        "mammonode_associations_total",
        "mammonode_outbox",
    ):
        assert name in metrics, name
    received = [line for line in metrics.splitlines() if line.startswith("mammonode_instances_received_total{")]
    assert any(
        'sop_class="1.2.840.10008.5.1.4.1.1.1.2"' in line
        and 'outcome="failed"' in line
        and 'listener="dicomweb"' in line
        for line in received
    ), received
    assert any('outcome="new"' in line for line in received), received


def test_results_delivered_by_stow_rs_to_orthanc_dicomweb(node_factory, tmp_path):
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if not plugin.exists():
        need_tool("Orthanc-DicomWeb-plugin")
    weights = generate(tmp_path / "w", models=("density_histogram",))
    pacs = Orthanc(tmp_path / "orthanc", {}, plugins=[str(plugin)])
    config = json.loads(pacs.config.read_text())
    config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    pacs.config.write_text(json.dumps(config))
    pacs.start()
    try:
        node = node_factory(
            weights_dir=weights,
            pipeline={"models": ["density_histogram"]},
            destinations=[{"name": "orthanc-web", "url": f"http://127.0.0.1:{pacs.http_port}/dicom-web"}],
        ).start()
        datasets = exam_datasets(shape=(600, 480))
        web = client(node, token=None)
        web.store_instances(datasets)
        uid = str(datasets[0].StudyInstanceUID)
        detail = node.wait_for(
            lambda: (
                (d := node.study(uid))["results"]
                and all(x["state"] == "delivered" for r in d["results"] for x in r["deliveries"])
                and d
            ),
            180,
            interval=1,
            what="results delivered by STOW-RS",
        )
        ours = {r["sop_instance_uid"] for r in detail["results"] if r["deliveries"]}  # the CAD SR stays here
        stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get("/instances?expand")}
        assert ours and ours <= stored
    finally:
        pacs.stop()


def test_status_page_in_headless_chromium(node_factory, tmp_path, artifacts):
    node = node_factory(worker={"enabled": False}).start()
    datasets = exam_datasets(shape=(300, 200))[:2]
    client(node, token=None).store_instances(datasets)
    html = requests.get(f"http://127.0.0.1:{node.web_port}/", timeout=10).text
    assert str(datasets[0].StudyInstanceUID) in html and 'http-equiv="refresh"' in html
    assert "PHANTOM" not in html  # no patient name or ID on the page
    shot = artifacts / "status-page.png"
    screenshot(f"http://127.0.0.1:{node.web_port}/", shot, 1400, 900)
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10, "blank screenshot"


def test_dicomweb_over_https(node_factory, tmp_path):
    from support.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    node = node_factory(
        worker={"enabled": False},
        dicomweb={"tls_cert": str(pki["server.crt"]), "tls_key": str(pki["server.key"]), "token": TOKEN},
    ).start()
    url = f"https://127.0.0.1:{node.web_port}/status"
    ok = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, verify=str(pki["ca.crt"]), timeout=10)
    assert ok.status_code == 200 and "studies" in ok.json()
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, timeout=10)  # not trusted without our CA
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url.replace("https", "http"), timeout=10)
