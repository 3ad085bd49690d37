"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from mammonode.demo.loopback import free_port, wait_port  # noqa: E402,F401  (re-exported)

LABELS = ("left_benign", "right_benign", "left_malignant", "right_malignant")
VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
EXAM_MODELS = "image_only,image_heatmaps,density_histogram,density_cnn"
IMAGEWISE_MODELS = "image_only_imagewise,image_heatmaps_imagewise"


def weights_dir(tmp: Path) -> Path:
    """The shared seed-0 test weights plus the official histogram model (the references' weights)."""
    target = tmp / "weights"
    target.mkdir()
    for f in (SHARED / "weights" / "test").iterdir():
        shutil.copy(f, target / f.name)
    shutil.copy(SHARED / "weights" / "official" / "density_histogram_model.p", target)
    return target


def block8(h: np.ndarray) -> np.ndarray:
    """8x8 block means over the top-left region divisible by 8 (the references' reduction)."""
    r, c = (h.shape[0] // 8) * 8, (h.shape[1] // 8) * 8
    return h[:r, :c].reshape(r // 8, 8, c // 8, 8).mean(axis=(1, 3), dtype=np.float64)


def deviations(run: dict, heatmaps: Mapping[str, np.ndarray], reference: dict) -> dict:
    """Largest deviation from the exam reference. ``heatmaps``: "VIEW_KIND" -> heatmap
    (facing right, as ``predict --heatmaps-out`` writes them)."""
    heat = max(
        float(
            np.abs(block8(heatmaps[f"{v}_{k}"]) - np.load(SHARED / "reference" / f"heatmap_{v}_{k}_block8.npy")).max()
        )
        for v in VIEWS
        for k in ("benign", "malignant")
    )
    ref = reference["cancer"]["augmented_seed0_epochs10"]
    cancer = max(abs(run["cancer"][m][label] - ref[m][label]) for m in ref for label in LABELS)
    dens = max(
        max(abs(a - b) for a, b in zip(run["density"][m]["probabilities"], reference["density"][m]["probabilities"]))
        for m in ("histogram", "cnn")
    )
    return {"heatmap_block8_max": heat, "cancer_max": cancer, "density_max": dens}


def imagewise_deviations(run: dict, heatmaps: Mapping[str, np.ndarray], reference: dict) -> dict:
    """Largest deviation from the image-wise reference: heatmap block means ("VIEW_imagewise_KIND"
    in ``heatmaps``), predictions."""
    folder = SHARED / "reference" / "imagewise"
    heat = max(
        float(
            np.abs(
                block8(heatmaps[f"{v}_imagewise_{k}"])
                - np.load(folder / reference["views"][v]["heatmaps"][k]["block8_file"])
            ).max()
        )
        for v in VIEWS
        for k in ("benign", "malignant")
    )
    predictions = max(
        abs(
            run["images"][v][f"{m}_imagewise"][label]
            - reference["views"][v]["predictions"][m]["augmented_seed0_epochs10"][label]
        )
        for v in VIEWS
        for m in ("image_only", "image_heatmaps")
        for label in ("benign", "malignant")
    )
    return {"heatmap_block8_max": heat, "predictions_max": predictions}


def result_heatmaps(result) -> dict[str, np.ndarray]:
    """A PipelineResult's heatmaps by the names ``predict --heatmaps-out`` gives their files."""
    out = {}
    for view, v in result.views.items():
        if v.heatmap_malignant is not None:
            out[f"{view}_malignant"] = v.heatmap_malignant
            out[f"{view}_benign"] = v.heatmap_benign
        if v.imagewise is not None:
            out[f"{view}_imagewise_malignant"] = v.imagewise.malignant
            out[f"{view}_imagewise_benign"] = v.imagewise.benign
    return out


def tool(name: str) -> str:
    path = f"/usr/bin/{name}"
    if not os.access(path, os.X_OK):
        sys.exit(f"{name} not found: install DCMTK (apt-get install dcmtk)")
    return path


def make_exams(target: Path, count: int, pngs: Path | None = None, key: str = "bench") -> list[list[Path]]:
    """``count`` distinct four-view studies (../shared/tools/mgdicom.py --key) from the density
    exam PNGs (or the grey PNGs in ``pngs``, named by view), the right views stored mirrored
    as in the original PNGs, with Patient Orientation saying so."""
    pngs = pngs or SHARED / "samples" / "png" / "density-exam"
    exams = []
    for i in range(count):
        folder = target / f"{key}{i:03d}"
        if not folder.exists():
            views = []
            for view in ("L-CC", "R-CC", "L-MLO", "R-MLO"):
                views += ["--view", f"{view}={pngs / (view + '.png')}"]
            command = [
                sys.executable,
                str(SHARED / "tools" / "mgdicom.py"),
                str(folder),
                *views,
                "--bits-from-8",
                "--key",
                f"{key}-{i}",
                "--patient-id",
                f"{key.upper()}{i:04d}",
                "--mirror",
                "R-CC",
                "--mirror",
                "R-MLO",
            ]
            subprocess.run(command, check=True, capture_output=True)
        exams.append(sorted(folder.glob("*.dcm")))
    return exams


def write_config(path: Path, port: int, storage: Path, extra: str = "") -> Path:
    path.write_text(f"""[node]
host = "127.0.0.1"
port = {port}
max_associations = 64
[storage]
directory = "{storage}"
[study]
quiet_period_s = 3600
[worker]
enabled = false
[logging]
level = "WARNING"
{extra}
""")
    return path
