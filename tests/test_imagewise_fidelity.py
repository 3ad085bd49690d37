"""The image-wise pipeline reproduces NYU's run_single.sh (../shared/reference/imagewise).

Tolerances are the issue's: crop, best centre and stride lists exactly; heatmap 8x8 block
means (and min, max, mean) within 1e-4; both image-wise models' benign and malignant
predictions within 1e-4, augmented (10 epochs, seed 0) and single pass, for all four views.
The DICOM inputs' image-wise heatmaps and predictions come from the real ``mammonode
predict`` with every model (conftest's dicom_run, which the exam-level tests share); the
single passes reuse those heatmaps. The PNG inputs are checked for crop, centre, grid and the
image-only single pass.
Expected values come only from the reference files. The deltas found are written to
artifacts/imagewise_deltas.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from support.dicom import density_dicoms
from support.node import cli
from support.paths import need_shared

from mammonode.exam.orientation import Frame
from mammonode.exam.views import VIEWS, angle
from mammonode.pipeline import imagewise, standardise
from mammonode.pipeline.centers import best_center
from mammonode.pipeline.crop import crop_breast
from mammonode.pipeline.images import PreparedView
from mammonode.pipeline.inputs import prepare_exam
from mammonode.pipeline.registry import IMAGEWISE_MODELS
from mammonode.pipeline.weights import WeightsError, load_model

TOLERANCE = 1e-4
AUGMENTED, SINGLE_PASS = "augmented_seed0_epochs10", "single_pass"
REFERENCE_NAME = {"image_only_imagewise": "image_only", "image_heatmaps_imagewise": "image_heatmaps"}
KINDS = ("benign", "malignant")
DELTAS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def iw_reference() -> dict:
    return json.loads(need_shared("reference", "imagewise", "reference_imagewise.json").read_text())


def block8(heatmap: np.ndarray) -> np.ndarray:
    """8x8 block means over the top-left region divisible by 8 (the reference's convention)."""
    rows, cols = (heatmap.shape[0] // 8) * 8, (heatmap.shape[1] // 8) * 8
    return heatmap[:rows, :cols].reshape(rows // 8, 8, cols // 8, 8).mean(axis=(1, 3))


def png_exam() -> dict[str, PreparedView]:
    """The density exam's PNGs: every view faces right, so the right views are stored mirrored."""
    folder = need_shared("samples", "png", "density-exam")
    prepared, _ = prepare_exam(
        png_specs=[f"{v}={folder / (v + '.png')}" for v in VIEWS], png_mirrored=["R-CC", "R-MLO"]
    )
    return prepared


def cropped(prepared: PreparedView, window: list[int]) -> np.ndarray:
    """The crop facing right, the classifier's frame."""
    top, bottom, left, right = window
    crop = prepared.orientation.convert(prepared.image[top:bottom, left:right], Frame.ACQUIRED, Frame.FACING_RIGHT)
    return np.ascontiguousarray(crop)


@dataclass
class ImagewiseRun:
    """One input kind's image-wise results: the JSON (as ``predict --json`` prints it) and the
    image-wise heatmaps (facing right) and crops the single passes start from."""

    kind: str
    data: dict
    heatmaps: dict[str, dict[str, np.ndarray]]
    crops: dict[str, np.ndarray] = field(default_factory=dict)


def _single_passes(run: ImagewiseRun, weights: Path) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {view: {} for view in VIEWS}
    for name in IMAGEWISE_MODELS:
        model = load_model(name, weights)
        for view in VIEWS:
            maps = None
            if name == "image_heatmaps_imagewise":
                maps = np.dstack([run.heatmaps[view]["benign"], run.heatmaps[view]["malignant"]])
            center = tuple(run.data["views"][view]["best_center"])
            with torch.inference_mode():
                out[view][name] = imagewise.predict(
                    model.single(view), view, run.crops[view], maps, center, epochs=10, seed=0, augmentation=False
                )
    return out


def _from_run(kind: str, data: dict, prepared: dict[str, PreparedView]) -> ImagewiseRun:
    folder = Path(data["_heatmaps_dir"])
    heatmaps = {v: {k: np.load(folder / f"{v}_imagewise_{k}.npy") for k in KINDS} for v in VIEWS}
    crops = {v: cropped(prepared[v], data["views"][v]["crop"]["window_location"]) for v in VIEWS}
    return ImagewiseRun(kind, data, heatmaps, crops)


@pytest.fixture(scope="session")
def dicom_imagewise(dicom_run) -> ImagewiseRun:
    """The real `mammonode predict` on the four DICOM instances, every model (conftest's
    dicom_run, shared with the exam-level fidelity tests)."""
    prepared, _ = prepare_exam(density_dicoms())
    return _from_run("dicom", dicom_run, prepared)


def _record(artifacts: Path, kind: str, section: str, values: dict) -> None:
    DELTAS.setdefault(kind, {})[section] = values
    (artifacts / "imagewise_deltas.json").write_text(json.dumps(DELTAS, indent=1, sort_keys=True) + "\n")


def check_views(run: ImagewiseRun, reference: dict, artifacts: Path) -> None:
    deltas = {}
    for view in VIEWS:
        ours, expected = run.data["views"][view], reference["views"][view]
        assert ours["crop"] == expected["crop"], view
        assert ours["best_center"] == expected["best_center"], view
        assert ours["imagewise"]["stride_lists"] == expected["stride_lists"], view
        assert ours["imagewise"]["heatmaps"]["shape"] == expected["heatmaps"]["shape"], view
        for kind in KINDS:
            heatmap = run.heatmaps[view][kind]
            assert heatmap.dtype == np.float32 and list(heatmap.shape) == expected["heatmaps"]["shape"]
            ref = np.load(need_shared("reference", "imagewise", expected["heatmaps"][kind]["block8_file"]))
            delta = float(np.abs(block8(heatmap) - ref).max())
            deltas[f"{view} {kind}"] = delta
            assert delta <= TOLERANCE, f"{run.kind} {view} {kind}: max block-mean delta {delta}"
            for stat in ("min", "max", "mean"):
                assert abs(ours["imagewise"]["heatmaps"][kind][stat] - expected["heatmaps"][kind][stat]) <= TOLERANCE
    _record(artifacts, run.kind, "heatmap_block8_max_abs", deltas)


def check_predictions(images: dict, reference: dict, setting: str, kind: str, artifacts: Path) -> None:
    deltas = {}
    for view in VIEWS:
        for name in IMAGEWISE_MODELS:
            expected = reference["views"][view]["predictions"][REFERENCE_NAME[name]][setting]
            delta = max(abs(images[view][name][label] - expected[label]) for label in KINDS)
            deltas[f"{view} {name}"] = delta
            assert delta <= TOLERANCE, f"{kind} {view} {name} {setting}: {delta}"
    _record(artifacts, kind, setting, deltas)


def test_crop_centres_and_stride_lists_exact_on_dicoms_and_pngs(iw_reference):
    """Crop and centre are the exam's; each grid is the first draw after its own seed, on
    the crop as acquired (the stride lists do not depend on the flip, the grid's anchor does)."""
    dicoms, _ = prepare_exam(density_dicoms())
    crops: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {view: [] for view in VIEWS}
    for prepared in (dicoms, png_exam()):
        for view in VIEWS:
            expected = iw_reference["views"][view]
            info = crop_breast(
                prepared[view].image, facing_right=prepared[view].orientation.faces_right(Frame.ACQUIRED)
            )
            assert info.as_dict() == expected["crop"], view
            crop = cropped(prepared[view], list(info.window_location))
            assert list(best_center(crop, angle(view), info)) == expected["best_center"], view
            grid = imagewise.grid(crop.shape, seed=0)
            assert {"width": grid.width_strides, "length": grid.length_strides} == expected["stride_lists"], view
            top, bottom, left, right = info.window_location
            acquired = np.ascontiguousarray(prepared[view].image[top:bottom, left:right])  # the heatmaps' frame
            crops[view].append((acquired, crop))  # and the classifier's
    # The DICOM values are the PNG values x16, a power of two, which commutes exactly with
    # float rounding: the crops as acquired standardise to the same bits and have the same
    # all-background patches, so the PNGs' image-wise heatmaps and predictions are those of
    # the DICOM run, which the slow tests below check against the reference.
    for view, (dicom_crops, png_crops) in crops.items():
        for dicom_crop, png_crop in zip(dicom_crops, png_crops, strict=True):
            assert not np.array_equal(dicom_crop, png_crop)
            for standardise_for in (standardise.for_heatmaps, standardise.for_classifier):
                assert np.array_equal(standardise_for(dicom_crop), standardise_for(png_crop)), view
            assert np.array_equal(dicom_crop != 0, png_crop != 0), view


def test_imagewise_weights_load_strictly_and_name_the_first_mismatch(tmp_path, test_weights_dir):
    for name in IMAGEWISE_MODELS:
        model = load_model(name, test_weights_dir)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        single = model.single("R-MLO")
        full = model.output_layer_rmlo.fc_layer
        assert single.view_resnet is model.four_view_resnet.mlo and single.fc1 is model.fc1_rmlo
        assert torch.equal(single.output_layer.fc_layer.weight, full.weight[:4])
    state = torch.load(test_weights_dir / "image_heatmaps_imagewise_model.p", weights_only=True)["model"]
    broken = {k: v for k, v in state.items() if k != "fc1_rcc.weight"}
    torch.save({"model": broken}, tmp_path / "image_heatmaps_imagewise_model.p")
    with pytest.raises(WeightsError, match="missing key 'fc1_rcc.weight'"):
        load_model("image_heatmaps_imagewise", tmp_path)
    one_channel = torch.load(test_weights_dir / "image_only_imagewise_model.p", weights_only=True)
    torch.save(one_channel, tmp_path / "image_heatmaps_imagewise_model.p")
    with pytest.raises(WeightsError, match=r"four_view_resnet\.cc\.first_conv\.weight.*shape \(16, 1, 7, 7\)"):
        load_model("image_heatmaps_imagewise", tmp_path)


def test_fewer_views_only_for_image_wise_models(iw_reference, test_weights_dir):
    """Two views are enough for the image-wise models; the exam-level ones still need four."""
    files = [p for p in density_dicoms() if p.stem in ("L-CC", "R-MLO")]
    base = ["predict", *map(str, files), "--weights-dir", str(test_weights_dir), "--device", "cpu", "--json", "-q"]
    out = cli(*base, "--models", "image_only_imagewise", "--no-augmentation")
    data = json.loads(out.stdout)
    assert set(data["images"]) == {"L-CC", "R-MLO"} and set(data["views"]) == {"L-CC", "R-MLO"}
    assert data["cancer"] == {} and data["density"] == {} and data["test_weights"] is True
    for view in ("L-CC", "R-MLO"):
        expected = iw_reference["views"][view]["predictions"]["image_only"][SINGLE_PASS]
        for label in KINDS:
            assert abs(data["images"][view]["image_only_imagewise"][label] - expected[label]) <= TOLERANCE
    refused = cli(*base, "--models", "image_only,image_only_imagewise", check=False)
    assert refused.returncode == 1 and "lacks views: R-CC, L-MLO" in refused.stderr
    unknown = cli(*base, "--models", "image_wise", check=False)
    assert unknown.returncode == 1 and "image_heatmaps_imagewise" in unknown.stderr


@pytest.mark.slow
def test_predict_on_dicoms_matches_reference(dicom_imagewise, iw_reference, artifacts):
    data = dicom_imagewise.data
    assert data["test_weights"] is True and set(IMAGEWISE_MODELS) <= set(data["models"])
    assert all(data["views"][v]["mirrored"] is False for v in VIEWS)
    check_views(dicom_imagewise, iw_reference, artifacts)
    check_predictions(data["images"], iw_reference, AUGMENTED, "dicom", artifacts)
    # Stage seconds of this run (all six models; L-CC's image-wise heatmaps are the exam's).
    _record(artifacts, "dicom", "stage_seconds", data["timing_s"])


def _corners(strides: dict[str, list[int]]) -> set[tuple[int, int]]:
    ys, xs = np.cumsum([0, *strides["width"]]), np.cumsum([0, *strides["length"]])
    return {(int(y), int(x)) for y in ys for x in xs}


@pytest.mark.slow
def test_left_views_take_the_exams_patches_where_both_grids_have_one(dicom_imagewise, iw_reference, reference):
    """The left views are seen facing right by both producers, so a patch the two grids share
    is one input, classified once: all of L-CC's, those of L-MLO at a shared place (counted
    from the two references' stride lists); the right views' producers see mirror images."""
    for view in VIEWS:
        ours = dicom_imagewise.data["views"][view]["imagewise"]
        both = _corners(iw_reference["views"][view]["stride_lists"]) & _corners(
            reference["views"][view]["stride_lists"]
        )
        expected = len(both) if view.startswith("L-") else 0
        assert ours["patches_from_exam"] == expected, view
        assert ours["reused_exam_heatmaps"] is (view == "L-CC"), view
    assert dicom_imagewise.data["views"]["L-MLO"]["imagewise"]["patches_from_exam"] > 0


@pytest.mark.slow
def test_single_pass_on_dicoms_matches_reference(dicom_imagewise, iw_reference, test_weights_dir, artifacts):
    check_predictions(_single_passes(dicom_imagewise, test_weights_dir), iw_reference, SINGLE_PASS, "dicom", artifacts)


def test_image_only_single_pass_on_pngs_matches_reference(iw_reference, test_weights_dir, artifacts):
    """The PNG inputs through the image-wise classifier: crop, centre and a single pass of the
    image-only image-wise model on each PNG view, against the reference. (The PNGs' image-wise
    heatmaps and augmented predictions matched the reference within 2.4e-7 and 1.7e-7 when run
    in full; CI runs them on the DICOM inputs, whose standardised crops are the PNGs' bit for
    bit, as the crop test above shows.)"""
    prepared = png_exam()
    model = load_model("image_only_imagewise", test_weights_dir)
    images = {}
    for view in VIEWS:
        info = crop_breast(prepared[view].image, facing_right=prepared[view].orientation.faces_right(Frame.ACQUIRED))
        crop = cropped(prepared[view], list(info.window_location))
        center = best_center(crop, angle(view), info)
        with torch.inference_mode():
            images[view] = {
                "image_only_imagewise": imagewise.predict(
                    model.single(view), view, crop, None, center, epochs=10, seed=0, augmentation=False
                )
            }
    deltas = {}
    for view in VIEWS:
        expected = iw_reference["views"][view]["predictions"]["image_only"][SINGLE_PASS]
        delta = max(abs(images[view]["image_only_imagewise"][label] - expected[label]) for label in KINDS)
        deltas[f"{view} image_only_imagewise"] = delta
        assert delta <= TOLERANCE, f"png {view}: {delta}"
    _record(artifacts, "png", SINGLE_PASS, deltas)
