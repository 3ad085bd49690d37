#!/usr/bin/env python
"""Pipeline speed and memory on the density exam, beside the original code's figures.

Runs the whole exam (all four models, 10 augmented epochs) with the seed-0 test weights
(+ the official histogram model), fp32 and then the opt-in bf16 mode, each in its own
process so peak RSS is its own. Prints per-stage seconds, patches/s, peak RSS, speed-up
against the original's ~430 s, the raw throughput of the patch model alone measured in the
same run (fp32 NCHW, fp32 channels-last, bf16 autocast), and how far bf16 lands from the
reference outputs. Then the image-wise models (opt-in): once configured beside the four
exam models (what they add to a node's run; L-CC's image-wise heatmaps are the exam's) and
once alone (``predict --models image_only_imagewise,image_heatmaps_imagewise``), with their
stage times and their deviation from ../shared/reference/imagewise.

    .venv/bin/python benchmarks/pipeline.py [--device cpu|cuda] [--skip-bf16]
        [--skip-imagewise | --imagewise-only] [--cpu-variants | --compiled]

``--cpu-variants`` adds two fp32 runs: with glibc's default malloc policy (as before
runtime.keep_freed_buffers) and with the patch model compiled (pipeline.compile; its compile
time shows as load_models, and "with the models already loaded" is a worker's later exams).
``--compiled`` adds the compiled run alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    EXAM_MODELS,
    IMAGEWISE_MODELS,
    REPO,
    SHARED,
    VIEWS,
    deviations,
    imagewise_deviations,
    result_heatmaps,
    weights_dir,
)

IMAGEWISE_STAGES = ("imagewise_heatmaps", "image_only_imagewise", "image_heatmaps_imagewise")


def child(mode: str, device: str, weights: Path, heatmaps_out: Path, models: str) -> None:
    """Run once in this process and print a JSON line (timings, peak RSS)."""
    sys.path.insert(0, str(REPO))
    from mammonode.pipeline.inputs import prepare_exam
    from mammonode.pipeline.run import PipelineOptions, run_pipeline
    from mammonode.pipeline.runtime import configure_torch

    precision, *variant = mode.split("+")  # fp32, bf16; +compiled, +glibc-malloc
    configure_torch(device, precision, keep_buffers="glibc-malloc" not in variant)
    start = time.perf_counter()
    prepared, seconds = prepare_exam(sorted((SHARED / "samples" / "dicom" / "density-exam").glob("*.dcm")))
    options = PipelineOptions(
        weights_dir=weights,
        device=device,
        precision=precision,
        models=tuple(models.split(",")),
        compile="compiled" in variant,
    )
    result = run_pipeline(prepared, options, {"prepare": seconds})
    wall = time.perf_counter() - start
    heatmaps_out.mkdir(parents=True, exist_ok=True)
    for name, heatmap in result_heatmaps(result).items():
        np.save(heatmaps_out / f"{name}.npy", heatmap)
    data = result.as_dict()
    data["wall_s"] = wall
    data["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for key, stats in (
        ("heatmap_model_s", result.heatmap_stats),
        ("imagewise_model_s", result.imagewise_heatmap_stats),
    ):
        if stats is not None:
            data[key] = stats.seconds_model
    print("RESULT " + json.dumps(data))


def raw_throughput(device: str) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from mammonode.pipeline.weights import load_model

    model = load_model("patch", SHARED / "weights" / "test").to(device)
    out = {}

    def bench(batch: int, channels_last: bool, bf16: bool, repeats: int, of=None) -> float:
        network = model if of is None else of
        net = (
            network.to(memory_format=torch.channels_last)
            if channels_last
            else network.to(memory_format=torch.contiguous_format)
        )
        x = torch.randn(batch, 1, 256, 256, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16),
        ):
            net(x)
            start = time.perf_counter()
            for _ in range(repeats):
                net(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return batch * repeats / (time.perf_counter() - start)

    for batch in (64, 8):
        repeats = 2 if batch == 64 and device == "cpu" else (16 if device == "cpu" else 20)
        out[f"batch{batch}_fp32_nchw"] = bench(batch, False, False, repeats)
        out[f"batch{batch}_fp32_channels_last"] = bench(batch, True, False, repeats)
        out[f"batch{batch}_bf16_autocast_channels_last"] = bench(batch, True, True, repeats)
    # The figures above use glibc's default policy (fresh pages for every large buffer);
    # the pipeline's runs keep freed buffers for reuse (runtime.keep_freed_buffers).
    from mammonode.pipeline.runtime import keep_freed_buffers

    keep_freed_buffers()
    out["batch8_fp32_channels_last_buffers_kept"] = bench(8, True, False, 16 if device == "cpu" else 20)
    # The same, alternating with the network arranged as the original's (batch norms kept,
    # transitions convolving before they pool): the ratio of the two, in one run, is what
    # fold_batch_norms and the transition order give on this machine.
    unfolded = unfolded_patch_model().to(device)
    repeats = 8 if device == "cpu" else 20
    figures: dict[str, list[float]] = {"as_the_original_arranges_it": [], "as_loaded": []}
    for _ in range(3):
        for name, network in (("as_the_original_arranges_it", unfolded), ("as_loaded", model)):
            figures[name].append(bench(8, True, False, repeats, of=network))
    for name, rates in figures.items():
        out[f"batch8_fp32_channels_last_buffers_kept_{name}"] = sum(rates) / len(rates)
    return out


def unfolded_patch_model():
    """The patch model with the test weights and the original's arrangement: batch norms
    as modules, each transition's convolution before its pool."""
    from mammonode.pipeline.models.densenet import Transition, grey_input_densenet
    from mammonode.pipeline.registry import spec
    from mammonode.pipeline.weights import load_strict, model_file, read_state_dict

    path = model_file(SHARED / "weights" / "test", "patch")
    model = grey_input_densenet(load_strict(spec("patch").build(), read_state_dict(path, spec("patch")), path))
    for module in model.modules():
        if isinstance(module, Transition):
            module.forward = lambda x, t=module: t.pool(t.conv(t.relu(t.norm(x))))
    return model


def print_imagewise(name: str, run: dict, exam_total: float | None) -> None:
    t = run["timing_s"]
    stages = ", ".join(f"{k} {t[k]:.1f}" for k in IMAGEWISE_STAGES)
    added = sum(t[k] for k in IMAGEWISE_STAGES)
    patches = run["imagewise_heatmap_patches"]
    reused = [
        f"{v} {run['views'][v]['imagewise']['patches_from_exam']}"
        for v in VIEWS
        if run["views"][v]["imagewise"]["patches_from_exam"]
    ]
    print(
        f"[{name}] image-wise stages (s): {stages}; together {added:.1f} s; total {t['total']:.1f} s"
        + (f" ({t['total'] - exam_total:+.1f} s against the exam-only fp32 run)" if exam_total else "")
    )
    print(
        f"[{name}] image-wise heatmaps: {patches['total']} patches ({patches['classified']} classified), "
        f"{patches['classified'] / max(run['imagewise_model_s'], 1e-9):.1f} classified patches/s in the model; "
        f"patches taken from the exam's: {', '.join(reused) or 'none'}; peak RSS {run['peak_rss_mb']:.0f} MB"
    )
    d = run["imagewise_deviation"]
    print(
        f"[{name}] largest deviation from the image-wise reference: heatmap 8x8 block means "
        f"{d['heatmap_block8_max']:.2e}, predictions {d['predictions_max']:.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--skip-imagewise", action="store_true", help="only the exam's four models")
    parser.add_argument("--imagewise-only", action="store_true", help="only the image-wise runs")
    parser.add_argument(
        "--cpu-variants",
        action="store_true",
        help="also fp32 with glibc's default malloc policy (before runtime.keep_freed_buffers) and fp32 "
        "with the patch model compiled (pipeline.compile)",
    )
    parser.add_argument("--compiled", action="store_true", help="also fp32 with the patch model compiled")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", default=EXAM_MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.device, Path(args.weights), Path(args.out), args.models)
        return
    reference = json.loads((SHARED / "reference" / "reference.json").read_text())
    iw_reference = json.loads((SHARED / "reference" / "imagewise" / "reference_imagewise.json").read_text())
    original = reference["timing_of_the_original_code"]
    original_total = sum(
        original[k]["wall_s"] for k in ("crop", "centers", "heatmaps", "image_aug_seed0", "imageheatmaps_aug_seed0")
    )
    with tempfile.TemporaryDirectory(prefix="mammonode-bench-") as tmp:
        tmp = Path(tmp)
        weights = weights_dir(tmp)
        plan = [] if args.imagewise_only else [("fp32", "fp32", EXAM_MODELS)]
        if args.cpu_variants:
            plan += [("fp32 glibc-malloc", "fp32+glibc-malloc", EXAM_MODELS)]
        if args.cpu_variants or args.compiled:
            plan += [("fp32 compiled", "fp32+compiled", EXAM_MODELS)]
        plan += [] if args.skip_bf16 or args.imagewise_only else [("bf16", "bf16", EXAM_MODELS)]
        if not args.skip_imagewise:
            plan += [
                ("fp32 exam + image-wise", "fp32", f"{EXAM_MODELS},{IMAGEWISE_MODELS}"),
                ("fp32 image-wise alone", "fp32", IMAGEWISE_MODELS),
            ]
        runs, imagewise_runs = {}, {}
        for index, (name, mode, models) in enumerate(plan):
            out = tmp / f"run{index}"
            command = [sys.executable, __file__, "--child", mode, "--device", args.device, "--models", models]
            proc = subprocess.run(
                [*command, "--weights", str(weights), "--out", str(out)], capture_output=True, text=True
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:  # say so, and keep the other runs' figures
                print(f"{name} run failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            run = json.loads(line[7:])
            heatmaps = {p.stem: np.load(p) for p in out.glob("*.npy")}
            if "images" in run:
                run["imagewise_deviation"] = imagewise_deviations(run, heatmaps, iw_reference)
                imagewise_runs[name] = run
            else:
                run["deviation"] = deviations(run, heatmaps, reference)
                runs[name] = run
        raw = {} if args.imagewise_only else raw_throughput(args.device)

    print(f"density exam, all four models, 10 epochs, device {args.device}")
    print(
        f"original code (reference, 2-core CPU): total {original_total:.0f} s "
        f"(heatmaps {original['heatmaps']['wall_s']:.0f} s, {original['heatmaps']['patches']} patches, "
        f"{original['heatmaps']['patches'] / original['heatmaps']['wall_s']:.1f} patches/s), "
        f"peak RSS {max(v['peak_rss_mb'] for v in original.values() if isinstance(v, dict) and 'peak_rss_mb' in v)} MB"
    )
    for mode, run in runs.items():
        t = run["timing_s"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "total")
        patches = run["heatmap_patches"]
        exam = t["total"] - t.get("load_models", 0.0)
        print(
            f"[{mode}] total {t['total']:.1f} s (wall {run['wall_s']:.1f} s) -> {original_total / t['total']:.2f}x "
            f"faster than the original; with the models already loaded (a worker's second exam on): "
            f"{exam:.1f} s; stages (s): {stages}"
        )
        print(
            f"[{mode}] heatmaps: {patches['total']} patches ({patches['classified']} classified, the rest "
            f"all-background), {patches['total'] / t['heatmaps']:.1f} patches/s over the stage, "
            f"{patches['classified'] / run['heatmap_model_s']:.1f} classified patches/s in the model; "
            f"peak RSS {run['peak_rss_mb']:.0f} MB"
        )
        d = run["deviation"]
        print(
            f"[{mode}] largest deviation from the reference: heatmap 8x8 block means {d['heatmap_block8_max']:.2e}, "
            f"cancer predictions {d['cancer_max']:.2e}, density probabilities {d['density_max']:.2e}"
        )
    for name, run in imagewise_runs.items():
        exam_total = runs["fp32"]["timing_s"]["total"] if "fp32" in runs and "density" in run["timing_s"] else None
        print_imagewise(name, run, exam_total)
    if not raw:
        return
    if "bf16" in runs:
        print(
            f"bf16 mode is {runs['fp32']['timing_s']['total'] / runs['bf16']['timing_s']['total']:.2f}x "
            "faster than fp32"
        )
    print("raw patch-model throughput (patches/s): " + ", ".join(f"{k} {v:.1f}" for k, v in raw.items()))
    before = raw.get("batch8_fp32_channels_last_buffers_kept_as_the_original_arranges_it")
    if before:
        print(
            "patch model as loaded (batch norms folded, transitions pooling first) vs the original's arrangement, "
            f"alternating in this run: {raw['batch8_fp32_channels_last_buffers_kept_as_loaded'] / before:.2f}x"
        )
    print(
        "reference raw throughput of the original (batch 64): fp32 NCHW "
        f"{original['raw_patch_model_fp32_patches_per_s']}, channels-last "
        f"{original['raw_patch_model_fp32_channels_last_patches_per_s']}, bf16 autocast "
        f"{original['raw_patch_model_bf16_autocast_patches_per_s']}"
    )


if __name__ == "__main__":
    main()
