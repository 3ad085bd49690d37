"""The pipeline's one entry point: four prepared views in, a PipelineResult out.

A pure function of (images, weights, parameters): no database, no network. The node's
worker and ``mammonode predict`` both call :func:`run_pipeline`. Each image is decoded,
oriented and cropped once, and every stage works from those crops. The image-wise models
(opt-in) run after the exam's stages, on the same crops and centres, and take any subset
of the views when no exam-level model is selected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mammonode import __version__
from mammonode.exam.orientation import Frame, Orientation
from mammonode.exam.views import VIEWS, angle
from mammonode.pipeline import classify, density, imagewise
from mammonode.pipeline.centers import best_center
from mammonode.pipeline.crop import CropInfo, crop_breast
from mammonode.pipeline.heatmaps import (
    Heatmaps,
    HeatmapStats,
    PatchGrid,
    PatchRunner,
    compute_heatmaps,
    make_grids,
    patch_runner,
)
from mammonode.pipeline.images import ImageInputError, PreparedView
from mammonode.pipeline.imagewise import ImagewiseHeatmaps
from mammonode.pipeline.loaded import ModelCache
from mammonode.pipeline.progress import Progress, Silent
from mammonode.pipeline.registry import (
    CANCER_MODELS,
    DENSITY_MODELS,
    HEATMAP_MODELS,
    IMAGEWISE_MODELS,
    SELECTABLE,
    check_selection,
    needs_four_views,
)
from mammonode.pipeline.runtime import resolve_device
from mammonode.pipeline.weights import ModelProvenance, WeightsError, model_file

DEFAULT_MODELS = SELECTABLE


# Batch sizes (patches, augmented epochs) where none is configured: a GPU needs large ones to
# be busy (0 epochs: every epoch in one batch). On a CPU the patch model runs 32 patches at a
# time but its high-resolution layers 8 at a time (CPU_FRONT_BATCH; a 256-patch DenseNet batch
# alone overflows the caches), and 8 throughout when compiled (one graph, one batch size).
DEVICE_BATCHES = {"cpu": (32, 1), "cuda": (256, 0)}
CPU_FRONT_BATCH = 8


@dataclass
class PipelineOptions:
    weights_dir: Path
    device: str = "auto"
    seed: int = 0
    epochs: int = 10
    augmentation: bool = True
    models: tuple[str, ...] = DEFAULT_MODELS
    precision: str = "fp32"  # or "bf16" (opt-in fast mode)
    heatmap_batch: int = 0  # 0: DEVICE_BATCHES for the device the run resolves to
    classifier_batch: int = 0  # augmented epochs per batch; 0: DEVICE_BATCHES (0 there: every epoch)
    threads: int | None = None
    compile: bool = False  # compile the patch model (once per cache, i.e. once per worker)

    def for_device(self, device: torch.device) -> PipelineOptions:
        """These options with the batch sizes left at 0 chosen for ``device``."""
        heatmap, classifier = DEVICE_BATCHES["cuda" if device.type == "cuda" else "cpu"]
        if device.type != "cuda" and self.compile:
            heatmap = CPU_FRONT_BATCH
        return replace(
            self,
            heatmap_batch=self.heatmap_batch or heatmap,
            classifier_batch=self.classifier_batch or classifier or self.epochs,
        )

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
    orientation: Orientation
    crop: CropInfo
    best_center: tuple[int, int]
    heatmap_benign: np.ndarray | None = None  # cropped frame, facing right
    heatmap_malignant: np.ndarray | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    orientation_source: str = ""
    stride_lists: dict[str, list[int]] | None = None
    imagewise: ImagewiseHeatmaps | None = None  # the image-wise pipeline's own heatmaps

    def as_dict(self) -> dict:
        out = {
            "source": self.source,
            "mirrored": self.orientation.mirrored,
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
        if self.imagewise is not None:
            out["imagewise"] = {
                "stride_lists": self.imagewise.stride_lists,
                "heatmaps": {
                    "shape": list(self.imagewise.malignant.shape),
                    "malignant": _stats(self.imagewise.malignant),
                    "benign": _stats(self.imagewise.benign),
                },
                "reused_exam_heatmaps": self.imagewise.reused,
                "patches_from_exam": self.imagewise.patches_from_exam,
            }
        return out

    def heatmap_in_frame(self, kind: str, shape: tuple[int, int], frame: Frame) -> np.ndarray:
        """The heatmap placed back into the full image (``shape``, as acquired) and shown in
        ``frame``; NaN outside the crop."""
        heatmap = self.heatmap_malignant if kind == "malignant" else self.heatmap_benign
        full = np.full(shape, np.nan, dtype=np.float32)
        top, bottom, left, right = self.crop.window_location
        full[top:bottom, left:right] = self.orientation.convert(heatmap, Frame.FACING_RIGHT, Frame.ACQUIRED)
        return self.orientation.convert(full, Frame.ACQUIRED, frame)


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
    # Image-wise models: view -> model -> {"benign": p, "malignant": p}, for that image's breast.
    images: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    imagewise_heatmap_stats: HeatmapStats | None = None

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
        if self.images:
            out["images"] = {view: self.images[view] for view in VIEWS if view in self.images}
        if self.imagewise_heatmap_stats is not None:
            stats = self.imagewise_heatmap_stats
            out["imagewise_heatmap_patches"] = {"total": stats.patches, "classified": stats.classified}
        return out


def plan_models(options: PipelineOptions) -> tuple[list[str], dict[str, str]]:
    """Which models run, and why the others do not."""
    skipped: dict[str, str] = {}
    run = []
    for name in check_selection(options.models):
        if not model_file(options.weights_dir, name).exists():
            skipped[name] = f"weights not installed ({model_file(options.weights_dir, name).name})"
            continue
        if name in HEATMAP_MODELS and not model_file(options.weights_dir, "patch").exists():
            skipped[name] = "patch model weights not installed (patch_model.p), so no heatmaps"
            continue
        run.append(name)
    return run, skipped


@contextmanager
def _timed(timing: dict[str, float], stage: str, progress: Progress) -> Iterator[None]:
    progress.stage(stage)
    start = time.perf_counter()
    yield
    timing[stage] = time.perf_counter() - start
    progress.stage_done(stage, timing[stage])


def _crop_views(prepared: Mapping[str, PreparedView]) -> tuple[dict[str, np.ndarray], dict[str, ViewResult]]:
    """Each view's breast crop (facing right, the models' frame) and its ViewResult."""
    crops, views = {}, {}
    for view in (v for v in VIEWS if v in prepared):
        p = prepared[view]
        try:
            info = crop_breast(p.image, facing_right=p.orientation.faces_right(Frame.ACQUIRED))
        except ImageInputError as exc:
            raise ImageInputError(f"{view}: {exc}", view=view) from exc
        top, bottom, left, right = info.window_location
        cropped = p.orientation.convert(p.image[top:bottom, left:right], Frame.ACQUIRED, Frame.FACING_RIGHT)
        crops[view] = np.ascontiguousarray(cropped)
        views[view] = ViewResult(
            source=p.source,
            orientation=p.orientation,
            crop=info,
            best_center=(0, 0),
            sop_instance_uid=p.sop_instance_uid,
            sop_class_uid=p.sop_class_uid,
            orientation_source=p.orientation_source,
        )
    return crops, views


def _patch_model(
    options: PipelineOptions, device, result: PipelineResult, cache: ModelCache
) -> Callable[[], PatchRunner]:
    """The patch model's runner, loaded when first asked for and shared by both heatmap stages."""
    channels_last = device.type == "cpu"

    def get() -> PatchRunner:
        runner, result.models["patch"] = cache.derived(
            "patch",
            options.weights_dir,
            device,
            f"runner:{options.precision}:{channels_last}:{options.compile and options.heatmap_batch}",
            lambda model: patch_runner(
                model,
                channels_last=channels_last,
                precision=options.precision,
                compiled_batch=options.heatmap_batch if options.compile else 0,
                front_batch=CPU_FRONT_BATCH if device.type == "cpu" else 0,
            ),
        )
        return runner

    return get


def _heatmaps(
    crops: dict[str, np.ndarray], result: PipelineResult, options: PipelineOptions, runner: PatchRunner, progress
) -> dict[str, tuple[PatchGrid, Heatmaps]]:
    """The exam's heatmaps (one random stream for the four views), kept with their grids."""
    grids = make_grids([crops[v].shape for v in VIEWS], seed=options.seed)
    maps, result.heatmap_stats = compute_heatmaps(
        [crops[v] for v in VIEWS], grids, runner, options.heatmap_batch, progress
    )
    for view, m, grid in zip(VIEWS, maps, grids):
        result.views[view].heatmap_benign = m.benign
        result.views[view].heatmap_malignant = m.malignant
        result.views[view].stride_lists = {"width": grid.width_strides, "length": grid.length_strides}
    return {view: (grid, m) for view, m, grid in zip(VIEWS, maps, grids)}


def _imagewise_heatmaps(
    crops: dict[str, np.ndarray],
    result: PipelineResult,
    options: PipelineOptions,
    runner: PatchRunner,
    progress: Progress,
    exam: Mapping[str, tuple[PatchGrid, Heatmaps]] | None,
) -> None:
    orientations = {v: result.views[v].orientation for v in crops}
    maps, result.imagewise_heatmap_stats = imagewise.compute(
        crops, orientations, runner, options.seed, options.heatmap_batch, progress, exam
    )
    for view, m in maps.items():
        result.views[view].imagewise = m


def _imagewise(
    name: str,
    crops: dict[str, np.ndarray],
    result: PipelineResult,
    options: PipelineOptions,
    device,
    progress,
    cache: ModelCache,
) -> None:
    """One image-wise model on every view given, each image on its own."""
    model, result.models[name] = cache.model(name, options.weights_dir, device)
    views = [v for v in VIEWS if v in crops]
    progress.stage(name, total=(options.epochs if options.augmentation else 1) * len(views), unit="passes")
    for view in views:
        heatmaps = result.views[view].imagewise.stacked if name == "image_heatmaps_imagewise" else None
        result.images.setdefault(view, {})[name] = imagewise.predict(
            model.single(view),
            view,
            crops[view],
            heatmaps,
            result.views[view].best_center,
            epochs=options.epochs,
            seed=options.seed,
            augmentation=options.augmentation,
            batch_size=options.classifier_batch,
            device=device,
            precision=options.precision,
            progress=progress,
        )


def _cancer(
    name: str,
    crops: dict[str, np.ndarray],
    result: PipelineResult,
    options: PipelineOptions,
    device,
    progress,
    cache: ModelCache,
) -> None:
    model, result.models[name] = cache.model(name, options.weights_dir, device)
    progress.stage(name, total=options.epochs if options.augmentation else 1, unit="epochs")
    heatmaps = None
    if name == "image_heatmaps":
        heatmaps = {v: np.dstack([result.views[v].heatmap_benign, result.views[v].heatmap_malignant]) for v in VIEWS}
    result.cancer[name] = classify.predict(
        model,
        crops,
        heatmaps,
        {v: result.views[v].best_center for v in VIEWS},
        epochs=options.epochs,
        seed=options.seed,
        augmentation=options.augmentation,
        batch_size=options.classifier_batch,
        device=device,
        precision=options.precision,
        progress=progress,
    )


def _density(
    names: list[str], prepared: Mapping[str, PreparedView], result: PipelineResult, options, device, cache: ModelCache
) -> None:
    facing_right = {v: prepared[v].facing_right for v in VIEWS}
    for name in names:
        on = torch.device("cpu") if name == "density_histogram" else device  # a histogram MLP: CPU work
        model, result.models[name] = cache.model(name, options.weights_dir, on)
        if name == "density_histogram":
            probs = density.histogram_probabilities(model, facing_right)
        else:
            probs = density.cnn_probabilities(model, facing_right, device)
        result.density[name.removeprefix("density_")] = {"probabilities": probs, "category": density.category(probs)}


def run_pipeline(
    prepared: Mapping[str, PreparedView],
    options: PipelineOptions,
    timing: dict[str, float] | None = None,
    progress: Progress | None = None,
    cache: ModelCache | None = None,
) -> PipelineResult:
    """The exam's results. ``progress`` hears of each stage (and of patches and epochs).
    With only image-wise models selected, any non-empty subset of the four views will do.
    ``cache`` keeps the models loaded for the next run (a worker's); ``timing["load_models"]``
    is what this run spent loading (included in the stage that first needed each model)."""
    progress = progress or Silent()
    cache = cache if cache is not None else ModelCache()
    cache.take_seconds()
    missing = [v for v in VIEWS if v not in prepared]
    if missing and needs_four_views(options.models):
        raise ImageInputError(f"the exam lacks views: {', '.join(missing)}")
    if not any(v in prepared for v in VIEWS):
        raise ImageInputError("no view to run the image-wise models on")
    device = resolve_device(options.device)
    options = options.for_device(device)
    timing = dict(timing or {})
    total_start = time.perf_counter()
    models_to_run, skipped = plan_models(options)
    uids = {p.study_instance_uid for p in prepared.values() if p.study_instance_uid}
    result = PipelineResult(
        study_instance_uid=uids.pop() if len(uids) == 1 else None,
        views={},
        skipped=skipped,
        parameters=options.parameters(),
        device=str(device),
    )
    with _timed(timing, "crop", progress):
        crops, result.views = _crop_views(prepared)
    with _timed(timing, "centers", progress):
        for view in result.views:
            result.views[view].best_center = best_center(crops[view], angle(view), result.views[view].crop)
    patch = _patch_model(options, device, result, cache)
    exam_heatmaps = None
    if "image_heatmaps" in models_to_run:
        with _timed(timing, "heatmaps", progress):
            exam_heatmaps = _heatmaps(crops, result, options, patch(), progress)
    for name in CANCER_MODELS:
        if name in models_to_run:
            with _timed(timing, name, progress):
                _cancer(name, crops, result, options, device, progress, cache)
    density_models = [m for m in DENSITY_MODELS if m in models_to_run]
    if density_models:
        with _timed(timing, "density", progress):
            _density(density_models, prepared, result, options, device, cache)
    if "image_heatmaps_imagewise" in models_to_run:
        with _timed(timing, imagewise.STAGE, progress):
            _imagewise_heatmaps(crops, result, options, patch(), progress, exam_heatmaps)
    for name in IMAGEWISE_MODELS:
        if name in models_to_run:
            with _timed(timing, name, progress):
                _imagewise(name, crops, result, options, device, progress, cache)
    timing["load_models"] = cache.take_seconds()
    timing["total"] = timing.get("prepare", 0.0) + time.perf_counter() - total_start
    result.timing_s = timing
    return result


__all__ = ["PipelineOptions", "PipelineResult", "run_pipeline", "WeightsError", "ImageInputError"]
