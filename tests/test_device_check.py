"""The GPU device check (benchmarks/device_check.py) in its CPU quick mode, so that it cannot
rot between the rare runs on a GPU server; and ``worker --device cuda:K`` refused in one line
on a machine without that device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.node import cli, write_config
from support.paths import REPO, need_shared

SCRIPT = REPO / "benchmarks" / "device_check.py"
TOLERANCE = 1e-4  # the bound for fp32 against the references


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """One quick run shared by the module's tests (about a minute on two cores)."""
    for parts in (("reference", "reference.json"), ("samples", "dicom", "density-exam"), ("weights", "test")):
        need_shared(*parts)
    out = tmp_path_factory.mktemp("device-check")
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    report_file = out / "device_check.json"
    assert report_file.exists(), proc.stderr[-3000:]
    return proc, json.loads(report_file.read_text()), out


def test_quick_mode_reports_every_part(quick_check):
    proc, report, out = quick_check
    assert set(report["parts"]) == {"fidelity", "latency", "throughput"}
    for name, part in report["parts"].items():
        assert part.get("ok") is True, (name, part.get("error"), part.get("traceback"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["ok"] is True and report["quick"] is True and report["device"] == "cpu"
    text = (out / "summary.txt").read_text()
    assert text == proc.stdout
    for line in ("[fidelity] OK", "[latency] fp32: DICOM files to", "[throughput] OK: 2/2 exams drained"):
        assert line in text, text


def test_fidelity_matches_the_reference(quick_check, reference):
    """Crop, centre and stride lists exactly, the prediction within 1e-4: compared here with
    the original code's outputs, not only with the script's own verdict."""
    imagewise = json.loads(need_shared("reference", "imagewise", "reference_imagewise.json").read_text())
    fidelity = quick_check[1]["parts"]["fidelity"]
    got = fidelity["computed"]["views"]["L-CC"]
    for key in ("crop", "best_center", "stride_lists"):
        assert got[key] == reference["views"]["L-CC"][key], key
        assert got[key] == imagewise["views"]["L-CC"][key], key
    prediction = fidelity["computed"]["images"]["L-CC"]["image_only_imagewise"]
    expected = imagewise["views"]["L-CC"]["predictions"]["image_only"]["single_pass"]
    for label in ("benign", "malignant"):
        assert abs(prediction[label] - expected[label]) <= TOLERANCE, label
    assert fidelity["geometry"]["exact"] and not fidelity["geometry"]["mismatches"]
    fp32 = fidelity["modes"]["fp32"]
    assert fp32["heatmap_blocks_compared"] > 100  # the patch window determines whole blocks
    assert fp32["heatmap_block8_max"] <= TOLERANCE and fp32["imagewise_heatmap_block8_max"] <= TOLERANCE


def test_latency_stages_are_timed(quick_check):
    latency = quick_check[1]["parts"]["latency"]
    assert latency["model_loading_total_s"] > 0
    assert set(latency["runs"]) == {"fp32"}  # on a CPU, quick mode: TF32 is CUDA's, bf16 too slow here
    run = latency["runs"]["fp32"]
    for stage in ("prepare", "crop", "image_only_imagewise", "heatmap_window", "result_objects", "total"):
        assert run["timing_s"][stage] > 0, stage
    assert run["timing_s"]["total"] >= run["timing_s"]["result_objects"] + run["timing_s"]["crop"]
    assert run["result_objects"] >= 2  # an SC and the SR at least


def test_throughput_drains_the_queue(quick_check):
    _, report, out = quick_check
    throughput = report["parts"]["throughput"]
    assert throughput["requested"] == 2 and throughput["drained"] == 2 and throughput["failed"] == 0
    assert throughput["exams_per_hour"] > 0 and throughput["mean_stage_s"]["density"] > 0
    assert "done in" in (out / "worker.log").read_text()


def test_usage_errors_are_one_line(tmp_path):
    missing_out = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=60)
    assert missing_out.returncode == 2 and "MAMMONODE_CHECK_OUT" in missing_out.stderr
    assert len(missing_out.stderr.strip().splitlines()) == 1


def test_worker_refuses_a_cuda_device_this_machine_lacks(tmp_path):
    config = write_config(
        tmp_path / "config.toml",
        {"storage": {"directory": str(tmp_path / "storage")}, "logging": {"level": "WARNING"}},
    )
    result = cli("worker", "--device", "cuda:7", config=config, check=False, timeout=60)
    text = result.stderr.strip()
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert "cuda:7" in text and "CUDA" in text
