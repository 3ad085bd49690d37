"""The pipeline's one entry point: four prepared views in, a PipelineResult out.

A pure function of (images, weights, parameters): no database, no network. The node's
worker and ``mammonode predict`` both call :func:`run_pipeline`. Each image is decoded,
oriented and cropped once, and every stage works from those crops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mammonode import __version__
from mammonode.pipeline import classify, density
from mammonode.pipeline.centers import best_center
from mammonode.pipeline.crop import CropInfo, crop_breast
from mammonode.pipeline.heatmaps import HeatmapStats, compute_heatmaps, make_grids, patch_runner
from mammonode.pipeline.images import ImageInputError, PreparedView
from mammonode.pipeline.model_registry import load_model
from mammonode.pipeline.weights import MODEL_NAMES, ModelProvenance, WeightsError, model_file, provenance
from mammonode.views import VIEWS, angle, laterality

DEFAULT_MODELS = MODEL_NAMES


@dataclass
class PipelineOptions:
    weights_dir: Path
    device: str = "auto"
    seed: int = 0
    epochs: int = 10
    augmentation: bool = True
    models: tuple[str, ...] = DEFAULT_MODELS
    precision: str = "fp32"  # or "bf16" (opt-in fast mode)
    heatmap_batch: int = 8
    classifier_batch: int = 1
    threads: int | None = None

    def parameters(self) -> dict:
        return {
            "seed": self.seed,
            "epochs": self.epochs if self.augmentation else 1,
            "augmentation": self.augmentation,
            "precision": self.precision,
            "crop": {"iterations": 100, "buffer": 50},
            "heatmaps": {"patch_size": 256, "stride_fixed": 70, "more_patches": 5},
            "max_crop_noise": list(classify.MAX_CROP_NOISE),
            "max_crop_size_noise": classify.MAX_CROP_SIZE_NOISE,
        }


@dataclass
class ViewResult:
    source: str
    mirrored: bool
    crop: CropInfo
    best_center: tuple[int, int]
    heatmap_benign: np.ndarray | None = None  # cropped frame, facing right
    heatmap_malignant: np.ndarray | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    orientation_source: str = ""
    faces_left: bool = False
    stride_lists: dict[str, list[int]] | None = None

    def as_dict(self) -> dict:
        out = {
            "source": self.source,
            "mirrored": self.mirrored,
            "orientation_source": self.orientation_source,
            "crop": self.crop.as_dict(),
            "best_center": list(self.best_center),
        }
        if self.stride_lists is not None:
            out["stride_lists"] = self.stride_lists
        if self.heatmap_malignant is not None:
            out["heatmaps"] = {
                "shape": list(self.heatmap_malignant.shape),
                "malignant": _stats(self.heatmap_malignant),
                "benign": _stats(self.heatmap_benign),
            }
        if self.sop_instance_uid:
            out["sop_instance_uid"] = self.sop_instance_uid
        return out

    def heatmap_in_stored_frame(self, kind: str, shape: tuple[int, int]) -> np.ndarray:
        """The heatmap placed back into the full image as acquired (NaN outside the crop)."""
        heatmap = self.heatmap_malignant if kind == "malignant" else self.heatmap_benign
        full = np.full(shape, np.nan, dtype=np.float32)
        top, bottom, left, right = self.crop.window_location
        full[top:bottom, left:right] = heatmap if not self.faces_left else heatmap[:, ::-1]
        return full


def _stats(array: np.ndarray) -> dict:
    return {"min": float(array.min()), "max": float(array.max()), "mean": float(array.mean(dtype=np.float64))}


@dataclass
class PipelineResult:
    study_instance_uid: str | None
    views: dict[str, ViewResult]
    cancer: dict[str, dict[str, float]] = field(default_factory=dict)
    density: dict[str, dict] = field(default_factory=dict)
    models: dict[str, ModelProvenance] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    timing_s: dict[str, float] = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    device: str = "cpu"
    software_version: str = __version__
    heatmap_stats: HeatmapStats | None = None

    @property
    def test_weights(self) -> bool:
        return any(p.test_weights for p in self.models.values())

    @property
    def unverified_weights(self) -> bool:
        return any(not p.verified for p in self.models.values())

    def as_dict(self) -> dict:
        out = {
            "study_instance_uid": self.study_instance_uid,
            "views": {view: self.views[view].as_dict() for view in VIEWS if view in self.views},
            "cancer": self.cancer,
            "density": self.density,
            "models": {name: p.as_dict() for name, p in self.models.items()},
            "timing_s": {k: round(v, 4) for k, v in self.timing_s.items()},
            "parameters": self.parameters,
            "device": self.device,
            "software_version": self.software_version,
            "test_weights": self.test_weights,
        }
        if self.skipped:
            out["skipped"] = self.skipped
        if self.test_weights:
            out["notice"] = "TEST WEIGHTS - NOT FOR CLINICAL USE"
        if self.heatmap_stats is not None:
            out["heatmap_patches"] = {"total": self.heatmap_stats.patches, "classified": self.heatmap_stats.classified}
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _plan(options: PipelineOptions) -> tuple[list[str], dict[str, str]]:
    """Which models run, and why the others do not."""
    skipped: dict[str, str] = {}
    run = []
    for name in options.models:
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
        if not model_file(options.weights_dir, name).exists():
            skipped[name] = f"weights not installed ({model_file(options.weights_dir, name).name})"
            continue
        if name == "image_heatmaps" and not model_file(options.weights_dir, "patch").exists():
            skipped[name] = "patch model weights not installed (patch_model.p), so no heatmaps"
            continue
        run.append(name)
    return run, skipped


def run_pipeline(
    prepared: Mapping[str, PreparedView], options: PipelineOptions, timing: dict[str, float] | None = None
) -> PipelineResult:
    missing = [v for v in VIEWS if v not in prepared]
    if missing:
        raise ImageInputError(f"the exam lacks views: {', '.join(missing)}")
    device = resolve_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    elif device.type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = options.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = options.precision == "tf32"
    timing = dict(timing or {})
    total_start = time.perf_counter()
    models_to_run, skipped = _plan(options)
    uids = {p.study_instance_uid for p in prepared.values() if p.study_instance_uid}
    result = PipelineResult(
        study_instance_uid=uids.pop() if len(uids) == 1 else None,
        views={},
        skipped=skipped,
        parameters=options.parameters(),
        device=str(device),
    )

    start = time.perf_counter()
    crops: dict[str, np.ndarray] = {}
    for view in VIEWS:
        p = prepared[view]
        try:
            info = crop_breast(p.image, facing_right=laterality(view) == "L")
        except ImageInputError as exc:
            raise ImageInputError(f"{view}: {exc}", view=view) from exc
        top, bottom, left, right = info.window_location
        cropped = p.image[top:bottom, left:right]
        if laterality(view) == "R":
            cropped = cropped[:, ::-1]
        crops[view] = np.ascontiguousarray(cropped)
        result.views[view] = ViewResult(
            source=p.source,
            mirrored=p.mirrored,
            crop=info,
            best_center=(0, 0),
            sop_instance_uid=p.sop_instance_uid,
            sop_class_uid=p.sop_class_uid,
            orientation_source=p.orientation_source,
            faces_left=laterality(view) == "R",
        )
    timing["crop"] = time.perf_counter() - start

    start = time.perf_counter()
    for view in VIEWS:
        result.views[view].best_center = best_center(crops[view], angle(view), result.views[view].crop)
    timing["centers"] = time.perf_counter() - start

    need_heatmaps = "image_heatmaps" in models_to_run
    if need_heatmaps:
        start = time.perf_counter()
        patch_model = load_model("patch", options.weights_dir).to(device)
        result.models["patch"] = provenance(options.weights_dir, "patch")
        grids = make_grids([crops[v].shape for v in VIEWS], seed=options.seed)
        runner = patch_runner(patch_model, channels_last=device.type == "cpu", precision=options.precision)
        maps, result.heatmap_stats = compute_heatmaps(
            [crops[v] for v in VIEWS], grids, runner, batch_size=options.heatmap_batch
        )
        for view, m, grid in zip(VIEWS, maps, grids):
            result.views[view].heatmap_benign = m.benign
            result.views[view].heatmap_malignant = m.malignant
            result.views[view].stride_lists = {"width": grid.width_strides, "length": grid.length_strides}
        del patch_model
        timing["heatmaps"] = time.perf_counter() - start

    centers = {v: result.views[v].best_center for v in VIEWS}
    for name in ("image_only", "image_heatmaps"):
        if name not in models_to_run:
            continue
        start = time.perf_counter()
        model = load_model(name, options.weights_dir).to(device)
        result.models[name] = provenance(options.weights_dir, name)
        heatmaps = None
        if name == "image_heatmaps":
            heatmaps = {
                v: np.dstack([result.views[v].heatmap_benign, result.views[v].heatmap_malignant]) for v in VIEWS
            }
        result.cancer[name] = classify.predict(
            model,
            crops,
            heatmaps,
            centers,
            epochs=options.epochs,
            seed=options.seed,
            augmentation=options.augmentation,
            batch_size=options.classifier_batch,
            device=device,
            precision=options.precision,
        )
        del model
        timing[name] = time.perf_counter() - start

    density_models = [m for m in ("density_histogram", "density_cnn") if m in models_to_run]
    if density_models:
        start = time.perf_counter()
        facing_right = {v: prepared[v].facing_right for v in VIEWS}
        for name in density_models:
            model = load_model(name, options.weights_dir).to(device)
            result.models[name] = provenance(options.weights_dir, name)
            if name == "density_histogram":
                probs = density.histogram_probabilities(model.cpu(), facing_right)
            else:
                probs = density.cnn_probabilities(model, facing_right, device)
            result.density[name.removeprefix("density_")] = {
                "probabilities": probs,
                "category": density.category(probs),
            }
        timing["density"] = time.perf_counter() - start

    timing["total"] = timing.get("prepare", 0.0) + time.perf_counter() - total_start
    result.timing_s = timing
    return result


__all__ = ["PipelineOptions", "PipelineResult", "run_pipeline", "WeightsError", "ImageInputError"]
