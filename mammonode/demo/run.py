"""``mammonode demo``: a node in a temporary directory, a study sent to it, the results shown.

Sends the shared density exam (../shared/samples/dicom/density-exam next to the checkout)
when present, else a synthetic phantom exam, over DIMSE; a small in-process storage SCP
plays the PACS that receives the results back. With no installed weights it generates
seeded test weights and says so on every line. By default it runs the fast models
(image-only classifier and both density models); ``--full`` adds the patch-classifier
heatmaps and the image+heatmaps model (several minutes on a 2-core CPU).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts, build_context

from mammonode.config import Config, Destination
from mammonode.demo.loopback import free_port
from mammonode.pipeline.registry import MODELS, SELECTABLE
from mammonode.pipeline.weights import model_file

REPO = Path(__file__).resolve().parents[2]
SHARED_EXAM = REPO.parent / "shared" / "samples" / "dicom" / "density-exam"
FAST_MODELS = ["image_only", "density_histogram", "density_cnn"]


class MiniPacs:
    """Storage SCP that keeps what it receives in memory (SOP class, UID)."""

    def __init__(self, ae_title: str = "DEMOPACS"):
        self.received: list[tuple[str, str]] = []
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.port = free_port()
        self.server = None

    def _store(self, event):
        ds = event.dataset
        self.received.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        return 0x0000

    def start(self):
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def stop(self):
        if self.server:
            self.server.shutdown()


def send_files(paths: list[Path], port: int, called: str = "MAMMONODE") -> list[int]:
    import pydicom

    ae = AE(ae_title="DEMOSCU")
    datasets = [pydicom.dcmread(p) for p in paths]
    for sop, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.requested_contexts.append(build_context(sop, [syntax]))
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError("the demo node refused the association")
    statuses = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status) if status is not None and "Status" in status else -1)
    assoc.release()
    return statuses


def _weights(work: Path) -> tuple[Path, bool]:
    from mammonode.pipeline.weights import default_weights_dir, is_test_dir
    from mammonode.pipeline.weights_admin import generate_test_weights as generate

    installed = default_weights_dir()
    if installed.is_dir() and all(model_file(installed, m).exists() for m in MODELS):
        return installed, is_test_dir(installed)
    return generate(work / "weights"), True


def run_demo(clean: bool = False, full: bool = False, workdir: Path | None = None) -> int:
    from mammonode import logs
    from mammonode.db.queries import find_study, study_detail
    from mammonode.service.node import Node

    work = workdir or Path(tempfile.mkdtemp(prefix="mammonode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    weights_dir, test_weights = _weights(work)
    prefix = "[TEST WEIGHTS - NOT FOR CLINICAL USE] " if test_weights else ""

    def say(message: str) -> None:
        print(f"{prefix}{message}", flush=True)

    if test_weights:
        say(f"weights: seeded test weights in {weights_dir}")
    say(f"demo directory: {work}")
    pacs = MiniPacs()
    pacs.start()
    cfg = Config()
    cfg.storage.directory = str(work / "storage")
    cfg.node.host, cfg.node.port = "127.0.0.1", free_port()
    cfg.study.quiet_period_s, cfg.study.incomplete_timeout_s = 2.0, 600.0
    cfg.pipeline.weights_dir = str(weights_dir)
    cfg.pipeline.models = list(SELECTABLE if full else FAST_MODELS)
    cfg.worker.poll_interval_s = cfg.delivery.poll_interval_s = 0.5
    cfg.destinations = [Destination(name="demo-pacs", ae_title="DEMOPACS", host="127.0.0.1", port=pacs.port)]
    logs.setup("WARNING")
    node = Node(cfg)
    node.start()
    try:
        if SHARED_EXAM.is_dir():
            files = sorted(SHARED_EXAM.glob("*.dcm"))
            say(f"sending the shared density exam ({len(files)} files) to MAMMONODE@127.0.0.1:{cfg.node.port}")
        else:
            from mammonode.demo.phantom import write_exam

            files = write_exam(work / "phantom")
            say(f"shared samples not found: sending a synthetic phantom exam to MAMMONODE@127.0.0.1:{cfg.node.port}")
        start = time.monotonic()
        statuses = send_files(files, cfg.node.port)
        say("C-STORE statuses: " + ", ".join(f"0x{s:04X}" for s in statuses))
        import pydicom

        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        deadline = time.monotonic() + (1200 if full else 170)
        detail = None
        while time.monotonic() < deadline:
            with node.db.session() as session:
                study = find_study(session, study_uid)
                detail = study_detail(session, study, cfg.study.quiet_period_s) if study else None
            done = detail and detail["state"] in ("done", "failed")
            delivered = (
                detail
                and detail["results"]
                and all(d["state"] in ("delivered", "failed") for r in detail["results"] for d in r["deliveries"])
            )
            if done and (detail["state"] == "failed" or delivered):
                break
            time.sleep(1)
        elapsed = time.monotonic() - start
        if not detail or detail["state"] != "done":
            errors = [j["last_error"] for j in (detail or {}).get("jobs", []) if j["last_error"]]
            say(f"study {study_uid} did not finish in time (state {detail and detail['state']}): {errors}")
            return 1
        say(f"study {study_uid}: done in {elapsed:.0f} s")
        result = detail.get("result") or {}
        for model, preds in (result.get("cancer") or {}).items():
            say(
                f"  {model}: P(malignant) right {preds['right_malignant']:.3f} left {preds['left_malignant']:.3f}; "
                f"P(benign) right {preds['right_benign']:.3f} left {preds['left_benign']:.3f}"
            )
        for model, dens in (result.get("density") or {}).items():
            probs = " ".join(f"{c}={p:.3f}" for c, p in zip("abcd", dens["probabilities"]))
            say(f"  density ({model}): BI-RADS {dens['category']}  [{probs}]")
        for r in detail["results"]:
            states = ",".join(d["state"] for d in r["deliveries"])
            say(f"  {r['kind']:<22} {cfg.storage_dir / r['path']}  (to demo PACS: {states})")
        say(f"the demo PACS received {len(pacs.received)} result objects back")
        return 0
    finally:
        node.stop_event.set()
        node.stop()
        pacs.stop()
        if clean and workdir is None:
            shutil.rmtree(work, ignore_errors=True)
