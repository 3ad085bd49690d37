"""``mammonode demo``: a node in a temporary directory, a study sent to it, the results shown.

Sends the shared density exam (../shared/samples/dicom/density-exam next to the checkout)
when present, else a synthetic phantom exam, over DIMSE; a small in-process storage SCP
plays the PACS that receives the results back. Weights: the installed ones, else the shared
seeded test weights, else weights it generates (and then it says, once and prominently, that
they are test weights). By default it runs the fast models (image-only classifier and both
density models); ``--full`` adds the patch-classifier heatmaps and the image+heatmaps model
(several minutes on a 2-core CPU). The summary image is also written as a PNG; the demo
directory is removed at the end unless ``--keep`` (or ``--workdir``) is given.
"""

from __future__ import annotations

import json
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
SHARED = REPO.parent / "shared"
SHARED_EXAM = SHARED / "samples" / "dicom" / "density-exam"
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


def _weights(work: Path) -> tuple[Path, bool, str]:
    """(weights directory, test weights?, where they came from)."""
    from mammonode.pipeline.weights import TEST_MARKER, default_weights_dir, is_test_dir
    from mammonode.pipeline.weights_admin import generate_test_weights

    installed = default_weights_dir()
    if installed.is_dir() and all(model_file(installed, m).exists() for m in MODELS):
        return installed, is_test_dir(installed), f"installed weights in {installed}"
    shared = SHARED / "weights" / "test"
    if shared.is_dir():
        target = work / "weights"
        shutil.copytree(shared, target, dirs_exist_ok=True)
        official = SHARED / "weights" / "official" / "density_histogram_model.p"
        if official.exists():
            shutil.copy(official, target)
        (target / TEST_MARKER).touch()
        return target, True, f"the shared seeded test weights ({shared})"
    return generate_test_weights(work / "weights"), True, "seeded test weights generated for this demo"


def _wait_for_results(node, study_uid: str, quiet_period_s: float, timeout_s: float) -> dict | None:
    from mammonode.db.queries import find_study, study_detail

    deadline = time.monotonic() + timeout_s
    detail = None
    while time.monotonic() < deadline:
        with node.db.session() as session:
            study = find_study(session, study_uid)
            detail = study_detail(session, study, quiet_period_s) if study else None
        deliveries = [d["state"] for r in (detail or {}).get("results", []) for d in r["deliveries"]]
        if detail and detail["state"] == "failed":
            return detail
        if (
            detail
            and detail["state"] == "done"
            and deliveries
            and all(s in ("delivered", "failed") for s in deliveries)
        ):
            return detail
        time.sleep(1)
    return detail


def _summary_png(storage_dir: Path, detail: dict) -> Path | None:
    """The summary Secondary Capture's pixels as a PNG beside it."""
    import pydicom
    from PIL import Image

    for r in detail["results"]:
        if r["kind"] == "summary":
            path = storage_dir / r["path"]
            png = path.with_suffix(".png")
            Image.fromarray(pydicom.dcmread(path).pixel_array).save(png)
            return png
    return None


def _print_results(detail: dict, storage_dir: Path, received: int) -> None:
    result = detail.get("result") or {}
    for model, preds in (result.get("cancer") or {}).items():
        print(
            f"  {model}: P(malignant) right {preds['right_malignant']:.3f} left {preds['left_malignant']:.3f}; "
            f"P(benign) right {preds['right_benign']:.3f} left {preds['left_benign']:.3f}"
        )
    for model, dens in (result.get("density") or {}).items():
        probs = " ".join(f"{c}={p:.3f}" for c, p in zip("abcd", dens["probabilities"]))
        print(f"  density ({model}): BI-RADS {dens['category']}  [{probs}]")
    print("result objects:")
    for r in detail["results"]:
        states = ",".join(d["state"] for d in r["deliveries"])
        # An object with no delivery row is kept, not sent (the CAD SR of test weights).
        where = f"to the demo PACS: {states}" if states else "kept here, not sent"
        print(f"  {r['kind']:<22} {storage_dir / r['path']}  ({where})")
    print(f"the demo PACS received {received} result objects back")


NEXT_STEPS = """next steps:
  - run the node:        mammonode serve --config config.toml   (config.toml documents every setting)
  - point a modality or PACS at it: AE title MAMMONODE, this machine's address, port 11112 (node.port)
  - install the official NYU weights: mammonode weights install --from DIR   (see weights/manifest.toml)
  - watch the queue:     mammonode status; mammonode studies; the status page at http://HOST:8080/
                         once [dicomweb] is enabled, with a token"""


def run_demo(full: bool = False, workdir: Path | None = None, keep: bool = False) -> int:
    from mammonode import logs
    from mammonode.service.node import Node

    work = workdir or Path(tempfile.mkdtemp(prefix="mammonode-demo-"))
    keep = keep or workdir is not None
    work.mkdir(parents=True, exist_ok=True)
    weights_dir, test_weights, origin = _weights(work)
    if test_weights:
        print("=" * 78)
        print("  TEST WEIGHTS - NOT FOR CLINICAL USE: every number and image below is a test")
        print(f"  output of {origin}.")
        print("=" * 78)
    else:
        print(f"weights: {origin}")
    print(f"demo directory: {work}{'' if keep else ' (removed at the end; --keep keeps it)'}")
    pacs = MiniPacs()
    pacs.start()
    cfg = Config()
    cfg.storage.directory = str(work / "storage")
    cfg.node.host, cfg.node.port = "127.0.0.1", free_port()
    cfg.dicomweb.enabled = False
    cfg.study.quiet_period_s, cfg.study.incomplete_timeout_s = 2.0, 600.0
    cfg.pipeline.weights_dir = str(weights_dir)
    cfg.pipeline.models = list(SELECTABLE if full else FAST_MODELS)
    cfg.worker.poll_interval_s = cfg.delivery.poll_interval_s = 0.5
    cfg.destinations = [Destination(name="demo-pacs", ae_title="DEMOPACS", host="127.0.0.1", port=pacs.port)]
    logs.setup("WARNING")
    node = Node(cfg)
    node.start()
    interrupted = False
    try:
        if SHARED_EXAM.is_dir():
            files = sorted(SHARED_EXAM.glob("*.dcm"))
            print(f"sending the shared density exam ({len(files)} files) to MAMMONODE@127.0.0.1:{cfg.node.port}")
        else:
            from mammonode.demo.phantom import write_exam

            files = write_exam(work / "phantom")
            print(f"shared samples not found: sending a synthetic phantom exam to MAMMONODE@127.0.0.1:{cfg.node.port}")
        start = time.monotonic()
        statuses = send_files(files, cfg.node.port)
        print("C-STORE statuses: " + ", ".join(f"0x{s:04X}" for s in statuses))
        import pydicom

        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        print(f"waiting for the results ({'several minutes' if full else 'about a minute'} on a small CPU)...")
        detail = _wait_for_results(node, study_uid, cfg.study.quiet_period_s, 1200 if full else 240)
        if not detail or detail["state"] != "done":
            errors = [j["last_error"] for j in (detail or {}).get("jobs", []) if j["last_error"]]
            print(f"study {study_uid} did not finish in time (state {detail and detail['state']}): {errors}")
            return 1
        print(f"study {study_uid}: done in {time.monotonic() - start:.0f} s")
        _print_results(detail, cfg.storage_dir, len(pacs.received))
        png = _summary_png(cfg.storage_dir, detail)
        if png is not None:
            if not keep:
                png = Path(shutil.copy(png, Path.cwd() / "mammonode-demo-summary.png"))
            print(f"summary image: {png}")
        if keep:
            # What the admin commands need to read the kept node (storage holds its database).
            kept = work / "config.toml"
            kept.write_text(
                f"[storage]\ndirectory = {json.dumps(str(cfg.storage_dir))}\n"
                f"[pipeline]\nweights_dir = {json.dumps(str(weights_dir))}\n"
            )
            print(f"inspect the kept node: mammonode studies --config {kept}")
            print(f"                       mammonode study {study_uid[:16]} --config {kept}")
        if test_weights:
            print("TEST WEIGHTS - NOT FOR CLINICAL USE (see above).")
        print(NEXT_STEPS)
        return 0
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; stopping the demo node")
        return 130
    finally:
        node.stop_event.set()
        node.stop()
        pacs.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        if interrupted:
            # A worker may be inside PyTorch; leaving without waiting for it avoids an abort
            # at interpreter shutdown (the same exit as `mammonode serve`).
            import logging
            import os

            logging.shutdown()
            os._exit(130)
