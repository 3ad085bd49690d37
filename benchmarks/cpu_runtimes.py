#!/usr/bin/env python
"""The patch model (the exam's costliest stage) under each CPU runtime, in one process.

Prints, for batches of 8 grey 256x256 patches: patches/s and the ratio to PyTorch eager
(fp32, channels-last: the pipeline's default), the largest deviation of the softmax from
eager's, and the arithmetic each achieves (GFLOP/s, from PyTorch's FLOP counter). Runtimes
that are not installed are named and skipped: ONNX Runtime needs ``onnx`` and
``onnxruntime``, OpenVINO ``openvino`` (``pip install '.[cpu-runtimes]'``). The last line
turns the measured rate into the heatmap stage's time for the density exam's patches.

    .venv/bin/python benchmarks/cpu_runtimes.py [--seconds 20] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import REPO, SHARED

BATCH = 8
EXAM_PATCHES = 2294  # patches the density exam classifies (benchmarks/pipeline.py: "2294 classified")


def rate(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, seconds: float) -> float:
    run(x)
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        run(x)
        done += len(x)
    return done / (time.perf_counter() - start)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per runtime")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every runtime")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from torch.utils.flop_counter import FlopCounterMode

    from mammonode.pipeline.weights import load_model

    torch.set_num_threads(args.threads)
    model = load_model("patch", SHARED / "weights" / "test").eval()
    x = np.random.default_rng(0).standard_normal((BATCH, 1, 256, 256)).astype(np.float32)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.from_numpy(x[:1]))
    flop_per_patch = counter.get_total_flops()
    eager = model.to(memory_format=torch.channels_last)

    def run_eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return eager(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)).numpy()

    reference = softmax(run_eager(x))
    runtimes: dict[str, Callable[[np.ndarray], np.ndarray] | str] = {"pytorch eager": run_eager}
    workdir = Path(tempfile.mkdtemp(prefix="cpu-runtimes-"))
    onnx_file = workdir / "patch.onnx"
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime as ort

        torch.onnx.export(
            model.to(memory_format=torch.contiguous_format),
            (torch.from_numpy(x),),
            str(onnx_file),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "n"}},
            opset_version=17,
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        runtimes[f"onnxruntime {ort.__version__}"] = lambda b: session.run(None, {"x": b})[0]
    except ImportError as exc:
        runtimes["onnxruntime"] = f"not installed ({exc.name})"
    try:
        import openvino as ov

        core = ov.Core()
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32"})
        ov_model = ov.convert_model(model.to(memory_format=torch.contiguous_format), example_input=torch.from_numpy(x))
        compiled = core.compile_model(ov_model, "CPU")
        runtimes[f"openvino {ov.__version__.split('-')[0]} (f32)"] = lambda b: compiled(b)[0]
    except ImportError as exc:
        runtimes["openvino"] = f"not installed ({exc.name})"

    print(
        f"patch model, batch {BATCH}, {args.threads} threads, {flop_per_patch / 1e9:.2f} GFLOP per patch "
        f"(torch {torch.__version__})"
    )
    eager_rate = None
    for name, run in runtimes.items():
        if isinstance(run, str):
            print(f"  {name}: {run}")
            continue
        deviation = float(np.abs(softmax(run(x)) - reference).max())
        measured = rate(run, x, args.seconds)
        eager_rate = eager_rate or measured
        print(
            f"  {name}: {measured:.2f} patches/s ({measured / eager_rate:.2f}x eager), "
            f"{measured * flop_per_patch / 1e9:.0f} GFLOP/s, softmax deviation from eager {deviation:.1e}"
        )
    print(
        f"at the eager rate the density exam's {EXAM_PATCHES} classified patches take "
        f"{EXAM_PATCHES / eager_rate:.0f} s ({EXAM_PATCHES * flop_per_patch / 1e12:.1f} TFLOP)"
    )


if __name__ == "__main__":
    main()
