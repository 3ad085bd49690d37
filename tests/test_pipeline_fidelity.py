"""The pipeline reproduces what NYU's original code computed (../shared/reference).

Tolerances are the issue's: crop, centres and stride lists exactly; heatmap 8x8 block means
within 1e-4; cancer predictions within 1e-4; the histogram density model within 1e-5; the
density CNN within 1e-4. The full runs go through the real `mammonode predict` command.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support.dicom import density_dicoms
from support.node import cli
from support.paths import need_shared

from mammonode.exam.views import VIEWS, angle
from mammonode.pipeline import standardise
from mammonode.pipeline.centers import best_center
from mammonode.pipeline.crop import crop_breast
from mammonode.pipeline.images import prepare_png
from mammonode.pipeline.inputs import prepare_exam

LABELS = ("left_benign", "right_benign", "left_malignant", "right_malignant")


def block8(heatmap: np.ndarray) -> np.ndarray:
    rows, cols = (heatmap.shape[0] // 8) * 8, (heatmap.shape[1] // 8) * 8
    return heatmap[:rows, :cols].reshape(rows // 8, 8, cols // 8, 8).mean(axis=(1, 3), dtype=np.float64)


def test_crop_centres_and_strides_exact_on_dicoms_and_pngs(reference):
    dicoms, _ = prepare_exam(density_dicoms())
    folder = need_shared("samples", "png", "density-exam")
    pngs, _ = prepare_exam(png_specs=[f"{v}={folder / (v + '.png')}" for v in VIEWS], png_mirrored=["R-CC", "R-MLO"])
    crops: dict[str, list[np.ndarray]] = {view: [] for view in VIEWS}
    for prepared in (dicoms, pngs):
        for view in VIEWS:
            image = prepared[view].image
            info = crop_breast(image, facing_right=view.startswith("L"))
            assert info.as_dict() == reference["views"][view]["crop"], view
            top, bottom, left, right = info.window_location
            cropped = image[top:bottom, left:right]
            cropped = np.ascontiguousarray(cropped[:, ::-1] if view.startswith("R") else cropped)
            assert list(best_center(cropped, angle(view), info)) == reference["views"][view]["best_center"], view
            crops[view].append(cropped)
    # A power-of-two scale commutes exactly with float rounding: both inputs standardise to
    # the same bits, and the patch grid's all-background test (raw != 0) agrees. So the
    # PNGs' heatmaps (and image+heatmaps predictions) are the DICOM run's, which are checked
    # against the reference; the PNG run (conftest) checks every other stage end to end.
    for view, (dicom_crop, png_crop) in crops.items():
        assert not np.array_equal(dicom_crop, png_crop)
        for standardise_for in (standardise.for_heatmaps, standardise.for_classifier, standardise.for_density):
            assert np.array_equal(standardise_for(dicom_crop), standardise_for(png_crop)), (view, standardise_for)
        assert np.array_equal(dicom_crop != 0, png_crop != 0), view
    # The DICOM instances hold the PNG values x16 (12 bits stored), the right views un-mirrored.
    for view in VIEWS:
        assert np.array_equal(dicoms[view].image, pngs[view].image * 16)
        assert dicoms[view].orientation.mirrored is False and dicoms[view].orientation_source == "patient_orientation"


@pytest.mark.parametrize("name", ["1_L_CC", "1_R_CC", "2_L_CC", "2_R_CC"])
def test_crop_and_centre_exact_on_nyu_cc_images(reference, name):
    view = f"{name[2]}-CC"
    prepared = prepare_png(view, need_shared("samples", "png", "nyu", f"{name}.png"))
    info = crop_breast(prepared.image, facing_right=view.startswith("L"))
    expected = reference["nyu_cc"][name]
    assert info.as_dict() == expected["crop"]
    top, bottom, left, right = info.window_location
    cropped = prepared.image[top:bottom, left:right]
    cropped = cropped[:, ::-1] if view.startswith("R") else cropped
    assert list(best_center(cropped, "CC", info)) == expected["best_center"]


def _check_run(run: dict, reference: dict, heatmaps: bool = True) -> None:
    """``heatmaps=False``: a run without the patch model (no heatmaps, no image+heatmaps)."""
    for view in VIEWS:
        ours, ref = run["views"][view], reference["views"][view]
        assert ours["crop"] == ref["crop"], view
        assert ours["best_center"] == ref["best_center"], view
        if not heatmaps:
            continue
        assert ours["stride_lists"] == ref["stride_lists"], view
        assert ours["heatmaps"]["shape"] == ref["heatmaps"]["shape"], view
        for kind in ("benign", "malignant"):
            heatmap = np.load(Path(run["_heatmaps_dir"]) / f"{view}_{kind}.npy")
            assert heatmap.dtype == np.float32 and list(heatmap.shape) == ref["heatmaps"]["shape"]
            expected = np.load(need_shared("reference", f"heatmap_{view}_{kind}_block8.npy"))
            delta = np.abs(block8(heatmap) - expected).max()
            assert delta <= 1e-4, f"{view} {kind}: max block-mean delta {delta}"
            for stat in ("min", "max", "mean"):
                assert abs(ours["heatmaps"][kind][stat] - ref["heatmaps"][kind][stat]) <= 1e-4
    expected_cancer = reference["cancer"]["augmented_seed0_epochs10"]
    for model in ("image_only", "image_heatmaps") if heatmaps else ("image_only",):
        for label in LABELS:
            delta = abs(run["cancer"][model][label] - expected_cancer[model][label])
            assert delta <= 1e-4, f"{model} {label}: {delta}"
    hist = run["density"]["histogram"]["probabilities"]
    for ours, ref in zip(hist, reference["density"]["histogram"]["probabilities"], strict=True):
        assert abs(ours - ref) <= 1e-5
    cnn = run["density"]["cnn"]["probabilities"]
    for ours, ref in zip(cnn, reference["density"]["cnn"]["probabilities"], strict=True):
        assert abs(ours - ref) <= 1e-4
    assert (
        run["density"]["histogram"]["category"]
        == "abcd"[int(np.argmax(reference["density"]["histogram"]["probabilities"]))]
    )
    assert run["test_weights"] is True and run["models"]["image_only"]["test_weights"] is True
    assert run["models"]["density_histogram"]["verified"] is True
    assert run["models"]["density_histogram"]["test_weights"] is False


@pytest.mark.slow
def test_full_pipeline_on_dicoms_matches_reference(dicom_run, reference):
    _check_run(dicom_run, reference)
    assert all(dicom_run["views"][v]["mirrored"] is False for v in VIEWS)


@pytest.mark.slow
def test_full_pipeline_on_pngs_matches_reference(png_run, reference):
    """Without the patch model: its inputs are the DICOM run's, bit for bit (see above)."""
    _check_run(png_run, reference, heatmaps=False)
    assert "image_heatmaps" not in png_run["cancer"]
    assert png_run["views"]["R-CC"]["mirrored"] is True and png_run["views"]["L-CC"]["mirrored"] is False


@pytest.mark.slow
def test_single_pass_without_augmentation_matches_reference(dicom_run, reference, test_weights_dir):
    """The deterministic single pass, on the heatmaps of the DICOM run (saves recomputing them)."""
    from mammonode.pipeline import classify
    from mammonode.pipeline.weights import load_model

    prepared, _ = prepare_exam(density_dicoms())
    crops, centers, heatmaps = {}, {}, {}
    for view in VIEWS:
        info = dicom_run["views"][view]["crop"]
        top, bottom, left, right = info["window_location"]
        cropped = prepared[view].image[top:bottom, left:right]
        crops[view] = np.ascontiguousarray(cropped[:, ::-1] if view.startswith("R") else cropped)
        centers[view] = tuple(dicom_run["views"][view]["best_center"])
        folder = Path(dicom_run["_heatmaps_dir"])
        heatmaps[view] = np.dstack([np.load(folder / f"{view}_benign.npy"), np.load(folder / f"{view}_malignant.npy")])
    expected = reference["cancer"]["single_pass"]
    for model, maps in (("image_only", None), ("image_heatmaps", heatmaps)):
        net = load_model(model, test_weights_dir)
        preds = classify.predict(net, crops, maps, centers, epochs=10, seed=0, augmentation=False)
        for label in LABELS:
            assert abs(preds[label] - expected[model][label]) <= 1e-4, (model, label)


def test_missing_weights_are_reported_and_skipped(tmp_path):
    out = cli(
        "predict",
        *[str(p) for p in density_dicoms()],
        "--weights-dir",
        str(tmp_path),
        "--json",
        "--models",
        "image_only,density_histogram",
    )
    data = json.loads(out.stdout)
    assert data["cancer"] == {} and data["density"] == {}
    assert set(data["skipped"]) == {"image_only", "density_histogram"}
    assert "image_only_model.p" in data["skipped"]["image_only"]
