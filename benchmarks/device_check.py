#!/usr/bin/env python
"""One check of a GPU server of the kind mammonode targets; with ``--device cpu --quick`` the
same code runs in CI on a CPU so that it cannot rot.

Writes DIR/device_check.json and DIR/summary.txt (DIR: --out or $MAMMONODE_CHECK_OUT); each
part is reported even when another fails:

1. fidelity: crop, best centre and stride lists exactly as ../shared/reference (and
   ../shared/reference/imagewise); heatmap 8x8 block means and predictions within 1e-4 of
   them in fp32 with TF32 off; the same deviations for TF32 and bf16 autocast.
2. latency: the density exam from its DICOM files to the serialised result objects (all
   exam and image-wise models, 10 epochs), per stage and total, fp32 / TF32 / bf16, and the
   models' loading measured apart (on CUDA a first, cold fp32 run is reported separately).
3. throughput: a ``mammonode worker`` on the device draining a queue of N copies of the exam
   in a temporary SQLite node (benchmarks/device_throughput.py).

Quick mode (CI): L-CC alone, 4x2 of its heatmap patches (compared where those patches alone
determine the heatmap), the image-wise image-only model in one pass (the reference's
single_pass), and two exams through a worker running the density histogram model alone.

    python benchmarks/device_check.py [--device cuda|cuda:K|cpu] [--quick] [--out DIR]
        [--exams N] [--time-budget-s S]

Exit status 0 when every part is ok, 1 when one is not, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from common import (
    EXAM_MODELS,
    IMAGEWISE_MODELS,
    SHARED,
    VIEWS,
    block8,
    deviations,
    imagewise_deviations,
    result_heatmaps,
    weights_dir,
)

EXAM = SHARED / "samples" / "dicom" / "density-exam"
TOLERANCE = 1e-4
QUICK_VIEW = "L-CC"  # the first view of the exam's random stream: its grid is the reference's alone


@dataclass(frozen=True)
class Plan:
    views: tuple[str, ...]
    models: tuple[str, ...]
    epochs: int
    augmentation: bool
    patch_window: bool  # a few of the view's heatmap patches instead of whole heatmaps


FULL = Plan(VIEWS, tuple(f"{EXAM_MODELS},{IMAGEWISE_MODELS}".split(",")), 10, True, False)
QUICK = Plan((QUICK_VIEW,), ("image_only_imagewise",), 1, False, True)


def say(message: str) -> None:
    print(f"device_check: {message}", file=sys.stderr, flush=True)


def synchronize(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# -- running the pipeline ---------------------------------------------------------------------


def model_loading(models: tuple[str, ...], weights: Path, device: str) -> dict[str, float]:
    """Seconds to read each model's file and move it to the device (a worker does it once)."""
    from mammonode.pipeline.weights import load_model

    seconds = {}
    for name in ("patch", *models):
        start = time.perf_counter()
        model = load_model(name, weights).to(device)
        synchronize(device)
        seconds[name] = time.perf_counter() - start
        del model
    return seconds


def patch_window(result, prepared, weights: Path, device: str, precision: str) -> dict:
    """Quick mode's heatmaps: a window of L-CC's patch grid (four rows mid-image: the fewest
    whose patches alone cover some rows; the two columns at the chest wall), accumulated as
    the pipeline does; NaN wherever a patch outside the window would also cover the pixel, so
    what is left must equal the reference exactly there."""
    import torch

    from mammonode.exam.orientation import Frame
    from mammonode.pipeline import standardise
    from mammonode.pipeline.heatmaps import (
        BENIGN_CLASS,
        MALIGNANT_CLASS,
        PATCH_SIZE,
        accumulate,
        make_grids,
        origins,
        patch_runner,
    )
    from mammonode.pipeline.weights import load_model

    top, bottom, left, right = result.views[QUICK_VIEW].crop.window_location
    crop = prepared.orientation.convert(prepared.image[top:bottom, left:right], Frame.ACQUIRED, Frame.FACING_RIGHT)
    grid = make_grids([crop.shape], seed=0)[0]
    ys, xs = origins(grid.width_strides), origins(grid.length_strides)
    rows, cols = range(len(ys) // 2 - 2, len(ys) // 2 + 2), range(0, 2)
    corners = np.array([(ys[i], xs[j]) for j in cols for i in rows])  # rows vary fastest, as the grid
    standardised = standardise.for_heatmaps(np.ascontiguousarray(crop))
    batch = np.stack([standardised[y : y + PATCH_SIZE, x : x + PATCH_SIZE] for y, x in corners])[:, None]
    model = load_model("patch", weights).to(device)
    run = patch_runner(model, channels_last=torch.device(device).type == "cpu", precision=precision)
    probabilities = run(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    def exact(origin: np.ndarray, chosen: range, size: int) -> slice:
        first = origin[chosen.start - 1] + PATCH_SIZE if chosen.start > 0 else 0
        return slice(int(first), int(origin[chosen.stop]) if chosen.stop < len(origin) else size)

    determined = np.zeros(crop.shape, dtype=bool)
    determined[exact(ys, rows, crop.shape[0]), exact(xs, cols, crop.shape[1])] = True
    maps = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for kind, column in (("benign", BENIGN_CLASS), ("malignant", MALIGNANT_CLASS)):
            heatmap = accumulate(crop.shape, corners, probabilities[:, column])
            heatmap[~determined] = np.nan
            maps[kind] = heatmap
    strides = {"width": grid.width_strides, "length": grid.length_strides}
    return {"maps": maps, "stride_lists": strides, "patches": len(corners)}


def result_objects(result, prepared) -> int:
    """Build and serialise the result objects as ``predict --results-out`` does; their count."""
    from mammonode.pipeline.images import read_dicom, without_pixels
    from mammonode.reporting.objects import build_objects, sources_from_prepared
    from mammonode.reporting.uids import stable_uid

    headers = {view: without_pixels(read_dicom(Path(p.source))) for view, p in prepared.items()}
    key = stable_uid(result.study_instance_uid or "", "device-check", "cli")
    objects = build_objects(result, sources_from_prepared(prepared, headers), result.study_instance_uid, key)
    for obj in objects:
        obj.dataset.save_as(io.BytesIO(), enforce_file_format=True)
    return len(objects)


def run_mode(mode: str, plan: Plan, weights: Path, device: str, cache=None) -> dict:
    """The plan once in ``mode`` (fp32, tf32 or bf16), timed from the DICOM files to the
    serialised result objects; ``cache`` keeps the models loaded between runs, as a worker
    keeps them between exams."""
    import torch

    from mammonode.pipeline.inputs import prepare_exam
    from mammonode.pipeline.run import PipelineOptions, run_pipeline
    from mammonode.pipeline.runtime import configure_torch

    configure_torch(device, mode)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    prepared, seconds = prepare_exam([EXAM / f"{view}.dcm" for view in plan.views])
    options = PipelineOptions(
        weights_dir=weights,
        device=device,
        epochs=plan.epochs,
        augmentation=plan.augmentation,
        models=plan.models,
        precision=mode,
    )
    result = run_pipeline(prepared, options, {"prepare": seconds}, cache=cache)
    timing = dict(result.timing_s)
    timing["pipeline_total"] = timing.pop("total")
    window = None
    if plan.patch_window:
        begin = time.perf_counter()
        window = patch_window(result, prepared[QUICK_VIEW], weights, device, mode)
        timing["heatmap_window"] = time.perf_counter() - begin
    begin = time.perf_counter()
    count = result_objects(result, prepared)
    synchronize(device)
    timing["result_objects"] = time.perf_counter() - begin
    timing["total"] = time.perf_counter() - start
    run = {
        "timing_s": timing,
        "result_objects": count,
        # PyTorch's TF32 switches act on CUDA only: None on the CPU.
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        if cuda
        else None,
        "result": result.as_dict(),
        "heatmaps": result_heatmaps(result),
        "window": window,
    }
    if result.heatmap_stats is not None:
        run["heatmap_patches"] = result.heatmap_stats.patches
    if window is not None:
        run["heatmap_patches"] = window["patches"]
    if cuda:
        run["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return run


# -- comparing with the references ------------------------------------------------------------


def _same(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def geometry(run: dict, plan: Plan, reference: dict, imagewise: dict) -> dict:
    """Crops, centres and stride lists against both references: names of what differs."""
    views = run["result"]["views"]
    mismatches, compared = [], 0
    for view in plan.views:
        got = views[view]
        strides = run["window"]["stride_lists"] if plan.patch_window else got["stride_lists"]
        iw_strides = strides if plan.patch_window else got["imagewise"]["stride_lists"]
        checks = [
            ("crop", got["crop"], reference["views"][view]["crop"]),
            ("best_center", got["best_center"], reference["views"][view]["best_center"]),
            ("stride_lists", strides, reference["views"][view]["stride_lists"]),
            ("imagewise crop", got["crop"], imagewise["views"][view]["crop"]),
            ("imagewise best_center", got["best_center"], imagewise["views"][view]["best_center"]),
            ("imagewise stride_lists", iw_strides, imagewise["views"][view]["stride_lists"]),
        ]
        for name, value, expected in checks:
            compared += 1
            if not _same(value, expected):
                mismatches.append(f"{view} {name}: {json.dumps(value)[:200]} != {json.dumps(expected)[:200]}")
    return {"exact": not mismatches, "compared": compared, "mismatches": mismatches}


def window_deviations(run: dict, imagewise: dict) -> dict:
    """Quick mode: the window's determined heatmap blocks and the single-pass prediction."""
    out = {"heatmap_blocks_compared": 0}
    for name, folder, prefix in (
        ("heatmap_block8_max", SHARED / "reference", "heatmap"),
        ("imagewise_heatmap_block8_max", SHARED / "reference" / "imagewise", "heatmap_imagewise"),
    ):
        worst = 0.0
        for kind, heatmap in run["window"]["maps"].items():
            blocks = block8(heatmap)
            expected = np.load(folder / f"{prefix}_{QUICK_VIEW}_{kind}_block8.npy")
            known = ~np.isnan(blocks)
            out["heatmap_blocks_compared"] = int(known.sum())
            if known.any():
                worst = max(worst, float(np.abs(blocks[known] - expected[known]).max()))
        out[name] = worst
    got = run["result"]["images"][QUICK_VIEW]["image_only_imagewise"]
    expected = imagewise["views"][QUICK_VIEW]["predictions"]["image_only"]["single_pass"]
    out["imagewise_predictions_max"] = max(abs(got[k] - expected[k]) for k in ("benign", "malignant"))
    return out


def run_deviations(run: dict, plan: Plan, reference: dict, imagewise: dict) -> dict:
    if plan.patch_window:
        return window_deviations(run, imagewise)
    exam = deviations(run["result"], run["heatmaps"], reference)
    per_image = imagewise_deviations(run["result"], run["heatmaps"], imagewise)
    return exam | {f"imagewise_{k}": v for k, v in per_image.items()}


def computed(run: dict, plan: Plan) -> dict:
    """What the fp32 run computed that the references fix, for readers (and tests) to compare."""
    result = run["result"]
    views = {}
    for view in plan.views:
        got = result["views"][view]
        strides = run["window"]["stride_lists"] if plan.patch_window else got["stride_lists"]
        views[view] = {"crop": got["crop"], "best_center": got["best_center"], "stride_lists": strides}
    return {
        "views": views,
        "cancer": result["cancer"],
        "density": result["density"],
        "images": result.get("images", {}),
    }


def fidelity(runs: dict, plan: Plan) -> dict:
    reference = json.loads((SHARED / "reference" / "reference.json").read_text())
    imagewise = json.loads((SHARED / "reference" / "imagewise" / "reference_imagewise.json").read_text())
    if "fp32" not in runs or "error" in runs["fp32"]:
        raise RuntimeError("the fp32 run failed: " + runs.get("fp32", {}).get("error", "not run"))
    report = {"tolerance": TOLERANCE, "geometry": geometry(runs["fp32"], plan, reference, imagewise), "modes": {}}
    report["computed"] = computed(runs["fp32"], plan)
    for mode, run in runs.items():
        if "error" not in run and "skipped" not in run:
            report["modes"][mode] = run_deviations(run, plan, reference, imagewise) | {"tf32": run["tf32"]}
    fp32 = report["modes"]["fp32"]
    within = all(v <= TOLERANCE for k, v in fp32.items() if k.endswith("_max"))
    tf32_off = fp32["tf32"] is None or not (fp32["tf32"]["matmul"] or fp32["tf32"]["cudnn"])
    enough = not plan.patch_window or fp32["heatmap_blocks_compared"] > 0
    report["ok"] = report["geometry"]["exact"] and within and tf32_off and enough
    return report


# -- the parts --------------------------------------------------------------------------------


def modes_for(device: str, quick: bool) -> list[str]:
    """TF32 exists on CUDA only; there a cold fp32 run comes first (CUDA start, kernel loading).
    On a CPU, quick mode runs fp32 alone: bf16 without native support costs more than the
    rest of the check, and its code path is the fp32 one with another precision."""
    if device.startswith("cuda"):
        return ["fp32_cold", "fp32", "tf32", "bf16"]
    return ["fp32"] if quick else ["fp32", "bf16"]


def pipeline_runs(plan: Plan, weights: Path, device: str, deadline: float) -> dict:
    """Every mode's run; a run that fails or would overrun ``deadline`` says so instead."""
    from mammonode.pipeline.loaded import ModelCache

    runs: dict[str, dict] = {}
    cache = ModelCache()  # the first run loads the models, the next ones reuse them
    last = 0.0
    for mode in modes_for(device, plan.patch_window):
        if time.monotonic() + 1.2 * last > deadline:
            runs[mode] = {"skipped": "time budget"}
            continue
        say(f"pipeline run {mode}")
        begin = time.monotonic()
        try:
            runs[mode] = run_mode(mode.removesuffix("_cold"), plan, weights, device, cache)
        except Exception as exc:  # noqa: BLE001 - one mode failing must not hide the others
            runs[mode] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
        last = time.monotonic() - begin
    return runs


def latency(runs: dict, loading: dict[str, float] | str) -> dict:
    if isinstance(loading, str):
        raise RuntimeError(f"loading the models failed: {loading}")
    report = {"model_loading_s": loading, "model_loading_total_s": sum(loading.values()), "runs": {}}
    for mode, run in runs.items():
        if "timing_s" in run:
            keep = ("timing_s", "result_objects", "heatmap_patches", "gpu_peak_allocated_mib", "tf32")
            report["runs"][mode] = {k: run[k] for k in keep if k in run}
        else:
            report["runs"][mode] = run  # the error (with its traceback) or why it was skipped
    fp32 = report["runs"].get("fp32", {}).get("timing_s")
    report["ok"] = bool(fp32) and all(v > 0 for v in fp32.values())
    return report


def part(report: dict, name: str, action: Callable[[], dict]) -> None:
    say(name)
    begin = time.monotonic()
    try:
        report["parts"][name] = action()
    except Exception as exc:  # noqa: BLE001 - one part failing must not hide the others
        report["parts"][name] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8),
        }
    report["parts"][name]["wall_s"] = time.monotonic() - begin


def environment(device: str) -> dict:
    import torch

    from mammonode import __version__

    env = {
        "mammonode": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return env


# -- the summary ------------------------------------------------------------------------------


def _stages(timing: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in timing.items() if k not in ("total", "pipeline_total"))


def summary(report: dict) -> str:
    env = report.get("environment", {})
    lines = [
        f"mammonode device check: device {report['device']} ({env.get('gpu', 'CPU')}), torch {env.get('torch')}, "
        f"CUDA {env.get('torch_cuda')}, {'quick (CI) mode' if report['quick'] else 'full mode'}, "
        f"{report['started']}, {report.get('wall_s', 0):.0f} s: {'OK' if report['ok'] else 'NOT OK'}"
    ]
    parts = report["parts"]
    for name in ("fidelity", "latency", "throughput"):
        data = parts.get(name, {})
        if "error" in data:
            lines.append(f"[{name}] FAILED: {data['error']}")
    fid = parts.get("fidelity", {})
    if "geometry" in fid:
        g = fid["geometry"]
        what = f"{g['compared']} crop/centre/stride-list comparisons"
        lines.append(
            f"[fidelity] {'OK' if fid['ok'] else 'NOT OK'}: {what} "
            + ("exact" if g["exact"] else "with mismatches: " + "; ".join(g["mismatches"]))
            + f"; tolerance {fid['tolerance']:.0e}"
        )
        for mode, d in fid["modes"].items():
            values = ", ".join(f"{k.removesuffix('_max')} {v:.2e}" for k, v in d.items() if k.endswith("_max"))
            blocks = f", {d['heatmap_blocks_compared']} heatmap blocks" if "heatmap_blocks_compared" in d else ""
            tf32 = (
                "CPU" if d["tf32"] is None else "TF32 on" if d["tf32"]["matmul"] or d["tf32"]["cudnn"] else "TF32 off"
            )
            lines.append(f"[fidelity] {mode} ({tf32}) largest deviations: {values}{blocks}")
    lat = parts.get("latency", {})
    if "runs" in lat:
        loading = ", ".join(f"{k} {v:.2f}" for k, v in lat["model_loading_s"].items())
        lines.append(
            f"[latency] model loading, measured apart: {lat['model_loading_total_s']:.2f} s ({loading}); the "
            "runs share one model cache, as a worker does: the first run's stages include loading "
            "(load_models), the later runs load nothing"
        )
        for mode, run in lat["runs"].items():
            if "timing_s" not in run:
                lines.append(f"[latency] {mode}: {run.get('error') or 'skipped: ' + run.get('skipped', '?')}")
                continue
            t = run["timing_s"]
            memory = (
                f"; GPU peak allocated {run['gpu_peak_allocated_mib']:.0f} MiB"
                if "gpu_peak_allocated_mib" in run
                else ""
            )
            lines.append(
                f"[latency] {mode}: DICOM files to {run['result_objects']} result objects {t['total']:.2f} s "
                f"(without model loading {t['total'] - t.get('load_models', 0.0):.2f} s); stages (s): "
                f"{_stages(t)}; {run.get('heatmap_patches', 0)} heatmap patches{memory}"
            )
    thr = parts.get("throughput", {})
    if "requested" in thr:
        rate = thr.get("exams_per_hour")
        lines.append(
            f"[throughput] {'OK' if thr['ok'] else 'NOT OK'}: {thr['drained']}/{thr['requested']} exams drained "
            f"({thr['failed']} failed{', stopped at the time budget' if thr['timed_out'] else ''}) by one worker "
            f"on {report['device']} ({', '.join(thr['models'])}; {thr['precision']})"
            + (
                f": {rate:.0f} exams/hour over {thr['drain_s']:.1f} s, {thr['exams_per_hour_with_startup']:.0f} "
                f"with the worker's {thr['worker_startup_s']:.1f} s start-up"
                if rate
                else ""
            )
        )
        if "mean_stage_s" in thr:
            lines.append(
                f"[throughput] mean per job (s): {_stages(thr['mean_stage_s'])}, "
                f"total {thr['mean_stage_s'].get('total', 0):.2f}"
            )
        worker = thr.get("worker", {})
        gpu = thr.get("gpu")
        extra = [f"worker peak RSS {worker['peak_rss_mb']:.0f} MB"] if "peak_rss_mb" in worker else []
        if "cpu_s" in worker:
            extra.append(f"worker CPU {worker['cpu_s']:.1f} s")
        if gpu and "utilisation_mean_pct" in gpu:
            extra.append(
                f"GPU utilisation mean {gpu['utilisation_mean_pct']:.0f} % "
                f"(median {gpu['utilisation_median_pct']:.0f}, "
                f"max {gpu['utilisation_max_pct']:.0f}, {gpu['samples']} samples)"
            )
            peak = f"GPU memory used peak {gpu['memory_used_peak_mib']:.0f} MiB"
            if "worker_peak_mib" in gpu:
                before = gpu["memory_used_before_mib"]
                peak += f" ({gpu['worker_peak_mib']:.0f} MiB above the {before:.0f} before the worker)"
            extra.append(peak)
        elif gpu:
            extra.append(f"GPU sampling: {gpu.get('error')}")
        if extra:
            lines.append("[throughput] " + "; ".join(extra))
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:K or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="the reduced CI mode (one view, a few patches)")
    parser.add_argument("--out", help="output folder (default $MAMMONODE_CHECK_OUT)")
    parser.add_argument("--exams", type=int, help="exams the worker drains (default 20; quick 2)")
    parser.add_argument(
        "--time-budget-s", type=float, help="stop starting work after this long (default 480; quick 240)"
    )
    args = parser.parse_args()
    out = args.out or os.environ.get("MAMMONODE_CHECK_OUT")
    if not out:
        print("device_check: give the output folder as --out DIR or MAMMONODE_CHECK_OUT", file=sys.stderr)
        return 2
    if args.exams is not None and args.exams < 1:
        print("device_check: --exams must be at least 1", file=sys.stderr)
        return 2
    from mammonode.pipeline.runtime import DeviceUnavailable, check_device

    try:
        device = str(check_device(args.device))
    except ValueError as exc:
        print(f"device_check: {exc}", file=sys.stderr)
        return 2
    except DeviceUnavailable as exc:  # said in the output folder too: it is where the operator looks
        print(f"device_check: {exc}", file=sys.stderr)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "device_check.json").write_text(json.dumps({"ok": False, "error": str(exc)}) + "\n")
        (Path(out) / "summary.txt").write_text(f"mammonode device check: NOT OK: {exc}\n")
        return 1
    if not (SHARED / "reference" / "reference.json").exists():
        print(f"device_check: {SHARED} (samples, weights, references) not found beside the checkout", file=sys.stderr)
        return 2
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick else FULL
    exams = args.exams or (2 if args.quick else 20)
    budget = args.time_budget_s or (240.0 if args.quick else 480.0)
    start = time.monotonic()
    deadline = start + budget - 10
    report = {
        "device": device,
        "quick": args.quick,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "time_budget_s": budget,
        "plan": {"views": plan.views, "models": plan.models, "epochs": plan.epochs, "augmentation": plan.augmentation},
        "environment": environment(device),
        "parts": {},
    }
    from mammonode.pipeline.runtime import configure_torch

    configure_torch(device, "fp32")
    with tempfile.TemporaryDirectory(prefix="mammonode-device-check-") as tmp:
        tmp = Path(tmp)
        weights = weights_dir(tmp)
        try:
            loading = model_loading(plan.models, weights, device)  # also starts CUDA before the first run
        except Exception as exc:  # noqa: BLE001 - reported by the latency part; the runs say more
            loading = f"{type(exc).__name__}: {exc}"
        # The pipeline runs serve fidelity and latency; they may use about half the budget.
        runs = pipeline_runs(plan, weights, device, start + budget * 0.5)
        part(report, "fidelity", lambda: fidelity(runs, plan))
        part(report, "latency", lambda: latency(runs, loading))
        runs.clear()
        if device.startswith("cuda"):  # what the runs cached is not the worker's memory
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()
        from device_throughput import run_throughput

        part(
            report,
            "throughput",
            lambda: run_throughput(device, exams, args.quick, weights, tmp / "node", out, deadline),
        )
    report["wall_s"] = time.monotonic() - start
    report["ok"] = all(report["parts"][name].get("ok") for name in ("fidelity", "latency", "throughput"))
    (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = summary(report)
    (out / "summary.txt").write_text(text)
    print(text, end="")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
